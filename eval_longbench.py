"""LongBench v1 (LongLLaDA Table 1; protocol in REFERENCE.md section 8): the 21 tasks as LongLLaDA's OpenCompass run
fed and scored them, per task, category and budget. Prompts, truncation and metrics are in longbench_tasks.py."""
from pathlib import Path

import torch

from cli import (ArgumentParser, all_gather, append_rows, count, decode_answer, load_tokenizer, model_flags,
                 model_settings, parse_lengths, pending, read_lines, rope_label, run_cli, sample_seed, share_and_load,
                 tasks_flag)
from longbench_tasks import CATEGORIES, NO_INPUT, TASKS, build_prompt, jieba_cut, score, truncate_middle
from model import UserError, read_config
from plots import score_table
from sample import answer


def generation(config, max_new_tokens):
    """The paper's settings for a task's max_new_tokens (sample.answer's): LLaDA in blocks of 64, the length rounded
    up to them, one token per step; Dream entropy / 0.2 / 0.95 (top_k 50), a step per token; LLaMA greedy (its exact
    KV cache)."""
    if config.model_type == "dream":
        n = max_new_tokens
        return dict(gen_length=n, steps=n, alg="entropy", temperature=0.2, top_p=0.95, top_k=50)
    n = max_new_tokens if config.causal else -(-max_new_tokens // 64) * 64
    return dict(gen_length=n, steps=n, block_length=n if config.causal else 64, threshold=None,
                cache="prefix" if config.causal else None)


def read_task(data, task):
    """The records of <data>/<task>.jsonl (LongBench's data.zip, unzipped), checked for the fields the prompt needs."""
    path = Path(data) / f"{task}.jsonl"
    if not path.is_file():
        raise UserError(f"no {path.name} in {data}" if Path(data).is_dir() else f"data folder not found: {data}")
    records = read_lines(path)
    need = ["context", "answers"] + ["input"] * (task not in NO_INPUT) + ["all_classes"] * (task in ("trec", "lsht"))
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or any(k not in r for k in need):
            raise UserError(f"{path}, line {n}: a LongBench record needs the fields {', '.join(need)}")
    return records


def summary(rows):
    """{name: score} for one results file and budget: each task (100 x its mean), the six category means, and
    OpenCompass's longbench_en (English and code tasks), longbench_zh and longbench (the mean of the categories)."""
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["score"])
    out = {t: 100 * sum(v) / len(v) for t, v in by_task.items()}

    def mean(names):
        found = [out[n] for n in names if out.get(n) is not None]
        return sum(found) / len(found) if found else None
    out |= {c: mean([t for t in TASKS if TASKS[t][1] == c]) for c in CATEGORIES}
    out |= dict(longbench_en=mean([t for t in TASKS if TASKS[t][0] != "zh"]),
                longbench_zh=mean([t for t in TASKS if TASKS[t][0] == "zh"]), longbench=mean(CATEGORIES))
    return {k: v for k, v in out.items() if v is not None}


def report(paths, out):
    """The table of one or more results files, a column per (file, budget), printed and drawn to `out`."""
    columns, tables = [], []
    for path in paths:
        rows = read_lines(Path(path))
        if not rows:
            raise UserError(f"no results in {path}")
        for budget in sorted({r["max_len"] for r in rows}):
            s = rows[0]["settings"]
            columns.append(f"{s['model']}\n{rope_label(s)}\n{budget}" if len(paths) > 1 else str(budget))
            tables.append(summary([r for r in rows if r["max_len"] == budget]))
    tasks = [t for c in CATEGORIES for t in TASKS if TASKS[t][1] == c and any(t in tb for tb in tables)]
    names = [n for n in CATEGORIES + ["longbench_en", "longbench_zh", "longbench"] if any(n in tb for tb in tables)]
    print(f"{'':<22}" + "".join(f"{c.replace(chr(10), ' '):>{max(10, len(c) + 2)}}" for c in columns))
    for name in tasks + names:
        print(f"{name:<22}" + "".join(f"{tb[name]:>{max(10, len(c) + 2)}.2f}" if name in tb else
                                      f"{'-':>{max(10, len(c) + 2)}}" for tb, c in zip(tables, columns)))
    grid = torch.tensor([[tb.get(n, float("nan")) for tb in tables] for n in tasks + names])
    s = read_lines(Path(paths[0]))[0]["settings"]
    title = f"LongBench (LongLLaDA Table 1): {s['model']}, {rope_label(s)}" if len(paths) == 1 else "LongBench"
    score_table(grid, tasks + names, columns, len(tasks), title, out, xlabel="truncation budget (tokens)")
    print(f"wrote {out}")


