"""Reproducible measurements for the README: each compares this code against the naive way in one run.

  python bench.py load     peak memory of loading a generated ~330 MB checkpoint to CPU
  python bench.py sample   lean sampling (LM head on the block only) vs the official full-logits loop
  python bench.py ppl      batched ELBO with the LM head on masked positions vs one full-logits forward per sample
  python bench.py cache    exact sampling vs Fast-dLLM's prefix / dual caches and parallel decoding (CPU)
  python bench.py cache --model DIR    the same on a model train.py trained (confident predictions)
  python bench.py gpu      LLaDA-8B-shaped random model on one GPU: forward at 4k-32k, a 24k sample exact vs dual
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
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cli import load_tokenizer
from eval_ppl import chunk_nll, draw_masks
from model import LLaDA, LLaDAConfig, load_model, read_config
from sample import generate, get_num_transfer_tokens


def rss_mb(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def reset_peak_rss():
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def measure(name, fn):
    """fn() with its wall time and the peak RSS it added, printed on one line; returns (result, seconds)."""
    reset_peak_rss()
    base, t0 = rss_mb("VmRSS"), time.time()
    result = fn()
    seconds = time.time() - t0
    print(f"  {name:<41}: {seconds:6.2f}s, peak RSS +{rss_mb('VmHWM') - base:6.0f} MiB")
    return result, seconds


def tiny_model_with_real_vocab():
    """2 layers of width 128 but LLaDA's 126464-token vocabulary: the LM head is what the comparisons are about."""
    torch.manual_seed(0)
    return LLaDA(LLaDAConfig(d_model=128, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=256)).eval()


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
        model = LLaDA(read_config(path)).to(dtype)
        state = {}
        for f in sorted(Path(path).glob("model-*.safetensors")):
            state.update({k.removeprefix("model."): v for k, v in load_file(f).items()})
        model.load_state_dict(state)
        del state
    seconds = time.time() - t0
    print(json.dumps(dict(seconds=seconds, peak_mb=rss_mb("VmHWM") - base, anon_mb=rss_mb("RssAnon") - base_anon)))


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
                      f"{r['peak_mb'] / (size * n / 2**20):.2f} x the weights "
                      f"(anonymous +{r['anon_mb']:.0f} MiB after), {r['seconds']:.2f}s")


@torch.no_grad()
def official_generate(model, prompt, steps, gen_length, block_length, mask_id):
    """LLaDA's generate.py loop at temperature 0, low_confidence, no cfg: full logits and softmax every step."""
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id)], 1)
    steps //= gen_length // block_length
    for b in range(gen_length // block_length):
        end = prompt.shape[1] + (b + 1) * block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, end - block_length:end] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)  # (1, T, V): every position, as the official code computes it
            x0 = torch.argmax(logits, dim=-1)
            x0_p = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None])[..., 0]
            x0_p[:, end:] = -torch.inf
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            select = torch.topk(confidence[0], k=int(num_transfer_tokens[0, i])).indices
            x[0, select] = x0[0, select]
    return x


def bench_sample(args):
    model = tiny_model_with_real_vocab()
    config = model.config
    prompt = torch.randint(0, 126000, (1, 2048))
    kw = dict(steps=32, gen_length=32, block_length=32)
    print(f"tiny LLaDA with the real vocabulary ({config.embedding_size}), {prompt.shape[1]}-token prompt, "
          f"gen 32 / block 32 / steps 32, fp32 on CPU")
    official, _ = measure("official (full logits)",
                          lambda: official_generate(model, prompt, mask_id=config.mask_token_id, **kw))
    this, _ = measure("this (block logits)", lambda: generate(model, prompt, **kw))
    print(f"  same tokens: {torch.equal(official, this)}")
    T, V = 24576 + 32, config.embedding_size
    print(f"LLaDA-8B at 24k context: full logits {T * V * 2 / 2**30:.1f} GiB in bf16 per forward (plus the same "
          f"again for the softmax), block logits {32 * V * 2 / 2**20:.0f} MiB")


@torch.no_grad()
def official_chunk_nll(model, prefix, answer, mc_num, mask_id, generator):
    """The official estimator's way: one sample per forward, full logits. Same draws as eval_ppl.chunk_nll."""
    P, total = len(prefix), 0.0
    for m in draw_masks(mc_num, len(answer), generator):
        x = torch.cat([prefix, answer])[None].clone()
        x[0, P:][m] = mask_id
        logits = model(x)[0, P:]  # (L, V) of the full (P + L, V)
        total += F.cross_entropy(logits[m], answer[m], reduction="sum").item() / m.sum().item()
    return total / mc_num


def bench_ppl(args):
    model = tiny_model_with_real_vocab()
    ids = torch.randint(0, 126000, (2048 + 4 * 64,))
    chunks = [(ids[:2048 + 64 * i], ids[2048 + 64 * i:2048 + 64 * (i + 1)]) for i in range(4)]
    print("tiny LLaDA with the real vocabulary, 4 chunks of 64 at a ~2k prefix, 8 samples each, fp32 on CPU")
    def each_chunk(nll):  # the same seed per chunk for both ways, so the same masks
        return lambda: [nll(p, a, torch.Generator().manual_seed(i)) for i, (p, a) in enumerate(chunks)]

    mask_id = model.config.mask_token_id
    v_off, t_off = measure("official (1 sample/forward, full logits)",
                           each_chunk(lambda p, a, g: official_chunk_nll(model, p, a, 8, mask_id, g)))
    v_this, t_this = measure("this (batched, masked rows only)",
                             each_chunk(lambda p, a, g: chunk_nll(model, p, a, 8, generator=g)))
    diff = max(abs(a - b) for a, b in zip(v_off, v_this))
    print(f"  speed-up {t_off / t_this:.1f}x; largest difference of chunk values {diff:.1e} nats")


