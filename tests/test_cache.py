"""Fast-dLLM's approximate caches and parallel decoding, and the causal baseline's exact KV cache."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLADA, LLAMA, run_script
from model import UserError, load_model
from sample import generate

FAST = json.loads((LLADA / "fastdllm.json").read_text())


@pytest.fixture(scope="module")
def fast():
    return load_file(LLADA / "fastdllm.safetensors")


def counting_forwards(model):
    """A list that gets one entry per model forward (the number of forward passes, Fast-dLLM's NFE)."""
    calls = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(1))


@pytest.mark.parametrize("i", sorted(FAST))
def test_fastdllm_tokens_and_forward_counts(tiny, fast, i):
    c = FAST[i]
    calls, hook = counting_forwards(tiny)
    try:
        out = generate(tiny, fast[f"{i}.prompt"], steps=c["steps"], gen_length=c["gen_length"],
                       block_length=c["block_length"], cache=c["cache"], threshold=c["threshold"])
    finally:
        hook.remove()
    assert torch.equal(out, fast[f"{i}.out"])
    assert len(calls) <= fast[f"{i}.nfe"].item() == c["nfe"]


def test_fixtures_are_approximations(tiny, fast):
    """The cached cases differ from the exact sampler somewhere, so the parity above pins the approximation."""
    differ = 0
    for i, c in FAST.items():
        if c["cache"] and c["threshold"] is None:
            exact = generate(tiny, fast[f"{i}.prompt"], steps=c["steps"], gen_length=c["gen_length"],
                             block_length=c["block_length"])
            differ += not torch.equal(exact, fast[f"{i}.out"])
    assert differ > 0


@pytest.mark.parametrize("feed", ["prefix", "dual"])
def test_cached_forward_equals_full_forward_when_nothing_is_stale(tiny, expected, feed):
    ids = expected["long.ids"][:, :100]
    mask = torch.ones_like(ids)
    mask[:, :7] = 0  # left padding: the cache's keys are masked the same way
    full = tiny(ids, mask)
    kv = tiny.new_cache(1, ids.shape[1])
    torch.testing.assert_close(tiny(ids, mask, cache=kv), full, atol=1e-5, rtol=0)  # fills the cache
    start, stop = 60, (None if feed == "prefix" else 80)
    part = tiny(ids[:, start:stop], mask, cache=kv, pos=start)
    torch.testing.assert_close(part, full[:, start:stop], atol=1e-5, rtol=0)


def test_lm_head_runs_on_the_block_only(tiny, expected):
    rows = []
    hook = tiny.transformer.ff_out.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[:-1].numel()))
    try:
        for cache in ("prefix", "dual"):
            generate(tiny, expected["long.ids"][:, :40], steps=4, gen_length=8, block_length=4, cache=cache)
    finally:
        hook.remove()
    assert rows and max(rows) == 4


def test_threshold_extremes(tiny, fast):
    prompt = fast["0.prompt"]
    for threshold, forwards in [(1e-9, 2), (1.0, 16)]:  # all sure: one step a block; none sure: one token a step
        calls, hook = counting_forwards(tiny)
        out = generate(tiny, prompt, steps=4, gen_length=16, block_length=8, threshold=threshold, cache="dual")
        hook.remove()
        assert len(calls) == forwards and (out != 380).all()


def test_cfg_temperature_and_random_remasking_with_caches(tiny, expected):
    prompt = expected["generate.4.prompt"]
    for cache in ("prefix", "dual"):
        # With one step per block every step is a block's first, full forward: the cache changes nothing.
        kw = dict(steps=2, gen_length=16, block_length=8, cfg_scale=1.5)
        assert torch.equal(generate(tiny, prompt, cache=cache, **kw), generate(tiny, prompt, **kw))
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(generate(tiny, prompt, steps=8, gen_length=16, block_length=8, temperature=1.0,
                                 cfg_scale=1.0, cache=cache, threshold=0.02))
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
        out = generate(tiny, prompt, steps=8, gen_length=16, block_length=8, remasking="random", cache=cache)
        assert (out != 380).all()


