"""The benchmarks' own code paths (not their timings): `bench.py gpu` must work when a GPU is finally at hand."""
import subprocess
import sys

import pytest
import torch

import bench
from conftest import ROOT
from model import LLaDAConfig


def test_gpu_bench_runs_on_a_small_shape(capsys):
    config = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=160, vocab_size=126464)
    bench.bench_gpu(None, config=config, lengths=(128, 256), sample_len=200, device="cpu")
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out if "forward at" in line] == ["128", "256"]
    assert any(line.strip().startswith("exact") and "32 forwards" in line for line in out)
    assert any(line.strip().startswith("dual cache") for line in out)


def test_random_model_is_made_on_the_device_without_a_cpu_copy():
    config = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=160, vocab_size=384,
                         embedding_size=384)
    model = bench.random_model(config, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.transformer.ln_f.weight, torch.ones(64, dtype=torch.bfloat16))
    assert 0.015 < model.transformer.blocks[0].q_proj.weight.float().std() < 0.025


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_bench_without_a_gpu_is_one_line():
    r = subprocess.run([sys.executable, "bench.py", "gpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "bench.py gpu needs a CUDA GPU; this machine has none\n"


def test_cache_bench_runs_on_a_trained_checkpoint(tmp_path, capsys):
    """`bench.py cache --model DIR`: the caches on a train.py checkpoint, 16 held-out prompts."""
    import argparse
    from conftest import run_script
    text = tmp_path / "t.txt"
    text.write_text("The old ferryman carried the weathered lantern near the harbour. " * 400)
    out = tmp_path / "tiny"
    assert run_script("train.py", "--kind", "diffusion", "--text", text, "--steps", 2, "--batch", 2, "--out",
                      out).returncode == 0
    bench.bench_cache(argparse.Namespace(model=str(out)))
    lines = capsys.readouterr().out.splitlines()
    assert "16 prompts of 96 held-out tokens" in lines[0] and len(lines) == 5
    assert lines[1].split()[0] == "exact" and "100% of the exact run's tokens" in lines[1]
