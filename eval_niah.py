"""Needle-in-a-haystack grid with heatmaps (LongLLaDA Fig. 2, 3 and 6; protocol in REFERENCE.md section 5)."""
import argparse
import json
import os
import random
import re
import sys
import time
from itertools import islice
from pathlib import Path

import torch

from model import UserError, load_model, read_config, run_cli
from rope import parse_lengths
from sample import all_gather, check_schedule, decode_answer, distributed, generate, load_tokenizer

ISLANDS = ("Marrow Kestrel Tamsin Orlaith Brevik Solvang Quillon Harrowgate Ebbridge Corvane Lindqvist Maravel "
           "Ostrava Rennick Sablewick Thornmere Vantor Wexley Ysolde Pellmoor").split()
ITEMS = [f"{a} {b}" for a in "Amber Bronze Crystal Ebony Golden Ivory Jade Obsidian Silver Sapphire".split()
         for b in "Compass Crown Chalice Dagger Harp Lantern Mirror Scroll Shield Spear Telescope Key".split()]
# The default haystack is generated prose with real sentence boundaries. RULER's "noise" haystack repeats five
# fixed sentences, which makes any new sentence, such as the needle, stand out far too easily.
WORDS = dict(who="the old ferryman|a quiet archivist|the village council|my grandmother|a travelling merchant|two "
                 "fishermen|the schoolteacher|a tired soldier|the baker's daughter|the harbour master",
             did="carried|mended|painted|counted|buried|sold|studied|polished|traded|followed|measured|described",
             adj="weathered|narrow|crooked|silent|golden|borrowed|forgotten|heavy|fragile|ordinary|distant|painted",
             thing="lantern|ledger|bridge|orchard|wagon|letter|well|window|map|garden|bell|staircase|boat|fence",
             place="harbour|market square|mill|chapel|valley|library|northern road|inn|lighthouse|granary",
             when="the first frost|midsummer|the long rains|dawn|the harvest fair|the spring tide|late autumn")
TEMPLATES = ["{Who} {did} the {adj} {thing} near the {place}.", "By {when}, {who} had {did} every {thing} there.",
             "Nobody at the {place} could say why the {thing} had become so {adj}.",
             "It was said that the {adj} {thing} was only ever seen around {when}.",
             "The {place} was {adj} that year, and {who} {did} the {thing} without a word.",
             "When {when} came, the {thing} by the {place} was {adj} again."]
PROMPT = ("You are an intelligent AI assistant skilled in answering user questions.\nPlease keep your answers concise "
          "and clear. Do not talk about irrelevant topics or repeat your answers.\nThe document given to you by the "
          "user is ",  # {context}, then:
          "\n\nNow, the question is: What legendary item is hidden on {0} Island? Before answering, please consider "
          "what in the document is most relevant to this question. The legendary item hidden on the {0} Island is")


def generated_sentences(rng):
    """An endless stream of sentences drawn from the word lists and templates above."""
    words = {k: v.split("|") for k, v in WORDS.items()}
    while True:
        pick = {k: rng.choice(v) for k, v in words.items()}
        yield rng.choice(TEMPLATES).format(Who=pick["who"].capitalize(), **pick)


def build_prompt(tok, sentences, length, depth, island, needle):
    """Exactly `length` token ids: scaffold + haystack, with the needle on its own line at the sentence
    boundary nearest `depth`% of the haystack. `sentences`: token ids, one sentence each."""
    head, tail, needle = (tok.encode(t, add_special_tokens=False).ids
                          for t in (PROMPT[0], PROMPT[1].format(island), f"\n{needle}\n"))
    budget = length - len(head) - len(tail) - len(needle)
    if budget < 1:
        raise UserError(f"length {length} cannot hold the prompt scaffold and needle ({length - budget + 1} at least)")
    pieces, n = [], 0
    for ids in sentences:
        if n >= budget:
            break
        pieces.append(ids[:budget - n])  # the last sentence is cut to fit exactly
        n += len(pieces[-1])
    if n < budget:
        raise UserError(f"the haystack has {n} tokens; length {length} needs {budget}")
    bounds = torch.tensor([0] + [len(p) for p in pieces]).cumsum(0)
    k = int((bounds - depth / 100 * n).abs().argmin())
    return head + sum(pieces[:k], []) + needle + sum(pieces[k:], []) + tail


