import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LLADA, ROOT, edit_json
from model import UserError, load_model


def test_fp32_logits_match_official(tiny, expected):
    torch.testing.assert_close(tiny(expected["logits.ids"]), expected["logits.fp32"], atol=1e-5, rtol=0)


def test_bf16_logits_are_close(expected):
    model = load_model(LLADA / "ckpt", device="cpu", dtype=torch.bfloat16)
    out = model(expected["logits.ids"])
    assert out.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits: logits of magnitude ~4 are off by a few ulps (1 ulp = 1/64 there).
    torch.testing.assert_close(out.float(), expected["logits.bf16"], atol=0.0625, rtol=0)
    assert (out.float() - expected["logits.fp32"]).abs().max() > 1e-4  # really computed in bf16


def test_beyond_trained_length_matches(tiny, expected):
    assert expected["long.ids"].shape[1] > tiny.config.max_sequence_length
    torch.testing.assert_close(tiny(expected["long.ids"]), expected["long.fp32"], atol=1e-5, rtol=0)


def test_static_ntk_rope_scale_14_matches(expected):
    model = load_model(LLADA / "ckpt", device="cpu", rope_scale=14)
    out = model(expected["long.ids"])
    torch.testing.assert_close(out, expected["long_ntk14.fp32"], atol=1e-5, rtol=0)
    assert (out - expected["long.fp32"]).abs().max() > 1e-3


@pytest.mark.parametrize("at", [slice(5, 13), torch.tensor([0, 7, 23, 7])])
def test_logits_at_gives_the_same_rows(tiny, expected, at):
    ids = expected["logits.ids"]
    full = tiny(ids)
    part = tiny(ids, logits_at=at)
    assert part.shape == full[:, at].shape
    torch.testing.assert_close(part, full[:, at], atol=1e-6, rtol=0)


def test_attention_mask_all_ones_changes_nothing_and_pads_are_ignored(tiny, expected):
    ids = expected["logits.ids"][:1]
    torch.testing.assert_close(tiny(ids, torch.ones_like(ids)), tiny(ids), atol=1e-6, rtol=0)
    # Left padding: the real tokens' logits do not depend on what the pad tokens are.
    padded = torch.cat([torch.tensor([[5, 6, 7]]), ids], 1)
    other = torch.cat([torch.tensor([[9, 9, 1]]), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    torch.testing.assert_close(tiny(padded, mask)[:, 3:], tiny(other, mask)[:, 3:], atol=1e-5, rtol=0)


def test_config_defaults_are_llada_8b():
    from model import LLaDA, LLaDAConfig
    c = LLaDAConfig()
    assert (c.d_model, c.n_heads, c.head_dim, c.n_layers, c.mlp_hidden_size) == (4096, 32, 128, 32, 12288)
    assert (c.vocab_size, c.rope_theta, c.mask_token_id, c.eos_token_id) == (126464, 500000.0, 126336, 126081)
    with torch.device("meta"):
        n = sum(p.numel() for p in LLaDA(c).parameters())
    assert n == 8_015_581_184  # REFERENCE.md section 1


def test_loads_shard_by_shard_onto_meta_built_model(tiny):
    names = set(json.loads((LLADA / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"])
    assert {"model." + k for k in tiny.state_dict()} == names
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in tiny.parameters())


def test_single_file_checkpoint(ckpt_copy, tiny, expected):
    merged = {}
    for f in ckpt_copy.glob("model-*.safetensors"):
        merged.update(load_file(f))
        f.unlink()
    (ckpt_copy / "model.safetensors.index.json").unlink()
    save_file(merged, ckpt_copy / "model.safetensors")
    out = load_model(ckpt_copy)(expected["logits.ids"])
    assert torch.equal(out, tiny(expected["logits.ids"]))


def rewrite_shard(ckpt, fn):
    shard = ckpt / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard)


def test_missing_tensor_is_named(ckpt_copy):
    rewrite_shard(ckpt_copy, lambda t: t.pop("model.transformer.ln_f.weight"))
    with pytest.raises(UserError, match=r"missing 1 tensor.* transformer\.ln_f\.weight"):
        load_model(ckpt_copy)


def test_unexpected_tensor_is_named(ckpt_copy):
    rewrite_shard(ckpt_copy, lambda t: t.update({"model.transformer.extra.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match=r"unexpected tensor model\.transformer\.extra\.weight"):
        load_model(ckpt_copy)


def test_wrong_shape_is_named(ckpt_copy):
    def shrink(t):
        t["model.transformer.ln_f.weight"] = torch.ones(63, dtype=torch.bfloat16)
    rewrite_shard(ckpt_copy, shrink)
    with pytest.raises(UserError, match=r"model\.transformer\.ln_f\.weight .*\[63\], expected \[64\]"):
        load_model(ckpt_copy)


@pytest.mark.parametrize("key,value", [("weight_tying", True), ("block_type", "sequential"), ("alibi", True),
                                       ("include_bias", True), ("attention_layer_norm", True),
                                       ("model_type", "qwen2")])
def test_unsupported_config_is_refused(ckpt_copy, key, value):
    edit_json(ckpt_copy / "config.json", **{key: value})
    with pytest.raises(UserError, match=f"{key}={value!r} is not implemented"):
        load_model(ckpt_copy)


def test_missing_folder_and_files(tmp_path, ckpt_copy):
    with pytest.raises(UserError, match="model folder not found"):
        load_model(tmp_path / "nope")
    (ckpt_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="missing weights file: .*model-00002-of-00002"):
        load_model(ckpt_copy)
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_model(ckpt_copy)


def test_script_shows_one_line_not_a_traceback(tmp_path):
    code = "from cli import run_cli; from model import load_model; run_cli(lambda: load_model(%r))"
    code %= str(tmp_path / "nope")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: model folder not found: {tmp_path / 'nope'}"


def test_import_prints_nothing():
    r = subprocess.run([sys.executable, "-c", "import model, rope"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
