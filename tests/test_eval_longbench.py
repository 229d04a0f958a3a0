"""LongBench (LongLLaDA Table 1): OpenCompass's scores, prompts and truncation against its golden cases, and
eval_longbench.py end to end on tiny checkpoints with a small data folder in LongBench's format."""
import json
import subprocess
import sys

import pytest
import torch

import eval_longbench
import longbench_tasks
from conftest import FIXTURES, LLADA, run_script
from longbench_tasks import TASKS, build_prompt, fuzz_ratio, rouge_l, score, truncate_middle
from model import UserError, read_config

CASES = json.loads((FIXTURES / "longbench" / "cases.json").read_text())


@pytest.mark.parametrize("case", CASES["score"], ids=lambda c: f"{c['task']}-{c['kind']}")
def test_scores_equal_opencompass(case):
    """Chinese cases need jieba (installed for the tests; README)."""
    got = score(case["task"], case["prediction"], case["answers"], case["all_classes"])
    assert got == pytest.approx(case["expected"], abs=1e-6)


@pytest.mark.parametrize("case", CASES["prompt"], ids=lambda c: c["task"])
def test_prompts_equal_opencompass(case):
    assert build_prompt(case["task"], case["record"]) == case["expected"]


def test_truncation_equals_the_wrapper():
    for case in CASES["truncate"]:
        assert truncate_middle(case["ids"], case["max_len"]) == case["expected"]
    ids = list(range(10))
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9] and truncate_middle(ids, 1) == [9]  # odd L: L ids, tail ceil
    assert truncate_middle(ids, 10) == ids


def test_the_task_table_matches_opencompass():
    assert len(TASKS) == 21 and sum(lang != "zh" for lang, *_ in TASKS.values()) == 16  # longbench_en
    for task, cfg in CASES["tasks"].items():
        assert TASKS[task][3] == cfg["max_out_len"]
        assert (task in longbench_tasks.FIRST_LINE) == (cfg["pred_postprocessor"] is not None)


def test_metric_quirks():
    # rouge: distinct words, '.' the only sentence break, and 0 (not an error) for an empty prediction
    assert rouge_l("the cat the cat", "the cat sat") == pytest.approx(2 * (1 * 2 / 3) / (1 + 2 / 3 + 1e-8))
    assert rouge_l("", "a b") == 0 and rouge_l("...", "a b") == 0
    long = " ".join(f"w{i}" for i in range(1000))
    assert rouge_l(long, long[:-1]) == 0  # a backtrack of ~1000 steps: the package's RecursionError
    # fuzzywuzzy + python-Levenshtein: 2 LCS / total, rounded half to even; two empty strings are equal
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("abc", "") == 0 and fuzz_ratio("abcd", "abce") == 75
    assert fuzz_ratio("ab", "abcdef") == 50 and fuzz_ratio("a", "abcdefg") == 25  # 25.0; 2/8 = .25
    # classification skips the class after a removed one: 'A' is removed, so 'B' (also inside the gold 'A B') stays
    assert score("trec", "A B", ["A B"], ["A", "B", "A B"]) == pytest.approx(1 / 2)  # 1 without the quirk


def test_chinese_tasks_need_jieba(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "jieba", None)  # as if not installed
    with pytest.raises(UserError, match="need the jieba package"):
        score("multifieldqa_zh", "工程师", ["工程师"])
    assert score("passage_retrieval_zh", "段落3", ["段落3"]) == 1.0  # the other Chinese tasks need nothing
    r = run_script("eval_longbench.py", "--model", LLADA / "ckpt", "--data", tmp_path, "--tasks", "vcsum")
    assert r.returncode == 2 and "jieba" in r.stderr and len(r.stderr.strip().splitlines()) == 1


CONTEXT = "The bridge was designed by the engineer Margaret Hale and opened in 1891. " * 6
RECORDS = {
    "narrativeqa": [dict(input="Who designed the bridge?", context=CONTEXT, answers=["Margaret Hale"]),
                    dict(input="When did it open?", context=CONTEXT + " {answers}", answers=["1891"])],
    "trec": [dict(input="Question: What is the capital of France?\nType:", answers=["City"],
                  context="Question: Who wrote Hamlet?\nType: Individual\n" * 4, all_classes=["City", "Individual"])],
    "passage_count": [dict(context="Paragraph 1: cats.\n\nParagraph 2: dogs.\n\n" * 3, answers=[2])],
    "lcc": [dict(context="def f(x):\n    return x + 1\n" * 4, answers=["    return x + 1"])]}


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for task, records in RECORDS.items():
        rows = [r | dict(length=60, dataset=task, language="en", _id=f"{task}{i}") | dict(all_classes=r.get(
            "all_classes")) | ({} if "input" in r else dict(input="")) for i, r in enumerate(records)]
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


TINY = ["--tasks", "narrativeqa,trec,passage_count,lcc", "--max-len", "150,250", "--device", "cpu"]