def sample_prompt(tok, book, seed, length, depth, repeat):
    """One sample's prompt ids, keyword and needle. The draws depend on (seed, repeat) only: the same needle
    and haystack at every length and depth, on any rank. `book`: a file's sentences, or None (generated)."""
    rng = random.Random(f"{seed}-{repeat}")
    island, item = rng.choice(ISLANDS), rng.choice(ITEMS)
    needle = f"Hidden on {island} Island is the legendary {item}."
    start = rng.randrange(max(len(book), 1)) if book is not None else 0  # each repeat from its own sentence
    text = book[start:] + book[:start] if book is not None else islice(generated_sentences(rng), length // 4)
    sentences = [e.ids for e in tok.encode_batch([" " + s for s in text], add_special_tokens=False)]
    return build_prompt(tok, sentences, length, depth, island, needle), item, needle


def levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def score(prediction, keyword, needle):
    """100 if the keyword is in the prediction, else up to 20 for string similarity to the needle."""
    if keyword in prediction:
        return 100.0
    pred, needle = prediction.strip(), needle.strip()
    return 0.2 * 100 * (1 - levenshtein(pred, needle) / max(len(pred), len(needle), 1))


def read_rows(results):
    """The finished samples of a results file (one JSON object per line); none if there is no file yet."""
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def plot(results):
    """Heatmap of a results file: depth down, length across, colour = mean over repeats; above it the mean
    over depths per length. Written beside the file as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_rows(results)
    if not rows:
        raise UserError(f"no results to plot in {results}")
    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    cells = {}
    for r in rows:
        cells.setdefault((r["depth"], r["length"]), []).append(r["score"])
    grid = torch.tensor([[sum(cells[d, n]) / len(cells[d, n]) if (d, n) in cells else torch.nan for n in lengths]
                         for d in depths])  # (depths, lengths): the mean over repeats
    fig, (top, ax) = plt.subplots(2, 1, sharex=True, height_ratios=[1, 3], figsize=(1.2 * len(lengths) + 3, 7))
    im = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    top.plot(range(len(lengths)), grid.nanmean(0).numpy(), "k.-")
    top.set(ylim=(-5, 105), ylabel="mean over depths")
    names = [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths]
    ax.set(xticks=range(len(lengths)), xticklabels=names, yticks=range(len(depths)),
           yticklabels=[f"{d:g}%" for d in depths], xlabel="prompt length (tokens)", ylabel="needle depth")
    fig.colorbar(im, ax=[top, ax], label="score")
    s = rows[0]["settings"]
    top.set_title(f"{s['model']}, rope_scale {s['rope_scale']:g}, steps {s['steps']}, gen {s['gen_length']}, "
                  f"{s['haystack']} haystack: overall {grid.nanmean():.2f}", fontsize=9)
    fig.savefig(results.with_suffix(".png"), dpi=120)
    print(f"overall {grid.nanmean():.2f}; wrote {results.with_suffix('.png')}")


def main():
    p = argparse.ArgumentParser(description="Needle-in-a-haystack grid (LongLLaDA Fig. 2, 3, 6).")
    p.add_argument("--model", help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--lengths", default="2k,4k,8k,16k,24k,32k", help="prompt lengths in tokens (k = 1024)")
    p.add_argument("--depths", default="0:100:10", help="needle depths in %%: start:stop:step or a list")
    p.add_argument("--repeats", type=int, default=10, help="needle and haystack draws per cell")
    p.add_argument("--steps", type=int, default=32, help="denoising steps")
    p.add_argument("--gen-length", type=int, default=32, help="answer length in tokens")
    p.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block length")
    p.add_argument("--rope-scale", type=float, default=1.0, help="static NTK factor lambda (python rope.py)")
    p.add_argument("--haystack", help="a long text file to use as haystack (default: generated prose)")
    p.add_argument("--seed", type=int, default=0, help="seed of needles and haystacks")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--out", help="results JSONL (default results/<model>_rope<scale>_steps<n>.jsonl)")
    p.add_argument("--plot", metavar="JSONL", help="only redraw the heatmap of a results file")
    args = p.parse_args()
    if args.plot:
        return plot(Path(args.plot))
    try:
        lengths, depths = parse_lengths(args.lengths), [int(d) for d in re.split("[:,]", args.depths)]
        if ":" in args.depths:  # start:stop:step, stop included
            depths = list(range(depths[0], depths[1] + 1, depths[2]))
    except (ValueError, IndexError):
        raise UserError(f"bad --lengths {args.lengths!r} or --depths {args.depths!r}") from None
    if not args.model or not all(0 <= d <= 100 for d in depths) or args.repeats < 1:
        raise UserError("need --model, depths within 0 to 100, and --repeats of at least 1")
    if not read_config(args.model).causal:
        check_schedule(args.gen_length, args.block_length, args.steps)
    tok = load_tokenizer(args.model)
    name = Path(args.model).name
    out = Path(args.out or f"results/{name}_rope{args.rope_scale:g}_steps{args.steps}.jsonl")
    settings = dict(model=name, rope_scale=args.rope_scale, steps=args.steps, gen_length=args.gen_length,
                    block_length=args.block_length, haystack=Path(args.haystack).name if args.haystack else
                    "generated", seed=args.seed)
    rows = read_rows(out)
    if any(r["settings"] != settings for r in rows):  # never mix runs with different settings
        raise UserError(f"{out} holds results with other settings; choose another --out")
    done = {(r["length"], r["depth"], r["repeat"]) for r in rows}
    todo = [(n, d, i) for n in lengths for d in depths for i in range(args.repeats) if (n, d, i) not in done]
    book = [s for s in re.split(r"(?<=[.!?])\s+", Path(args.haystack).read_text()) if s] if args.haystack else None
    for n in {min(lengths), max(lengths)}:  # a too short length or haystack fails now, not after loading
        sample_prompt(tok, book, args.seed, n, 50, 0)
    rank, world, device = distributed(args.device)
    all_gather(None, world)  # barrier: every rank has read the file before any rank appends to it
    todo = todo[rank::world]  # under torchrun: a disjoint share of what is not done yet
    model = load_model(args.model, device, rope_scale=args.rope_scale, verbose=rank == 0) if todo else None
    if model:
        model.check_length(max(n for n, _, _ in todo) + args.gen_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for c, (n, d, i) in enumerate(todo):
        ids, item, needle = sample_prompt(tok, book, args.seed, n, d, i)
        out_ids = generate(model, torch.tensor([ids], device=model.device), None, args.steps, args.gen_length,
                           args.block_length)
        prediction = decode_answer(tok, model, out_ids[0, n:])
        row = dict(settings=settings, length=n, depth=d, repeat=i, prediction=prediction,
                   score=score(prediction, item, needle))
        # One whole line per finished sample, in one O_APPEND write: an interruption loses at most the sample
        # in flight, and lines of several ranks never interleave within a line.
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, (json.dumps(row) + "\n").encode())
        os.close(fd)
        eta = (time.time() - t0) / (c + 1) * (len(todo) - c - 1) / 60
        print(f"\r[rank {rank}] " * (world > 1) + f"sample {c + 1}/{len(todo)}  {n} tokens, depth {d}%: "
              f"{row['score']:.0f}  ETA {eta:.1f} min  ", end="", file=sys.stderr)
    all_gather(None, world)  # every rank has finished; rank 0 draws the whole grid
    if rank == 0 and out.exists():
        print(file=sys.stderr)
        plot(out)


if __name__ == "__main__":
    run_cli(main)
