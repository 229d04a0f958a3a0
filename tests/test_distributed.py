"""torchrun on CPU (gloo): the grid and the curve split over 2 processes give the single-process results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, *args):
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def killed_part_way(cmd, args, progress):
    """Start cmd, then SIGKILL it and its workers once progress() >= 2, as a crash of the node would.
    (torchrun starts each worker in a session of its own, so the workers are found by their command line.)"""
    log = open(Path(args[-1]).with_suffix(".log"), "w")  # read on failure
    p = subprocess.Popen([*cmd, *map(str, args)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while progress() < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    marker = str(args[-1]).encode()  # the --out path: unique to this run
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone already
            pass
    p.wait()
    log.close()
    time.sleep(0.2)
    return progress()


def test_plain_python_initialises_nothing(monkeypatch):
    import torch
    from cli import distributed
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed("cpu") == (0, 1, "cpu") and not torch.distributed.is_initialized()


def niah_rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [(r["length"], r["depth"], r["repeat"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing duplicated
    return {k: (r["prediction"], r["score"]) for k, r in zip(keys, rows)}


def test_niah_under_torchrun_killed_and_resumed(ckpt_bytes, tmp_path):
    args = ["--model", ckpt_bytes, "--lengths", "700,900", "--depths", "0:100:50", "--repeats", 4,
            "--steps", 8, "--gen-length", 8, "--block-length", 8, "--device", "cpu"]
    single, multi = tmp_path / "single.jsonl", tmp_path / "multi.jsonl"
    assert run_script("eval_niah.py", *args, "--out", single).returncode == 0
    expected = niah_rows(single)
    assert len(expected) == 24
    lines = lambda: len(multi.read_text().splitlines()) if multi.exists() else 0  # noqa: E731
    done = killed_part_way(TORCHRUN + ["eval_niah.py"], [*args, "--out", multi], lines)
    assert 0 < done < 24, multi.with_suffix(".log").read_text()
    r = run(TORCHRUN + ["eval_niah.py"], *args, "--out", multi)
    assert r.returncode == 0, r.stderr
    assert niah_rows(multi) == expected  # every sample once, each identical to the single-process one
    assert multi.with_suffix(".png").exists()


def test_ppl_under_torchrun_killed_and_resumed(ckpt_tok, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(f"w{4 + (i * 7) % 300}" for i in range(1200)))
    args = ["--model", ckpt_tok, "--text", text, "--max-len", 1024, "--chunk", 32, "--mc", 8, "--device", "cpu"]
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    assert run_script("eval_ppl.py", *args, "--out", single).returncode == 0
    expected = json.loads(single.read_text())["chunks"]
    chunks = lambda: len(json.loads(multi.read_text())["chunks"]) if multi.exists() else 0  # noqa: E731
    done = killed_part_way(TORCHRUN + ["eval_ppl.py"], [*args, "--out", multi], chunks)
    assert 0 < done < len(expected), multi.with_suffix(".log").read_text()
    r = run(TORCHRUN + ["eval_ppl.py"], *args, "--out", multi)
    assert r.returncode == 0, r.stderr
    got = json.loads(multi.read_text())["chunks"]
    assert [c["length"] for c in got] == [c["length"] for c in expected]
    assert [c["nll"] for c in got] == pytest.approx([c["nll"] for c in expected], abs=1e-6)
    assert multi.with_suffix(".png").exists()
