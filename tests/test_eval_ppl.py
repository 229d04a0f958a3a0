import json
import math
import statistics

import pytest
import torch

from conftest import LLADA, run_script
from eval_ppl import chunk_nll, curve
from model import load_model


def test_monte_carlo_converges_to_the_exact_elbo(tiny, expected):
    exact = expected["elbo.nll_per_token"].item()
    g = torch.Generator().manual_seed(0)
    estimates = [chunk_nll(tiny, expected["elbo.prefix"], expected["elbo.answer"], mc_num=200, batch=64, generator=g)
                 for _ in range(40)]
    se = statistics.stdev(estimates) / math.sqrt(len(estimates))
    assert se < 0.02  # 8000 samples: a small enough interval for the check to mean something
    assert abs(statistics.mean(estimates) - exact) < 4 * se


def test_zero_lm_head_gives_the_vocabulary_size():
    model = load_model(LLADA / "ckpt", device="cpu")
    model.transformer.ff_out.weight.zero_()
    ids = torch.randint(0, 370, (200,))
    chunks = [dict(length=(i + 1) * 32, nll=chunk_nll(model, ids[:i * 32], ids[i * 32:(i + 1) * 32], mc_num=4))
              for i in range(1, 6)]
    _, ppl = curve(dict(settings={}, chunks=chunks))
    assert all(abs(p - 384) < 384 * 1e-6 for p in ppl)


def test_same_seed_same_number(tiny, expected):
    args = (tiny, expected["elbo.prefix"], expected["elbo.answer"], 8)
    a, b, c = (chunk_nll(*args, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert a == b and a != c
    # batching changes the memory, not the draws
    assert abs(chunk_nll(*args, batch=3, generator=torch.Generator().manual_seed(5)) - a) < 1e-6


def test_curve_is_cumulative_geometric_mean_or_each_point():
    chunks = [dict(length=64, nll=1.0), dict(length=96, nll=3.0)]
    lengths, ppl = curve(dict(settings={}, chunks=chunks))
    assert lengths == [64, 96] and ppl == pytest.approx([math.e, math.e ** 2])
    assert curve(dict(settings=dict(at=[64, 96]), chunks=chunks))[1] == pytest.approx([math.e, math.e ** 3])


def run_cli(*args):
    return run_script("eval_ppl.py", *args)


@pytest.fixture
def text(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text(" ".join(f"w{4 + (i * 7) % 300}" for i in range(400)))
    return f


def test_cli_end_to_end_resume_and_compare(ckpt_tok, text, tmp_path):
    out = tmp_path / "r" / "base.json"
    args = ["--model", ckpt_tok, "--text", text, "--max-len", 256, "--chunk", 32, "--mc", 4, "--device", "cpu"]
    r = run_cli(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    run = json.loads(out.read_text())
    assert [c["length"] for c in run["chunks"]] == list(range(64, 257, 32))
    assert run["settings"]["mc"] == 4 and run["train_len"] == 64
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "chunk 7/7" in r.stderr and "ETA" in r.stderr
    # Interrupted run: drop the last chunks; a rerun recomputes exactly them, with the same numbers.
    full = run["chunks"]
    out.write_text(json.dumps(dict(run, chunks=full[:3])))
    r = run_cli(*args, "--out", out)
    assert r.returncode == 0 and "chunk 4/7" in r.stderr and "chunk 3/7" not in r.stderr
    assert json.loads(out.read_text())["chunks"] == full
    # Other settings are refused, never mixed in.
    r = run_cli(*args[:-4], "--mc", 2, "--device", "cpu", "--out", out)
    assert r.returncode == 2 and "other settings" in r.stderr
    ntk = tmp_path / "r" / "ntk.json"
    assert run_cli(*args, "--rope-scale", 4, "--out", ntk).returncode == 0
    r = run_cli("--compare", out, ntk, "--out", tmp_path / "both.png")
    assert r.returncode == 0 and (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,msg", [(["--max-len", 1000], "has 400 tokens"), (["--chunk", 0], "integer >= 1"),
                                       (["--mc", 0], "integer >= 1"),
                                       (["--max-len", 100, "--chunk", 64], "at least 2 chunks (128 tokens)"),
                                       (["--at", "96,100", "--chunk", 32], "a multiple of --chunk (32)"),
                                       (["--at", "32", "--chunk", 32], "at least 2 chunks"),
                                       (["--at", "1k"], "has 400 tokens")])
def test_cli_bad_input(ckpt_tok, text, tmp_path, extra, msg):
    r = run_cli("--model", ckpt_tok, "--text", text, "--max-len", 256, "--out", tmp_path / "x.json", *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr


def test_at_scores_exactly_the_chunks_asked_for_as_the_full_run_does(ckpt_tok, text, tmp_path):
    full, at = tmp_path / "full.json", tmp_path / "at.json"
    args = ["--model", ckpt_tok, "--text", text, "--chunk", 32, "--mc", 4, "--device", "cpu"]
    assert run_cli(*args, "--max-len", 256, "--out", full).returncode == 0
    r = run_cli(*args, "--at", "256,96,160", "--out", at)
    assert r.returncode == 0, r.stderr
    run, whole = json.loads(at.read_text()), {c["length"]: c["nll"] for c in json.loads(full.read_text())["chunks"]}
    assert [c["length"] for c in run["chunks"]] == [96, 160, 256] and run["settings"]["max_len"] == 256
    assert all(c["nll"] == whole[c["length"]] for c in run["chunks"])  # the same computation, the same masks
    assert "chunk 7/7" in r.stderr and "chunk 3/7" not in r.stderr  # chunk 7 ends at 256: 3 chunks, not 7
    # each point is its own perplexity, not the cumulative curve
    assert f"96 {math.exp(whole[96]):.3f}, 160 {math.exp(whole[160]):.3f}" in r.stdout
    out = json.loads(at.read_text())
    at.write_text(json.dumps(dict(out, chunks=out["chunks"][:1])))  # interrupted after the first point
    r = run_cli(*args, "--at", "256,96,160", "--out", at)
    assert r.returncode == 0 and json.loads(at.read_text())["chunks"] == run["chunks"]
    assert "chunk 4/7" in r.stderr and "chunk 2/7" not in r.stderr  # only the two points left
    assert run_cli(*args, "--at", "96,160", "--out", at).returncode == 2  # other lengths: other settings
    r = run_cli("--compare", full, at, "--out", tmp_path / "both.png")
    assert r.returncode == 0 and (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_empty_text(ckpt_tok, tmp_path):
    (tmp_path / "e.txt").write_text("")
    r = run_cli("--model", ckpt_tok, "--text", tmp_path / "e.txt", "--out", tmp_path / "x.json")
    assert r.returncode == 2 and "has 0 tokens" in r.stderr
