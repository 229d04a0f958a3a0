"""RULER's synthetic long-context tasks (LongLLaDA Table 2; protocol in REFERENCE.md section 7): per task and length
the share of the answers found in the model's continuation, averaged into Table 2's NIAH / AGG / QA / Avg columns.
The samples themselves are made in ruler_tasks.py."""
import re
from pathlib import Path

import torch

from cli import (PROMPT_BOS, ArgumentParser, all_gather, append_rows, count, decode_answer, load_tokenizer,
                 model_flags, parse_lengths, pending, read_lines, rope_label, run_cli, sample_seed, sampling_settings,
                 schedule_flags, share_and_load, tasks_flag)
from haystack import read_book
from model import UserError, read_config
from plots import length_names, score_table
from ruler_tasks import NIAH, TASKS, make_sample, read_qa
from sample import answer

GROUPS = dict(NIAH=list(NIAH), AGG=["vt", "cwe", "fwe"], QA=["qa_1", "qa_2"])  # Table 2's columns


def string_match_all(prediction, answers):
    """RULER's metric for all but QA: the share of the answers found in the prediction (case-insensitive)."""
    return sum(a.lower() in prediction.lower() for a in answers) / len(answers)


def string_match_part(prediction, answers):
    """RULER's metric for QA: 1 if any of the answers is found in the prediction (case-insensitive), else 0."""
    return float(any(a.lower() in prediction.lower() for a in answers))


def score(task, prediction, answers):
    """0-100 for one sample. As RULER does, control characters count as line breaks and the ends are stripped."""
    prediction = re.sub(r"[\x00-\x1f]", "\n", prediction).strip()
    return 100 * (string_match_part if task.startswith("qa") else string_match_all)(prediction, answers)


def summary(rows):
    """{(task, length): mean score}, and {(column, length): ...} for Table 2's columns: NIAH, AGG and QA are the
    means of their tasks (those that ran); Avg is the mean of all tasks that ran, with all 13 (8 NIAH + 3 AGG +
    2 QA) / 13 as in the paper."""
    scores = {}
    for r in rows:
        scores.setdefault((r["task"], r["length"]), []).append(r["score"])
    cells = {key: sum(v) / len(v) for key, v in scores.items()}
    columns = {}
    for n in {n for _, n in cells}:
        for name, tasks in list(GROUPS.items()) + [("Avg", TASKS)]:
            found = [cells[t, n] for t in tasks if (t, n) in cells]
            if found:
                columns[name, n] = sum(found) / len(found)
    return cells, columns


def report(out):
    """The table of a results file, printed and drawn beside it as PNG."""
    rows = read_lines(out)
    if not rows:
        raise UserError(f"no results in {out}")
    cells, columns = summary(rows)
    tasks, lengths = [t for t in TASKS if any(t == k for k, _ in cells)], sorted({n for _, n in cells})
    names = list(dict.fromkeys(name for name, _ in columns))
    print(f"{'task':<16}" + "".join(f"{n:>9}" for n in lengths))
    for key, table in [(t, cells) for t in tasks] + [(c, columns) for c in names]:
        print(f"{key:<16}" + "".join(f"{table[key, n]:9.1f}" if (key, n) in table else f"{'-':>9}" for n in lengths))
    s = rows[0]["settings"]
    title = f"{s['model']}, {rope_label(s)}, steps {s['steps']}, gen {s['gen_length']}: RULER (LongLLaDA Table 2)"
    grid = [[table.get((key, n), float("nan")) for n in lengths]
            for table, keys in [(cells, tasks), (columns, names)] for key in keys]
    score_table(torch.tensor(grid), tasks + names, length_names(lengths), len(tasks), title, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")


def main():
    p = ArgumentParser("RULER's synthetic long-context tasks (LongLLaDA Table 2).")
    model_flags(p)
    schedule_flags(p, gen_length=64, steps=64, block_length=64)
    p.add_argument("--tasks", type=tasks_flag(TASKS), default=",".join(TASKS),
                   help="comma-separated; qa_1 needs --squad, qa_2 --hotpotqa")
    p.add_argument("--lengths", default="4k,8k,16k", type=parse_lengths, help="context lengths (k = 1024 tokens)")
    p.add_argument("--samples", type=count, default=100, help="samples per task and length")
    p.add_argument("--haystack", help="a long text file for the essay haystack (default: generated prose)")
    p.add_argument("--squad", help="SQuAD 2.0 dev JSON (dev-v2.0.json), for qa_1")
    p.add_argument("--hotpotqa", help="HotpotQA dev distractor JSON (hotpot_dev_distractor_v1.json), for qa_2")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample's draws")
    p.add_argument("--out", help="results JSONL (default: results/ruler_<model>_rope<scale>_steps<n>.jsonl, plus the "
                   "scaling method, cache and threshold if set)")
    p.add_argument("--table", metavar="JSONL", help="only print and draw the table of a results file")
    args = p.parse_args()
    if args.table:
        return report(Path(args.table))
    tasks = args.tasks
    if not args.model:
        raise UserError("need --model (a checkpoint folder)")
    config = read_config(args.model)
    settings, name = sampling_settings(args, config)  # checked before any weight is read
    files = dict(qa_1=args.squad, qa_2=args.hotpotqa)
    qa_data = {t: read_qa(f, hotpot=t == "qa_2") for t, f in files.items() if t in tasks and f}
    for t in [t for t in tasks if t in files and t not in qa_data]:
        print(f"{t}: not run (it needs --{'squad' if t == 'qa_1' else 'hotpotqa'} FILE)")
    tasks = [t for t in tasks if t not in files or t in qa_data]
    settings |= dict(haystack=Path(args.haystack).name if args.haystack else "generated", seed=args.seed,
                     **{t: Path(files[t]).name for t in qa_data})
    out = Path(args.out or f"results/ruler_{name}.jsonl")
    todo = pending(out, settings, [(n, t, i) for n in args.lengths for t in tasks for i in range(args.samples)],
                   key=lambda r: (r["length"], r["task"], r["index"]))
    tok, book = load_tokenizer(args.model), read_book(args.haystack)

    def prompt(item):  # each sample from (seed, task, index) only: the same on any rank and in any rerun
        n, task, i = item
        return make_sample(task, tok, n, args.seed, i, book, qa_data.get(task), PROMPT_BOS.get(config.model_type, ""))
    for task in tasks:  # a length too short for a task fails now, not after loading
        prompt((min(args.lengths), task, 0))
    rank, world, todo, model = share_and_load(args, todo, max(args.lengths))

    def sample(item):
        ids, answers = prompt(item)
        out_ids = answer(model, torch.tensor([ids], device=model.device), settings, sample_seed(args.seed, *item))
        prediction = decode_answer(tok, model, out_ids[0, len(ids):])
        return dict(settings=settings, length=item[0], task=item[1], index=item[2], prediction=prediction,
                    answers=answers, score=score(item[1], prediction, answers))
    append_rows(todo, sample, out, lambda r: f"{r['task']} at {r['length']}: {r['score']:.0f}", rank, world)
    all_gather(None, world)  # every rank has finished; rank 0 reports on the whole file
    if rank == 0 and out.exists():
        report(out)


if __name__ == "__main__":
    run_cli(main)
