import json

import pytest
import torch

from conftest import LLADA, run_script
from model import UserError
from sample import generate, get_num_transfer_tokens

CASES = json.loads((LLADA / "cases.json").read_text())
MASK = 380


@pytest.mark.parametrize("i", range(5))
def test_official_tokens_exactly(tiny, expected, i):
    c = CASES[f"generate.{i}"]
    out = generate(tiny, expected[f"generate.{i}.prompt"], steps=c["steps"], gen_length=c["gen_length"],
                   block_length=c["block_length"], cfg_scale=c["cfg_scale"], remasking=c["remasking"])
    assert torch.equal(out, expected[f"generate.{i}.out"])


def test_reveal_schedule():
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False  # 7 masked in row 1
    assert get_num_transfer_tokens(mask, 4).tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]
    assert get_num_transfer_tokens(mask, 10)[0].tolist() == [1] * 10


def run_with_history(tiny, prompt, **kw):
    history = []
    out = generate(tiny, prompt, on_step=lambda x, step: history.append(x[:, prompt.shape[1]:].clone()), **kw)
    return out, history


def test_blocks_are_filled_in_order_and_never_remasked(tiny, expected):
    prompt = expected["generate.1.prompt"]
    out, history = run_with_history(tiny, prompt, steps=8, gen_length=16, block_length=4)
    assert len(history) == 8
    masked_before = torch.ones(16, dtype=torch.bool)
    for ans in history:
        masked = ans[0] == MASK
        assert not (masked & ~masked_before).any()  # revealed tokens stay revealed
        assert ((ans[0] != MASK) | masked_before).all()
        for b in range(3):  # nothing of block b+1 before block b is complete
            if masked[4 * b:4 * b + 4].any():
                assert masked[4 * (b + 1):].all()
        assert (masked_before.sum() - masked.sum()).item() == 2  # 4 tokens over 2 steps per block
        masked_before = masked
    assert torch.equal(history[-1], out[:, prompt.shape[1]:])


def test_seeded_temperature_is_reproducible_and_random_remasking_works(tiny, expected):
    prompt = expected["generate.0.prompt"]
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=1.0)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(generate(tiny, prompt, **kw))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    orders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out, history = run_with_history(tiny, prompt, steps=16, gen_length=16, block_length=16, remasking="random")
        assert (out != MASK).all()
        orders.append(torch.stack([h[0] != MASK for h in history]).int().argmax(0))  # step each token appeared
    assert not torch.equal(orders[0], orders[1])


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])  # Fast-dLLM's caches keep the pads masked too
def test_left_padded_batch_equals_single_runs(tiny, cache):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 370, (1, 12), generator=g), torch.randint(0, 370, (1, 7), generator=g)
    batch = torch.cat([a, torch.cat([torch.full((1, 5), 381), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    kw = dict(steps=8, gen_length=16, block_length=8, cache=cache)
    out = generate(tiny, batch, attention_mask=mask, **kw)
    assert torch.equal(out[0, 12:], generate(tiny, a, **kw)[0, 12:])
    assert torch.equal(out[1, 12:], generate(tiny, b, **kw)[0, 7:])
    padded_logits = tiny(batch, mask)[1, 5:]
    torch.testing.assert_close(padded_logits, tiny(b)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw,msg", [(dict(gen_length=16, block_length=5), "answer length \\(16\\) must be a multiple"),
                                    (dict(gen_length=16, block_length=8, steps=3), "split evenly over the 2 block"),
                                    (dict(gen_length=8, block_length=16), "must be a multiple of the block length"),
                                    (dict(gen_length=8, block_length=8, steps=16), "a multiple of 1 up to 8"),
                                    (dict(gen_length=8, block_length=0), "must each be at least 1"),
                                    (dict(steps=0), "must each be at least 1"),
                                    (dict(remasking="top"), "remasking")])
def test_bad_settings_are_refused(tiny, expected, kw, msg):
    with pytest.raises(UserError, match=msg):
        generate(tiny, expected["generate.0.prompt"], **{"steps": 8, "gen_length": 8, "block_length": 8, **kw})


def test_bad_prompts_are_refused(tiny):
    with pytest.raises(UserError, match="mask token"):
        generate(tiny, torch.tensor([[1, MASK, 2]]), steps=4, gen_length=4, block_length=4)
    with pytest.raises(UserError, match="empty"):
        generate(tiny, torch.zeros(1, 0, dtype=torch.long), steps=4, gen_length=4, block_length=4)


def cli(*args):
    return run_script("sample.py", *args)


def test_cli_end_to_end(ckpt_tok, tiny):
    r = cli("--model", ckpt_tok, "--prompt", "w5 w6 w7 w8", "--gen-length", 8, "--steps", 8, "--block-length", 4,
            "--device", "cpu", "--show")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "[step 1]" and lines[1].count("░") == 7 and "░" not in lines[-2]
    # The answer line is the decoded generate() output, cut at the first EOS.
    ids = generate(tiny, torch.tensor([[5, 6, 7, 8]]), steps=8, gen_length=8, block_length=4)[0, 4:].tolist()
    ids = ids[:ids.index(381)] if 381 in ids else ids
    assert lines[-1] == " ".join(f"w{i}" if i > 3 else ["<unk>", "user", "assistant", "."][i] for i in ids)
    assert "4 prompt tokens" in r.stderr and "tokens/s" in r.stderr


def test_cli_chat_and_prompt_file(ckpt_tok, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(" ".join(f"w{4 + i % 300}" for i in range(200)))
    r = cli("--model", ckpt_tok, "--prompt", f"@{f}", "--chat", "--gen-length", 4, "--steps", 4, "--device", "cpu",
            "--block-length", 4)
    assert r.returncode == 0, r.stderr
    assert "208 prompt tokens" in r.stderr  # 200 words + 8 template tokens
    assert r.stderr.count("warning:") == 1 and "extrapolation bound" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--gen-length", "10"], "the answer length (10) must be a multiple of the block length (32)"),
    (["--gen-length", "-5"], "argument --gen-length: expected an integer >= 1, got '-5'"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--block-length", "x"], "argument --block-length: expected an integer >= 1"),
    (["--prompt", ""], "empty"),
    (["--prompt", "w5 <|mdm_mask|>"], "mask token"),
    (["--prompt", "@/no/such/file.txt"], "No such file or directory"),
])
def test_cli_errors_are_one_line(ckpt_tok, args, msg):
    r = cli("--model", ckpt_tok, "--prompt", "w5 w6", "--device", "cpu", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr.strip().splitlines()[-1]
    assert ("loaded" in r.stderr) == (msg in ("empty", "mask token"))  # settings are checked before loading
    assert r.stderr.count("\n") == 1 + ("loaded" in r.stderr)


def test_cli_missing_tokenizer_and_model(ckpt_copy, tmp_path):
    for folder, msg in [(ckpt_copy, "no tokenizer.json"), (tmp_path / "nope", "model folder not found")]:
        r = cli("--model", folder, "--prompt", "w5")
        assert r.returncode == 2 and r.stderr.startswith(f"error: {msg}")
