"""Needle-in-a-haystack grid with heatmaps (LongLLaDA Fig. 2, 3 and 6; protocol in REFERENCE.md section 5)."""
import re
from pathlib import Path

import torch

from cli import (PROMPT_BOS, ArgumentParser, all_gather, append_rows, decode_answer, load_tokenizer, model_flags,
                 parse_lengths, pending, read_lines, rope_label, run_cli, sample_seed, sampling_settings,
                 schedule_flags, share_and_load)
from haystack import read_book, sample_prompt
from model import UserError, read_config
from plots import niah_heatmap
from sample import answer


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
    fast = "".join(f", {k} {s[k]}" for k in ("cache", "threshold", "alg", "temperature") if s.get(k))  # if used
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
    config, tok = read_config(args.model), load_tokenizer(args.model)
    settings, name = sampling_settings(args, config)  # checked before any weight is read
    bos = PROMPT_BOS.get(config.model_type, "")  # Dream: LongLLaDA's wrapper's "<|beginoftext|>"
    settings |= dict(haystack=Path(args.haystack).name if args.haystack else "generated", seed=args.seed)
    out = Path(args.out or f"results/{name}.jsonl")
    todo = pending(out, settings, [(n, d, i) for n in lengths for d in depths for i in range(args.repeats)],
                   key=lambda r: (r["length"], r["depth"], r["repeat"]))
    book = read_book(args.haystack)
    for n in {min(lengths), max(lengths)}:  # a too short length or haystack fails now, not after loading
        sample_prompt(tok, book, args.seed, n, 50, 0, bos)
    rank, world, todo, model = share_and_load(args, todo, max(lengths) + args.gen_length)

    def sample(item):
        n, d, i = item
        ids, keyword, needle = sample_prompt(tok, book, args.seed, n, d, i, bos)
        out_ids = answer(model, torch.tensor([ids], device=model.device), settings, sample_seed(args.seed, *item))
        prediction = decode_answer(tok, model, out_ids[0, n:])
        return dict(settings=settings, length=n, depth=d, repeat=i, prediction=prediction,
                    score=score(prediction, keyword, needle))
    append_rows(todo, sample, out, lambda r: f"{r['length']} tokens, depth {r['depth']}%: {r['score']:.0f}", rank,
                world)
    all_gather(None, world)  # every rank has finished; rank 0 draws the whole grid
    if rank == 0 and out.exists():
        plot(out)


if __name__ == "__main__":
    run_cli(main)