@pytest.mark.parametrize("family", ["llada", "llama"])
def test_end_to_end_rows_resume_and_table(ckpt_bytes, llama_copy, data, tmp_path, monkeypatch, family):
    model = ckpt_bytes if family == "llada" else llama_copy
    out = tmp_path / "lb.jsonl"
    r = run_script("eval_longbench.py", "--model", model, "--data", data, *TINY, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 5 and {r["max_len"] for r in rows} == {150, 250}
    assert all(0 <= r["score"] <= 1 and r["answers"] for r in rows)
    assert "longbench_en" in r.stdout and "Few-shot" in r.stdout and out.with_suffix(".png").exists()
    calls = []
    monkeypatch.setattr(eval_longbench, "answer", lambda *a: calls.append(1))
    r = run_script("eval_longbench.py", "--model", model, "--data", data, *TINY, "--out", out)
    assert r.returncode == 0 and calls == [] and len(out.read_text().splitlines()) == 10  # resumed: nothing to do
    r = run_script("eval_longbench.py", "--model", model, "--data", data, *TINY, "--out", out, "--rope-scale", 4)
    assert r.returncode == 2 and "other settings" in r.stderr


def test_the_model_is_fed_the_truncated_prompt(ckpt_bytes, data, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(eval_longbench, "answer", lambda model, ids, s, seed: seen.append((ids[0].tolist(), s)) or
                        torch.cat([ids, torch.tensor([[ord("A"), 381, ord("B")]])], 1))  # A, EOS, B
    out = tmp_path / "lb.jsonl"
    assert run_script("eval_longbench.py", "--model", ckpt_bytes, "--data", data, "--tasks", "narrativeqa",
                      "--max-len", 101, "--device", "cpu", "--limit", 1, "--out", out).returncode == 0
    (ids, s), = seen
    full = list(build_prompt("narrativeqa", json.loads((data / "narrativeqa.jsonl").read_text().splitlines()[0])
                             ).encode())  # the byte tokenizer: a byte an id
    assert len(full) > 101 and ids == full[:50] + full[-51:]
    assert s == dict(gen_length=128, steps=128, block_length=64, cache=None, threshold=None)  # 128: 64 x 2
    assert json.loads(out.read_text())["prediction"] == "AB"  # LLaDA's wrapper decodes it all, specials skipped


def test_generation_settings_per_family(llama_copy, dream_copy):
    assert eval_longbench.generation(read_config(LLADA / "ckpt"), 32)["gen_length"] == 64  # rounded up to a block
    assert eval_longbench.generation(read_config(llama_copy), 32) == dict(
        gen_length=32, steps=32, block_length=32, cache="prefix", threshold=None)  # greedy, exact KV cache
    assert eval_longbench.generation(read_config(dream_copy), 32) == dict(
        gen_length=32, steps=32, alg="entropy", temperature=0.2, top_p=0.95, top_k=50)


def test_dream_runs(dream_copy, data, tmp_path):
    out = tmp_path / "d.jsonl"
    r = run_script("eval_longbench.py", "--model", dream_copy, "--data", data, "--tasks", "trec,lcc", "--max-len", 150,
                   "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr and len(out.read_text().splitlines()) == 2


def test_table_of_several_files(ckpt_bytes, data, tmp_path):
    outs = [tmp_path / f"lb{s}.jsonl" for s in (1, 4)]
    for scale, out in zip((1, 4), outs):
        assert run_script("eval_longbench.py", "--model", ckpt_bytes, "--data", data, "--tasks", "trec,lcc",
                          "--max-len", 150, "--device", "cpu", "--rope-scale", scale, "--out", out).returncode == 0
    png = tmp_path / "both.png"
    r = run_script("eval_longbench.py", "--table", *outs, "--out", png)
    assert r.returncode == 0 and png.exists() and "rope_scale 4" in r.stdout and "rope_scale 1" in r.stdout


@pytest.mark.parametrize("make,args,msg", [
    (None, ["--data", "nowhere"], "data folder not found: nowhere"),
    (None, ["--tasks", "qasper"], "no qasper.jsonl in"),
    (None, ["--tasks", "hotpotqa,bogus_task"], "unknown task 'bogus_task'; the tasks are narrativeqa, qasper"),
    (None, ["--limit", "0"], "argument --limit: expected an integer >= 1, got '0'"),
    (None, ["--max-len", "0"], "argument --max-len"),
    ("narrativeqa.jsonl", [], "narrativeqa.jsonl, line 2: not a JSON line"),
    ("lcc.jsonl", ["--tasks", "lcc"], "lcc.jsonl, line 1: a LongBench record needs the fields context, answers")])
def test_bad_input_gets_one_line(ckpt_bytes, data, make, args, msg):
    if make == "narrativeqa.jsonl":
        (data / make).write_text('{"input": "q", "context": "c", "answers": ["a"]}\n{not json\n')
    elif make:
        (data / make).write_text('{"context": "c"}\n')
    r = run_script("eval_longbench.py", "--model", ckpt_bytes, "--data", data, "--tasks", "narrativeqa", *args)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_torchrun_equals_one_process(ckpt_bytes, data, tmp_path):
    from conftest import ROOT
    args = ["--model", ckpt_bytes, "--data", data, *TINY]
    single, multi = tmp_path / "single.jsonl", tmp_path / "multi.jsonl"
    assert run_script("eval_longbench.py", *args, "--out", single).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "eval_longbench.py", *map(str, args), "--out", str(multi)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr

    def rows(path):
        return sorted((r["max_len"], r["task"], r["index"], r["prediction"], r["score"])
                      for r in map(json.loads, path.read_text().splitlines()))
    assert rows(multi) == rows(single) and len(rows(multi)) == 10
