"""Needle-in-a-haystack grid with heatmaps (LongLLaDA Fig. 2, 3 and 6; protocol in REFERENCE.md section 5)."""
import re
import time
from pathlib import Path

import torch

from cli import (ArgumentParser, all_gather, append_line, check_length, decode_answer, distributed, load_tokenizer,
                 model_flags, parse_lengths, progress, read_lines, rope_label, run_cli, schedule_flags)
from haystack import read_book, sample_prompt
from model import UserError, load_model, read_config
from plots import niah_heatmap
from sample import check_schedule, generate


def levenshtein(a, b):
    """Edit distance: the fewest insertions, deletions and substitutions that turn a into b."""
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


def plot(results):
    """The heatmap of a results file, written beside it as PNG: each cell is the mean over repeats."""
    rows = read_lines(results)
    if not rows:
        raise UserError(f"no results to plot in {results}")
    lengths, depths = sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows})
    cells = {}
    for r in rows:
        cells.setdefault((r["depth"], r["length"]), []).append(r["score"])
    grid = torch.tensor([[sum(cells[d, n]) / len(cells[d, n]) if (d, n) in cells else torch.nan for n in lengths]
                         for d in depths])  # (depths, lengths)
    s = rows[0]["settings"]
    fast = "".join(f", {k} {s[k]}" for k in ("cache", "threshold") if s.get(k))  # Fast-dLLM's, if used
    title = (f"{s['model']}, {rope_label(s)}, steps {s['steps']}, gen {s['gen_length']}{fast}, "
             f"{s['haystack']} haystack: overall {grid.nanmean():.2f}")
    niah_heatmap(grid, lengths, depths, title, results.with_suffix(".png"))
    print(f"overall {grid.nanmean():.2f}; wrote {results.with_suffix('.png')}")


def main():
    p = ArgumentParser("Needle-in-a-haystack grid (LongLLaDA Fig. 2, 3, 6).")
    model_flags(p)
    schedule_flags(p, gen_length=32, steps=32, block_length=32)
    p.add_argument("--lengths", default="2k,4k,8k,16k,24k,32k", type=parse_lengths, help="prompt lengths (k = 1024)")
    p.add_argument("--depths", default="0:100:10", help="needle depths in %%: start:stop:step or a list")
    p.add_argument("--repeats", type=int, default=10, help="needle and haystack draws per cell")
    p.add_argument("--haystack", help="a long text file to use as haystack (default: generated prose)")
    p.add_argument("--seed", type=int, default=0, help="seed of needles and haystacks")
    p.add_argument("--out", help="results JSONL (default: results/<model>_rope<scale>_steps<n>.jsonl, plus the "
                   "scaling method, cache and threshold if set)")
    p.add_argument("--plot", metavar="JSONL", help="only redraw the heatmap of a results file")
    args = p.parse_args()
    if args.plot:
        return plot(Path(args.plot))
    try:
        lengths, depths = args.lengths, [int(d) for d in re.split("[:,]", args.depths)]
        if ":" in args.depths:  # start:stop:step, stop included
            depths = list(range(depths[0], depths[1] + 1, depths[2]))
    except (ValueError, IndexError):
        raise UserError(f"bad --depths {args.depths!r}") from None
    if not args.model or not all(0 <= d <= 100 for d in depths) or args.repeats < 1:
        raise UserError("need --model, depths within 0 to 100, and --repeats of at least 1")
    if not read_config(args.model).causal:
        check_schedule(args.gen_length, args.block_length, args.steps)
    tok = load_tokenizer(args.model)
    name, scaling = Path(args.model).name, args.rope_scaling
    tags = [f"rope{args.rope_scale:g}", scaling and f"{scaling['rope_type']}{scaling['factor']:g}",
            f"steps{args.steps}", args.cache, args.threshold and f"t{args.threshold:g}"]
    out = Path(args.out or f"results/{'_'.join([name] + [t for t in tags if t])}.jsonl")
    settings = dict(model=name, rope_scale=args.rope_scale, rope_scaling=scaling, steps=args.steps,
                    gen_length=args.gen_length, block_length=args.block_length, cache=args.cache,
                    threshold=args.threshold, haystack=Path(args.haystack).name if args.haystack else "generated",
                    seed=args.seed)
    rows = read_lines(out)
    if any(r["settings"] != settings for r in rows):  # never mix runs with different settings
        raise UserError(f"{out} holds results with other settings; choose another --out")
    done = {(r["length"], r["depth"], r["repeat"]) for r in rows}
    todo = [(n, d, i) for n in lengths for d in depths for i in range(args.repeats) if (n, d, i) not in done]
    book = read_book(args.haystack)
    for n in {min(lengths), max(lengths)}:  # a too short length or haystack fails now, not after loading
        sample_prompt(tok, book, args.seed, n, 50, 0)
    rank, world, device = distributed(args.device)
    all_gather(None, world)  # barrier: every rank has read the file before any rank appends to it
    todo = todo[rank::world]  # under torchrun: a disjoint share of what is not done yet
    model = load_model(args.model, device, rope_scale=args.rope_scale, rope_scaling=scaling, verbose=rank == 0) \
        if todo else None
    if model:
        check_length(model, max(n for n, _, _ in todo) + args.gen_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, show = time.time(), progress(len(todo))
    for c, (n, d, i) in enumerate(todo):
        ids, item, needle = sample_prompt(tok, book, args.seed, n, d, i)
        out_ids = generate(model, torch.tensor([ids], device=model.device), None, args.steps, args.gen_length,
                           args.block_length, cache=args.cache, threshold=args.threshold)
        prediction = decode_answer(tok, model, out_ids[0, n:])
        row = dict(settings=settings, length=n, depth=d, repeat=i, prediction=prediction,
                   score=score(prediction, item, needle))
        append_line(row, out)  # each sample is kept as soon as it is done
        eta = (time.time() - t0) / (c + 1) * (len(todo) - c - 1) / 60
        show(c + 1, f"[rank {rank}] " * (world > 1) + f"sample {c + 1}/{len(todo)}  {n} tokens, depth {d}%: "
             f"{row['score']:.0f}  ETA {eta:.1f} min  ")
    all_gather(None, world)  # every rank has finished; rank 0 draws the whole grid
    if rank == 0 and out.exists():
        plot(out)


if __name__ == "__main__":
    run_cli(main)