def random_model(config, device, dtype):
    """Random weights (normal, std 0.02; norms 1) made directly on `device` in `dtype`: no checkpoint, no CPU copy."""
    with torch.device("meta"):
        model = LLaDA(config).to(dtype)
    model.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        p.fill_(1) if "norm" in name or "ln_f" in name else p.normal_(0, 0.02, generator=gen)
    return model


def sample_ways(model, prompt, ways, clock=time.time):
    """generate() once per (name, cache, threshold): seconds, forwards, and the share of answer tokens equal to
    the first way's, one line each."""
    calls, first = [], None
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    for name, cache, threshold in ways:
        calls.clear()
        t0 = clock()
        out = generate(model, prompt, steps=32, gen_length=32, block_length=32, cache=cache, threshold=threshold)
        seconds = clock() - t0
        first = out if first is None else first
        same = (out[:, -32:] == first[:, -32:]).float().mean().item()
        print(f"  {name:<26}: {seconds:7.2f}s, {len(calls):2d} forwards, {same:5.0%} of the exact run's tokens")
    hook.remove()


def bench_cache(args):
    """A body-dominated model: 6 layers of width 256 with the real vocabulary, random weights; or, with --model, a
    trained checkpoint (train.py), on 16 prompts of 96 tokens of its heldout.txt: a model that is actually confident."""
    ways = [("exact", None, None), ("prefix cache", "prefix", None), ("dual cache", "dual", None),
            ("dual cache + threshold 0.9", "dual", 0.9)]
    if args.model:
        model, text = load_model(args.model, "cpu"), (Path(args.model) / "heldout.txt").read_text(encoding="utf-8")
        ids = load_tokenizer(args.model).encode(text).ids
        stride = (len(ids) - 96) // 16
        prompt = torch.tensor([ids[i * stride:i * stride + 96] for i in range(16)])  # (16, 96), spread over the text
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, trained at "
              f"{model.config.max_sequence_length}; 16 prompts of 96 held-out tokens, gen 32 / block 32 / steps 32")
        return sample_ways(model, prompt, ways)
    config = LLaDAConfig(d_model=256, n_heads=4, n_kv_heads=4, n_layers=6, mlp_hidden_size=704)
    model = random_model(config, "cpu", torch.float32)
    prompt = torch.randint(0, 126000, (1, 2048), generator=torch.Generator().manual_seed(0))
    print(f"LLaDA, 6 layers, d_model 256, vocab {config.vocab_size}, random weights, fp32 on CPU; "
          f"{prompt.shape[1]}-token prompt, gen 32 / block 32 / steps 32")
    sample_ways(model, prompt, ways)


def cuda_clock():
    torch.cuda.synchronize()
    return time.time()


def bench_gpu(args, config=None, lengths=(4096, 8192, 16384, 24576, 32768), sample_len=24576, device="cuda"):
    """LLaDA-8B's shape (the config defaults) with random bf16 weights made on the GPU: one forward per length
    (LM head on 32 rows) with its achieved TFLOP/s and peak memory, then a NIAH-shaped sample, exact vs dual."""
    if device == "cuda" and not torch.cuda.is_available():
        return print("bench.py gpu needs a CUDA GPU; this machine has none")
    config, cuda = config or LLaDAConfig(), device == "cuda"
    clock = cuda_clock if cuda else time.time
    model = random_model(config, device, torch.bfloat16 if cuda else torch.float32)
    body = sum(p.numel() for p in model.transformer.blocks.parameters())  # the weights every token multiplies
    print(f"LLaDA-8B shape: {body / 1e9:.2f}B parameters in the blocks, random {model.transformer.wte.weight.dtype} "
          f"weights on {torch.cuda.get_device_name() if cuda else device}")
    ids = torch.randint(0, 126000, (1, max(lengths + (sample_len,))), generator=torch.Generator().manual_seed(0))
    model(ids[:, :256].to(device), logits_at=slice(-1, None))  # warm-up: kernels load and tune here, not in 4k's time
    for T in lengths:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = clock()
        model(ids[:, :T].to(device), logits_at=slice(-32, None))
        seconds = clock() - t0
        flops = 2 * body * T + 4 * config.n_layers * T ** 2 * config.d_model
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        print(f"  forward at {T:>6} tokens: {seconds:6.2f}s, {flops / seconds / 1e12:6.1f} TFLOP/s{peak}")
    print(f"NIAH-shaped sample: {sample_len}-token prompt, gen 32 / block 32 / steps 32")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sample_ways(model, ids[:, :sample_len].to(device), [("exact", None, None), ("dual cache", "dual", None)], clock)
    if cuda:
        print(f"  peak memory of the two samples {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["load", "sample", "ppl", "cache", "gpu"], help="which measurement to run")
    p.add_argument("--model", help="cache: a trained checkpoint folder (train.py) instead of random weights")
    args = p.parse_args()
    benches = dict(load=bench_load, sample=bench_sample, ppl=bench_ppl, cache=bench_cache, gpu=bench_gpu)
    benches[args.what](args)


if __name__ == "__main__":
    main()
