"""RoPE scaling methods (PI, dynamic NTK, YaRN, LLaMA-3.1): HF parity, both config forms, LLaDA, the CLI."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLADA, LLAMA, run_script
from model import UserError, load_model
from rope import inv_freq, scaled_inv_freq

CONFIGS = json.loads((LLAMA / "rope_scaling.json").read_text())


@pytest.fixture(scope="module")
def hf():
    return load_file(LLAMA / "rope_scaling.safetensors")


def with_config(folder, cfg):
    (folder / "config.json").write_text(json.dumps(cfg))
    return load_model(folder, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_parity_transformers4_form(llama_copy, hf, name):
    model = with_config(llama_copy, CONFIGS[name])
    assert hf["ids"].shape[1] > model.config.max_sequence_length or name in ("yarn", "llama3")
    torch.testing.assert_close(model(hf["ids"]), hf[f"{name}.fp32"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_parity_transformers5_form(llama_copy, hf, name):
    cfg = dict(CONFIGS[name])
    cfg["rope_parameters"] = cfg.pop("rope_scaling") | {"rope_theta": cfg.pop("rope_theta")}
    torch.testing.assert_close(with_config(llama_copy, cfg)(hf["ids"]), hf[f"{name}.fp32"], atol=1e-4, rtol=0)


def test_scaling_changes_the_logits(hf):
    plain = load_model(LLAMA / "ckpt")(hf["ids"])
    assert all((plain - hf[f"{name}.fp32"]).abs().max() > 0.1 for name in CONFIGS)


@pytest.mark.parametrize("name", ["linear", "dynamic"])
def test_load_model_argument_replaces_the_config(hf, name):
    model = load_model(LLAMA / "ckpt", rope_scaling={"rope_type": name, "factor": 4.0})
    torch.testing.assert_close(model(hf["ids"]), hf[f"{name}.fp32"], atol=1e-4, rtol=0)


def test_yarn_attention_factor_and_ramp():
    theta = inv_freq(128, 5e5)
    inv, a = scaled_inv_freq(128, 5e5, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096))
    assert a == pytest.approx(0.1 * math.log(8) + 1)
    # pair j turns 32 times in 4096 tokens at j = 128 ln(4096 / (2 pi 32)) / (2 ln 5e5) = 14.7, once at 31.6
    assert torch.equal(inv[:14], theta[:14]) and torch.allclose(inv[32:], theta[32:] / 8)  # kept / interpolated
    assert ((inv[15:31] < theta[15:31]) & (inv[15:31] > theta[15:31] / 8)).all()  # the ramp between
    _, a = scaled_inv_freq(128, 5e5, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096,
                                          attention_factor=1.5))
    assert a == 1.5


def test_llama3_keeps_high_and_divides_low_frequencies():
    theta = inv_freq(128, 5e5)
    cfg = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)
    inv, a = scaled_inv_freq(128, 5e5, cfg)
    wavelen = 2 * math.pi / theta
    assert a == 1.0 and torch.equal(inv[wavelen < 2048], theta[wavelen < 2048])
    assert torch.equal(inv[wavelen > 8192], theta[wavelen > 8192] / 8)


def test_dynamic_ntk_follows_the_length():
    cfg = dict(rope_type="dynamic", factor=4.0)
    short, _ = scaled_inv_freq(128, 5e5, cfg, max_len=4096, seq_len=4000)
    assert torch.equal(short, inv_freq(128, 5e5))  # nothing changes up to the trained length
    long, _ = scaled_inv_freq(128, 5e5, cfg, max_len=4096, seq_len=8192)
    assert torch.allclose(long, inv_freq(128, 5e5 * (4 * 2 - 3) ** (128 / 126)))


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_llada_runs_with_each_method(expected, kind):
    ids = expected["long.ids"]  # 150 tokens, beyond the tiny LLaDA's 64
    plain = load_model(LLADA / "ckpt")(ids)
    scaled = load_model(LLADA / "ckpt", rope_scaling={"rope_type": kind, "factor": 4.0})(ids)
    assert torch.isfinite(scaled).all() and (scaled - plain).abs().max() > 1e-3
    if kind != "dynamic":  # factor 1 is plain RoPE (YaRN's attention factor is 1 then); dynamic NTK still grows
        one = load_model(LLADA / "ckpt", rope_scaling={"rope_type": kind, "factor": 1.0})(ids)
        torch.testing.assert_close(one, plain, atol=1e-5, rtol=0)


def test_static_ntk_then_method(expected):
    """rope_scale multiplies the base first; the method acts on that base (README)."""
    a = load_model(LLADA / "ckpt", rope_scale=4, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    b = load_model(LLADA / "ckpt", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    cfg = json.loads((LLADA / "ckpt" / "config.json").read_text())
    assert a.rope_base == 4 * cfg["rope_theta"] == 4 * b.rope_base
    assert (a(expected["long.ids"]) - b(expected["long.ids"])).abs().max() > 1e-3


@pytest.mark.parametrize("scaling,msg", [({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not implemented"),
                                         ({"rope_type": "yarn", "factor": math.inf}, "finite positive factor"),
                                         ({"rope_type": "dynamic"}, "finite positive factor, got None")])
def test_bad_scaling_is_refused(scaling, msg):
    with pytest.raises(UserError, match=msg):
        load_model(LLADA / "ckpt", rope_scaling=scaling)


def test_scripts_record_the_method(ckpt_bytes, tmp_path):
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 10)
    out = tmp_path / "p.json"
    r = run_script("eval_ppl.py", "--model", ckpt_bytes, "--text", tmp_path / "doc.txt", "--max-len", 128,
                   "--chunk", 32, "--mc", 2, "--device", "cpu", "--rope-scaling", "yarn:4", "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["settings"]["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    niah = tmp_path / "n.jsonl"
    args = ["--model", ckpt_bytes, "--lengths", "700", "--depths", "50", "--repeats", 1, "--steps", 4,
            "--gen-length", 4, "--block-length", 4, "--device", "cpu", "--out", niah]
    assert run_script("eval_niah.py", *args, "--rope-scaling", "linear:2").returncode == 0
    assert json.loads(niah.read_text())["settings"]["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    r = run_script("eval_niah.py", *args, "--rope-scaling", "linear:3")
    assert r.returncode == 2 and "other settings" in r.stderr
    r = run_script("sample.py", "--model", ckpt_bytes, "--prompt", "Hi", "--gen-length", 4, "--steps", 4,
                   "--block-length", 4, "--device", "cpu", "--rope-scaling", "dynamic:2")
    assert r.returncode == 0, r.stderr
