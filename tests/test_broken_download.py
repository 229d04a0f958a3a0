"""A checkpoint folder broken the way an interrupted download leaves it: one line naming the file, no traceback, and
before any weight is read."""
import pytest

import model
from cli import load_tokenizer
from conftest import run_script
from model import UserError, load_model

SHARD = "model-00002-of-00002.safetensors"


def cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])


def drop_key(path, key):
    path.write_text(path.read_text().replace(f'"{key}"', '"unused"'))


BROKEN = {  # what an interrupted or failed download leaves, and what the message must say
    "truncated shard": (lambda d: cut(d / SHARD, lambda n: 3000), SHARD),
    "shard missing its last bytes": (lambda d: cut(d / SHARD, lambda n: n - 100), SHARD),
    "shard of 5 bytes": (lambda d: cut(d / SHARD, lambda n: 5), SHARD),
    "config.json not JSON": (lambda d: (d / "config.json").write_text('{"d_model": 64,'), "config.json"),
    "config.json without a key": (lambda d: drop_key(d / "config.json", "d_model"), "config.json has no 'd_model'"),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("<html>"),
                       "model.safetensors.index.json"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_load_model_names_the_file(ckpt_copy, case, monkeypatch):
    breaks, name = BROKEN[case]
    breaks(ckpt_copy)
    monkeypatch.setattr(model, "safe_open", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(UserError, match=name) as e:
        load_model(ckpt_copy, device="cpu")
    assert "download it again" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", list(BROKEN) + ["tokenizer.json not a tokenizer"])
def test_sample_py_says_one_line(ckpt_tok, case):
    breaks, name = BROKEN.get(case) or (lambda d: (d / "tokenizer.json").write_text('{"version": 1}'),
                                        "tokenizer.json")
    breaks(ckpt_tok)
    r = run_script("sample.py", "--model", ckpt_tok, "--prompt", "w5 w6", "--gen-length", 4, "--steps", 4,
                   "--block-length", 4, "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and name in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text", ['{"version": 1}', "not json", ""])
def test_tokenizer_loader_names_the_file(ckpt_tok, text):
    (ckpt_tok / "tokenizer.json").write_text(text)
    with pytest.raises(UserError, match=r"tokenizer\.json is not a tokenizer .*download it again"):
        load_tokenizer(ckpt_tok)


def test_a_good_folder_still_loads(ckpt_copy, expected):
    assert (load_model(ckpt_copy, device="cpu")(expected["logits.ids"]) - expected["logits.fp32"]).abs().max() < 1e-4
