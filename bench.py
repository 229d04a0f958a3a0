"""Reproducible measurements for the README: each compares this code against the naive way in one run.

  python bench.py load     peak memory of loading a generated ~330 MB checkpoint to CPU
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import LLaDA, LLaDAConfig, load_model


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def reset_peak_rss():
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def write_checkpoint(path, config, n_shards=3):
    """A random bf16 checkpoint in the official layout: config.json, shards and their index."""
    torch.manual_seed(0)
    model = LLaDA(config).to(torch.bfloat16)
    state = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for i in range(n_shards):  # round-robin, so one block's tensors are spread over shards as in 8B
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::n_shards]}
        save_file(part, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = asdict(config) | dict(block_type="llama", weight_tying=False, model_type="llada")
    (path / "config.json").write_text(json.dumps(cfg))
    return sum(v.numel() for v in state.values())


def load_child(way, path, dtype):
    """Runs in a fresh process, so that its peak RSS is this load's alone."""
    dtype = getattr(torch, dtype)
    reset_peak_rss()
    base, base_anon = rss_mb("VmRSS"), rss_mb("RssAnon")
    t0 = time.time()
    if way == "this":
        model = load_model(path, device="cpu", dtype=dtype)
    else:  # the naive way: random init of a full model, then a full state dict, then copy into it
        config = LLaDAConfig(**{k: v for k, v in json.loads((Path(path) / "config.json").read_text()).items()
                                if k in LLaDAConfig.__dataclass_fields__})
        model = LLaDA(config).to(dtype)
        state = {}
        for f in sorted(Path(path).glob("model-*.safetensors")):
            state.update({k.removeprefix("model."): v for k, v in load_file(f).items()})
        model.load_state_dict(state)
        del state
    print(json.dumps(dict(seconds=time.time() - t0, peak_mb=rss_mb("VmHWM") - base, anon_mb=rss_mb("RssAnon") - base_anon)))


def bench_load(args):
    config = LLaDAConfig(d_model=1024, n_heads=8, n_kv_heads=8, n_layers=8, mlp_hidden_size=2816,
                         vocab_size=32000, embedding_size=32000)
    with tempfile.TemporaryDirectory() as tmp:
        n = write_checkpoint(Path(tmp), config)
        print(f"checkpoint: {n / 1e6:.0f}M parameters, {2 * n / 2**20:.0f} MiB in bf16, 3 shards")
        for dtype, size in [("bfloat16", 2), ("float32", 4)]:
            for way in ["this", "naive"]:
                code = f"import bench; bench.load_child({way!r}, {tmp!r}, {dtype!r})"
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout)
                print(f"  {way:>5} to {dtype:<8}: peak RSS +{r['peak_mb']:6.0f} MiB = "
                      f"{r['peak_mb'] / (size * n / 2**20):.2f} x the weights (anonymous +{r['anon_mb']:.0f} MiB after), {r['seconds']:.2f}s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["load"], help="which measurement to run")
    args = p.parse_args()
    {"load": bench_load}[args.what](args)