@pytest.mark.parametrize("kw", [dict(cache="full"), dict(threshold=0.0), dict(threshold=1.5)])
def test_bad_fast_settings_are_refused(tiny, expected, kw):
    with pytest.raises(UserError, match="need cache None, 'prefix' or 'dual'"):
        generate(tiny, expected["generate.0.prompt"], steps=8, gen_length=8, block_length=8, **kw)


@pytest.fixture(scope="module")
def llama():
    return load_model(LLAMA / "ckpt", device="cpu", dtype=torch.float32)


def test_causal_kv_cache_equals_uncached_greedy(llama):
    exp = load_file(LLAMA / "expected.safetensors")
    calls, hook = counting_forwards(llama)
    out = generate(llama, exp["greedy.prompt"], gen_length=10, cache="prefix")
    hook.remove()
    assert torch.equal(out, exp["greedy.out"]) and len(calls) == 10
    long = exp["long.ids"][:, :90]  # beyond max_position_embeddings (64), left-padded batch
    batch = torch.cat([long, torch.cat([torch.full((1, 9), 1), long[:, 9:]], 1)])
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    assert torch.equal(generate(llama, batch, mask, gen_length=12, cache="dual"),
                       generate(llama, batch, mask, gen_length=12))


def test_causal_cached_logits_equal_full(llama):
    ids = load_file(LLAMA / "expected.safetensors")["long.ids"][:, :50]
    kv = llama.new_cache(1, 50)
    llama(ids[:, :30], cache=kv)
    for p in range(30, 50):  # one token at a time, as greedy decoding feeds them
        torch.testing.assert_close(llama(ids[:, p:p + 1], cache=kv, pos=p), llama(ids[:, :p + 1])[:, -1:],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("args,msg", [(["--cache", "full"],
                                       "argument --cache: expected none, prefix or dual, got 'full'"),
                                      (["--threshold", "0"], "argument --threshold: the threshold must be in (0, 1]"),
                                      (["--threshold", "nan"], "the threshold must be in (0, 1]")])
def test_cli_bad_values_are_one_line(ckpt_tok, args, msg):
    r = run_script("sample.py", "--model", ckpt_tok, "--prompt", "w5 w6", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr


def test_cli_with_dual_cache_and_threshold(ckpt_tok, tiny):
    r = run_script("sample.py", "--model", ckpt_tok, "--prompt", "w5 w6 w7 w8", "--gen-length", 8, "--steps", 8,
                   "--block-length", 4, "--device", "cpu", "--cache", "dual", "--threshold", 0.02)
    assert r.returncode == 0, r.stderr
    ids = generate(tiny, torch.tensor([[5, 6, 7, 8]]), steps=8, gen_length=8, block_length=4, cache="dual",
                   threshold=0.02)[0, 4:].tolist()
    ids = ids[:ids.index(381)] if 381 in ids else ids
    assert r.stdout.strip() == " ".join(f"w{i}" if i > 3 else ["<unk>", "user", "assistant", "."][i] for i in ids)


def test_niah_records_cache_and_keeps_grids_apart(ckpt_bytes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model", ckpt_bytes, "--lengths", "700", "--depths", "50", "--repeats", 1, "--steps", 4,
            "--gen-length", 4, "--block-length", 4, "--device", "cpu"]
    assert run_script("eval_niah.py", *args).returncode == 0
    assert run_script("eval_niah.py", *args, "--cache", "dual", "--threshold", 0.5).returncode == 0
    exact, fast = sorted((tmp_path / "results").glob("*.jsonl"), key=lambda p: len(p.name))
    assert exact.name == "ckpt_rope1_steps4.jsonl" and fast.name == "ckpt_rope1_steps4_dual_t0.5.jsonl"
    row = json.loads(fast.read_text())
    assert (row["settings"]["cache"], row["settings"]["threshold"]) == ("dual", 0.5)
    assert json.loads(exact.read_text())["settings"]["cache"] is None
    r = run_script("eval_niah.py", *args, "--cache", "prefix", "--out", fast)
    assert r.returncode == 2 and "other settings" in r.stderr
