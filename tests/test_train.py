"""train.py: LLaDA's training objective and its causal twin, checkpoints in the real layout, resuming, bad input."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import run_script
from model import load_model
from train import causal_loss, char_tokenizer, diffusion_loss, make_model, training_loss

TEXT = "The old ferryman carried the weathered lantern near the harbour. " * 40


def batch(tok, length=32, n=8):
    ids = torch.tensor(tok.encode(TEXT).ids)
    return torch.stack([ids[i * 17:i * 17 + length] for i in range(n)])


@pytest.mark.parametrize("kind", ["diffusion", "causal"])
def test_a_few_steps_lower_the_loss(kind):
    tok = char_tokenizer(TEXT)
    model, x = make_model(kind, tok.get_vocab_size(), 32, layers=2, width=32), batch(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def fixed():  # the same masks each time
        with torch.no_grad():
            return training_loss(model, x, torch.Generator().manual_seed(0)).item()
    before = fixed()
    for step in range(30):
        opt.zero_grad()
        training_loss(model, x, torch.Generator().manual_seed(step)).backward()
        opt.step()
    assert fixed() < 0.9 * before  # diffusion learns slower: 3.60 -> 3.04 here; causal 3.14 -> 0.95


def test_diffusion_loss_by_hand():
    tok = char_tokenizer(TEXT)
    model, x = make_model("diffusion", tok.get_vocab_size(), 32, layers=1, width=16), batch(tok, 6, 3)
    got = diffusion_loss(model, x, model.config.mask_token_id, torch.Generator().manual_seed(5), eps=0.1)
    g = torch.Generator().manual_seed(5)  # the same draws, written out
    t, u = torch.rand(3, 1, generator=g), torch.rand(3, 6, generator=g)
    total = 0.0
    for b in range(3):
        p = 0.9 * t[b, 0].item() + 0.1  # (1 - eps) t + eps
        masked = u[b] < p
        logits = model(x[b:b + 1].masked_fill(masked[None], model.config.mask_token_id))[0]  # full logits
        total += sum(F.cross_entropy(logits[i], x[b, i]).item() / p for i in range(6) if masked[i])
    assert got.item() == pytest.approx(total / 18, rel=1e-5)


def test_diffusion_loss_weights_by_one_over_p():
    """With uniform logits every masked token costs ln V; dividing by the masking rate p makes the expected loss
    ln V whatever the rates (unweighted it would be ln V / 2), and about half the tokens are masked."""
    model = make_model("diffusion", 37, 64, layers=1, width=16)
    torch.nn.init.zeros_(model.transformer.ff_out.weight)
    x = torch.randint(0, 35, (4000, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = diffusion_loss(model, x, 36, torch.Generator().manual_seed(1)).item()
    assert loss == pytest.approx(math.log(37), rel=0.05)
    seen = []
    hook = model.transformer.ff_out.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    with torch.no_grad():
        diffusion_loss(model, x[:400], 36, torch.Generator().manual_seed(2))
    hook.remove()
    assert seen[0] == pytest.approx(0.5 * 400 * 64, rel=0.1)  # the LM head ran on the masked rows only


def test_causal_loss_is_next_token():
    tok = char_tokenizer(TEXT)
    model, x = make_model("causal", tok.get_vocab_size(), 16, layers=1, width=16), batch(tok, 10, 2)
    logits = model(x)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    assert causal_loss(model, x).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def train_args(text, out, *more):
    return ["--text", text, "--length", 16, "--steps", 6, "--batch", 4, "--save-every", 3, "--out", out, *more]


@pytest.mark.parametrize("kind", ["diffusion", "causal"])
def test_checkpoint_loads_with_load_model(text, tmp_path, kind):
    out = tmp_path / kind
    r = run_script("train.py", "--kind", kind, *train_args(text, out))
    assert r.returncode == 0, r.stderr
    assert "held-out" in r.stderr and "step 6/6" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ("llama" if kind == "causal" else "llada")
    trained = make_model(kind, char_tokenizer(TEXT).get_vocab_size(), 16)
    trained.load_state_dict(torch.load(out / "train_state.pt")["model"])
    loaded = load_model(out, device="cpu")
    x = batch(char_tokenizer(TEXT), 16, 2)
    torch.testing.assert_close(loaded(x), trained(x), atol=0, rtol=0)
    assert (out / "heldout.txt").read_text() and (out / "tokenizer.json").exists()


def test_resumed_run_equals_an_uninterrupted_one(text, tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_script("train.py", "--kind", "diffusion", *train_args(text, whole)).returncode == 0
    real = train.progress

    def interrupted(total):
        show = real(total)
        return lambda done, line: show(done, line) if done < 3 else (_ for _ in ()).throw(KeyboardInterrupt)
    monkeypatch.setattr(train, "progress", interrupted)
    r = run_script("train.py", "--kind", "diffusion", *train_args(text, cut))
    assert r.returncode == 130 and torch.load(cut / "train_state.pt")["step"] == 3  # killed after the checkpoint
    monkeypatch.setattr(train, "progress", real)
    r = run_script("train.py", "--kind", "diffusion", *train_args(text, cut))
    assert r.returncode == 0 and "step 4/6" in r.stderr  # went on from step 3
    a, b = (torch.load(d / "train_state.pt") for d in (whole, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    r = run_script("train.py", "--kind", "diffusion", *train_args(text, cut), "--seed", 1)
    assert r.returncode == 2 and "other settings" in r.stderr


@pytest.mark.parametrize("content,args,msg", [
    (b"", [], "a text of 40 x --length characters (0 here)"),
    (b"\xff\xfe not utf-8" * 100, [], "is not UTF-8"),
    (None, ["--length", 1], "need --length >= 2"),
    (None, ["--steps", 0], "--steps >= 1"),
    (None, ["--batch", 0], "expected an integer >= 1")])
def test_bad_input_gets_one_line(tmp_path, content, args, msg):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode() if content is None else content)
    r = run_script("train.py", "--kind", "diffusion", "--text", path, "--steps", 2, "--length", 16,
                   "--out", tmp_path / "o", *map(str, args))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