def main():
    p = ArgumentParser("LongBench v1 as LongLLaDA ran it through OpenCompass (Table 1).")
    model_flags(p)
    p.add_argument("--data", help="folder with LongBench's <task>.jsonl files (data.zip of THUDM/LongBench, unzipped)")
    p.add_argument("--tasks", type=tasks_flag(TASKS), default=",".join(TASKS), help="comma-separated tasks (default: "
                   "all 21)")
    p.add_argument("--max-len", default="3500", type=parse_lengths, help="truncation budgets in prompt tokens: 3500 "
                   "(the paper's 4k runs), 7500 (8k), or both, 3500,7500")
    p.add_argument("--limit", type=count, help="only the first N records of each task")
    p.add_argument("--seed", type=int, default=0, help="seed of the samplers' draws (Dream samples at 0.2)")
    p.add_argument("--out", help="results JSONL (default: results/longbench_<model>_rope<scale>[_<method>].jsonl)")
    p.add_argument("--table", nargs="+", metavar="JSONL", help="only print and draw the table of these results files")
    args = p.parse_args()
    if args.table:
        return report(args.table, Path(args.out or args.table[0]).with_suffix(".png"))
    tasks = args.tasks
    if not args.model or not args.data:
        raise UserError("need --model (a checkpoint folder)" if not args.model else "need --data (the folder of "
                        "LongBench's <task>.jsonl files)")
    if any(TASKS[t][2] in ("qa_f1_zh", "rouge_zh") for t in tasks):
        jieba_cut("")  # the Chinese metrics need jieba: refused now, not after hours of generation
    data = {t: read_task(args.data, t)[:args.limit] for t in tasks}
    config, tok = read_config(args.model), load_tokenizer(args.model)
    settings, name = model_settings(args)
    settings |= dict(seed=args.seed, protocol="OpenCompass 0.4.2")
    out = Path(args.out or f"results/longbench_{name}.jsonl")
    todo = pending(out, settings, [(n, t, i) for n in args.max_len for t in tasks for i in range(len(data[t]))],
                   key=lambda r: (r["max_len"], r["task"], r["index"]))
    rank, world, todo, model = share_and_load(args, todo, max(args.max_len) + 512)

    def sample(item):
        budget, task, i = item
        record = data[task][i]
        ids = truncate_middle(tok.encode(build_prompt(task, record)).ids, budget)  # the tokenizer's defaults
        out_ids = answer(model, torch.tensor([ids], device=model.device), generation(config, TASKS[task][3]),
                         sample_seed(args.seed, *item))[0, len(ids):]
        # LLaDA's wrapper decodes the whole answer, special tokens skipped; Dream's and LLaMA's stop at the EOS
        prediction = tok.decode(out_ids.tolist()) if config.model_type == "llada" else decode_answer(tok, model,
                                                                                                      out_ids)
        return dict(settings=settings, max_len=budget, task=task, index=i, id=record.get("_id"),
                    prediction=prediction, answers=record["answers"],
                    score=score(task, prediction, record["answers"], record.get("all_classes")))
    append_rows(todo, sample, out, lambda r: f"{r['task']} at {r['max_len']}: {100 * r['score']:.0f}", rank, world)
    all_gather(None, world)  # every rank has finished; rank 0 reports on the whole file
    if rank == 0 and out.exists():
        report([out], out.with_suffix(".png"))


if __name__ == "__main__":
    run_cli(main)
