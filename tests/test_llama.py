"""The autoregressive baseline: a Hugging Face LLaMA-3 checkpoint (causal, GQA) through the same code."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLAMA, edit_json, run_script
from eval_ppl import next_token_nll
from model import UserError, load_model
from sample import generate


@pytest.fixture(scope="module")
def llama():
    return load_model(LLAMA / "ckpt", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def exp():
    return load_file(LLAMA / "expected.safetensors")


def test_config_is_causal_gqa(llama):
    c = llama.config
    assert c.causal and (c.n_heads, c.n_kv_heads, c.rope_theta, c.mask_token_id) == (4, 2, 500000.0, None)


def test_causal_logits_match_hf(llama, exp):
    torch.testing.assert_close(llama(exp["logits.ids"]), exp["logits.fp32"], atol=1e-5, rtol=0)


def test_beyond_max_position_embeddings_matches(llama, exp):
    assert exp["long.ids"].shape[1] > llama.config.max_sequence_length
    torch.testing.assert_close(llama(exp["long.ids"]), exp["long.fp32"], atol=1e-5, rtol=0)


def test_per_position_nll_matches(llama, exp):
    nll = next_token_nll(llama, exp["long.ids"][0], piece=50)  # LM head in pieces, as for 16k tokens
    torch.testing.assert_close(nll, exp["long.nll"], atol=1e-5, rtol=0)


def test_greedy_tokens_match(llama, exp):
    assert torch.equal(generate(llama, exp["greedy.prompt"], gen_length=10), exp["greedy.out"])


def test_greedy_left_padded_batch_equals_single_runs(llama, exp):
    prompt = exp["greedy.prompt"]
    batch = torch.cat([prompt, torch.cat([torch.full((1, 4), 1), prompt[:, 4:]], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = generate(llama, batch, attention_mask=mask, gen_length=6)
    assert torch.equal(out[0], exp["greedy.out"][0, :18])
    assert torch.equal(out[1, 12:], generate(llama, prompt[:, 4:], gen_length=6)[0, 8:])


def test_causal_mask_with_padding(llama, exp):
    ids = exp["logits.ids"][:1]
    padded = torch.cat([torch.tensor([[7, 8]]), ids], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)
    out = llama(padded, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2:], llama(ids), atol=1e-5, rtol=0)


def test_rope_parameters_form_is_read(tmp_path, llama_copy, exp):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    model = load_model(llama_copy)
    assert model.config.rope_theta == 500000.0
    torch.testing.assert_close(model(exp["logits.ids"]), exp["logits.fp32"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes,msg", [
    (dict(rope_scaling={"rope_type": "mrope", "factor": 8.0}), "rope scaling 'mrope' is not implemented"),
    (dict(rope_theta=None, rope_parameters={"rope_type": "su", "rope_theta": 5e5}), "rope scaling 'su' is not"),
    (dict(rope_scaling={"type": "yarn", "factor": -2.0}), "yarn rope scaling needs a finite positive factor"),
    (dict(rope_scaling={"rope_type": "linear"}), "linear rope scaling needs a finite positive factor, got None"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
     "low_freq_factor <"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings=True"),
    (dict(head_dim=32), "head_dim=32"),
])
def test_unsupported_llama_configs_are_refused(llama_copy, changes, msg):
    edit_json(llama_copy / "config.json", **changes)
    with pytest.raises(UserError, match=msg):
        load_model(llama_copy)


def test_saved_rotary_buffers_are_skipped(llama_copy, exp):
    from safetensors.torch import save_file
    shard = llama_copy / "model-00001-of-00003.safetensors"
    tensors = load_file(shard) | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    save_file(tensors, shard)
    torch.testing.assert_close(load_model(llama_copy)(exp["logits.ids"]), exp["logits.fp32"], atol=1e-5, rtol=0)


def test_llada_checkpoint_unaffected(tiny):
    assert not tiny.config.causal and tiny.config.mask_token_id == 380


run = run_script


def test_all_three_scripts_run_the_causal_model(llama_copy, tmp_path, exp):
    r = run("sample.py", "--model", llama_copy, "--prompt", "Hello there", "--gen-length", 6, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 10)
    out = tmp_path / "llama.json"
    r = run("eval_ppl.py", "--model", llama_copy, "--text", tmp_path / "doc.txt", "--max-len", 256, "--chunk", 32,
            "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    chunks = json.loads(out.read_text())["chunks"]
    assert [c["length"] for c in chunks] == list(range(64, 257, 32))
    ids = torch.tensor(list(b"The quick brown fox jumps over the lazy dog. " * 10))[:256]
    nll = next_token_nll(load_model(llama_copy), ids)
    assert chunks[0]["nll"] == pytest.approx(nll[31:63].mean().item(), abs=1e-6)
    r = run("eval_niah.py", "--model", llama_copy, "--lengths", "700", "--depths", "50", "--repeats", 1,
            "--gen-length", 4, "--device", "cpu", "--out", tmp_path / "n.jsonl")
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "n.jsonl").read_text().splitlines()) == 1
