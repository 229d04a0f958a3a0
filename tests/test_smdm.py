"""SMDM's masked diffusion LM and its autoregressive twin (ML-GSAI/SMDM), against SMDM's own model code on the tiny
fixture, and through every script."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURES, run_script, write_byte_tokenizer
from model import UserError, load_model, read_config

SMDM = FIXTURES / "smdm-tiny"
CASES = json.loads((SMDM / "cases.json").read_text())


@pytest.fixture(scope="module")
def smdm_expected():
    return load_file(SMDM / "expected.safetensors")


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_logits_equal_smdm_within_and_beyond_the_trained_length(kind, smdm_expected):
    model = load_model(SMDM / kind, device="cpu")
    c = model.config
    assert c.causal == CASES[kind]["causal"] and c.max_sequence_length == CASES["trained_length"] == 64
    assert model.transformer.wte.weight.shape[0] == CASES[kind]["wte_rows"]
    assert model.transformer.ff_out.weight.shape[0] == CASES[kind]["head_rows"]
    assert c.mask_token_id == (CASES["mask_id"] if kind == "mdm" else None) and c.rope_theta == CASES["rope_base"]
    for case, length in [("short", 48), ("long", 200)]:  # 200: three times the trained length
        ids = smdm_expected[f"{kind}.{case}.ids"]
        assert ids.shape[1] == length
        logits = model(ids)
        assert logits.shape[-1] == 256
        assert (logits - smdm_expected[f"{kind}.{case}.logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_fp32_rope_tables_fail_the_parity(kind, smdm_expected):
    """SMDM rounds its cos/sin tables to bf16; rotating with the fp32 tables moves the logits by ~4e-4."""
    model = load_model(SMDM / kind, device="cpu")
    model.config.rope_bf16_table = False
    diff = (model(smdm_expected[f"{kind}.short.ids"]) - smdm_expected[f"{kind}.short.logits"]).abs().max()
    assert diff > 1e-4


def test_fused_qkv_is_grouped_per_head(smdm_expected):
    """Splitting attn.attn.weight as three blocks [q | k | v] would give other logits."""
    model = load_model(SMDM / "mdm", device="cpu")
    fused = load_file(SMDM / "mdm" / "mdm-tiny-0e18.safetensors")["transformer.h.0.attn.attn.weight"]
    q = fused.view(4, 3, 16, 64)[:, 0].reshape(64, 64)  # head h: rows [q_h | k_h | v_h]
    assert torch.equal(model.transformer.blocks[0].q_proj.weight, q)
    assert not torch.equal(model.transformer.blocks[0].q_proj.weight, fused[:64])


def make_folder(tmp_path, name, kind="mdm", lit=True, subfolder=False):
    """A user's SMDM folder: the file as downloaded (or in the subfolder `hf download` makes), a test tokenizer."""
    folder = tmp_path / name
    target = folder / f"{kind}_safetensors" if subfolder else folder
    target.mkdir(parents=True)
    shutil.copy(SMDM / kind / f"{kind}-tiny-0e18.safetensors", target)
    if lit:
        shutil.copy(SMDM / kind / "lit_config.json", folder)
    write_smdm_tokenizer(folder)
    return folder


def write_smdm_tokenizer(folder):
    """Bytes as ids 0-255 (the fixture's vocabulary), and id 1 put first by default, as TinyLlama's <s>."""
    from tokenizers import Tokenizer, processors
    write_byte_tokenizer(folder, specials={})
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.id_to_token(1)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    tok.save(str(folder / "tokenizer.json"))


def test_the_download_layout_loads(tmp_path, smdm_expected):
    folder = make_folder(tmp_path, "mdm-tiny", subfolder=True)
    ids = smdm_expected["mdm.short.ids"]
    assert torch.equal(load_model(folder, device="cpu")(ids), load_model(SMDM / "mdm", device="cpu")(ids))


@pytest.mark.parametrize("name,kind,shape", [("mdm-170M-100e18", "mdm", (18, 12, 768, 3072)),
                                             ("ar-113M-10e18", "ar", (12, 12, 768, 3072)),
                                             ("mdm-1028M-1600e18", "mdm", (20, 14, 1792, 7168))])
def test_sizes_from_the_file_name(tmp_path, name, kind, shape):
    (tmp_path / f"{name}.safetensors").write_bytes(b"")  # the config needs only the name
    c = read_config(tmp_path)
    assert (c.n_layers, c.n_heads, c.d_model, c.mlp_hidden_size) == shape and c.n_kv_heads == c.n_heads
    assert (c.vocab_size, c.logits_size, c.max_sequence_length, c.rms_norm_eps) == (32000, 32000, 2048, 1e-5)
    assert (c.embedding_size, c.mask_token_id, c.causal) == ((32001, 32000, False) if kind == "mdm" else
                                                             (32000, None, True))
    assert c.rope_theta == 10000 and c.rope_bf16_table


@pytest.mark.parametrize("files,msg", [(["mdm-7M-1e18.safetensors"], "unknown SMDM size '7M'"),
                                       (["model-a.safetensors"], "not named as SMDM names its files"),
                                       (["mdm-170M-1e18.safetensors", "ar-170M-1e18.safetensors"],
                                        "holds 2 .safetensors files")])
def test_bad_folders_get_one_line(tmp_path, files, msg):
    for f in files:
        (tmp_path / f).write_bytes(b"")
    with pytest.raises(UserError, match=msg):
        read_config(tmp_path)


def test_unknown_size_from_a_script_is_one_line(tmp_path):
    folder = make_folder(tmp_path, "m", lit=False)
    (folder / "mdm-tiny-0e18.safetensors").rename(folder / "mdm-7M-1e18.safetensors")
    r = run_script("sample.py", "--model", folder, "--prompt", "hi", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown SMDM size '7M'" in r.stderr


@pytest.fixture
def doc(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text(" ".join(f"word{i % 37}" for i in range(120)))
    return f


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_ppl_at_equals_the_full_run(tmp_path, doc, kind):
    folder = make_folder(tmp_path, kind, kind)
    args = ["--model", folder, "--text", doc, "--chunk", 32, "--mc", 4, "--device", "cpu"]
    full, at = tmp_path / "full.json", tmp_path / "at.json"
    assert run_script("eval_ppl.py", *args, "--max-len", 320, "--out", full).returncode == 0
    r = run_script("eval_ppl.py", *args, "--at", "96,320", "--out", at)
    assert r.returncode == 0, r.stderr
    whole = {c["length"]: c["nll"] for c in json.loads(full.read_text())["chunks"]}
    chunks = json.loads(at.read_text())["chunks"]
    assert [c["length"] for c in chunks] == [96, 320] and all(c["nll"] == whole[c["length"]] for c in chunks)
    if kind == "ar":  # next-token NLL, computed directly from the model's logits
        from cli import load_tokenizer
        ids = torch.tensor(load_tokenizer(folder).encode(doc.read_text()).ids[:320])
        assert ids[0] == 1  # <s> first, as SMDM's evaluation encodes
        nll = F.cross_entropy(load_model(folder, device="cpu")(ids[None])[0, :-1], ids[1:], reduction="none")
        assert [c["nll"] for c in chunks] == pytest.approx([nll[63:95].mean().item(), nll[287:319].mean().item()],
                                                           abs=1e-5)


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_sample_qk_states_and_niah_run(tmp_path, doc, kind):
    folder = make_folder(tmp_path, kind, kind)
    r = run_script("sample.py", "--model", folder, "--prompt", "word1 word2", "--gen-length", 8, "--steps", 8,
                   "--block-length", 8, "--device", "cpu")
    assert r.returncode == 0 and "prompt tokens" in r.stderr, r.stderr
    out = tmp_path / "qk.png"
    r = run_script("qk_states.py", "--model", folder, "--text", doc, "--length", 200, "--points", 40,
                   "--perplexity", 5, "--device", "cpu", "--out", out)
    assert r.returncode == 0 and out.read_bytes()[:4] == b"\x89PNG", r.stderr
    with np.load(out.with_suffix(".npz")) as f:
        assert json.loads(str(f["meta"]))["causal"] == (kind == "ar")
    r = run_script("eval_niah.py", "--model", folder, "--lengths", 700, "--depths", 50, "--repeats", 1, "--steps", 4,
                   "--gen-length", 4, "--block-length", 4, "--device", "cpu", "--out", tmp_path / "niah.jsonl")
    assert r.returncode == 0 and (tmp_path / "niah.png").exists(), r.stderr
    r = run_script("eval_ruler.py", "--model", folder, "--tasks", "niah_single_1,vt", "--lengths", 600, "--samples", 1,
                   "--steps", 4, "--gen-length", 4, "--block-length", 4, "--device", "cpu",
                   "--out", tmp_path / "r.jsonl")
    assert r.returncode == 0 and len((tmp_path / "r.jsonl").read_text().splitlines()) == 2, r.stderr
    r = run_script("sample.py", "--model", folder, "--prompt", "hi", "--chat", "--device", "cpu")
    assert r.returncode == 2 and "no chat template" in r.stderr


@pytest.mark.parametrize("kind", ["mdm", "ar"])
def test_a_file_of_a_real_size_loads_from_its_name_alone(tmp_path, kind):
    """SMDM's 6M size with the real vocabulary, in SMDM's names and shapes (fused q/k/v), no lit_config.json."""
    from safetensors.torch import save_file
    layers, d, hidden = 6, 256, 1024
    state = {"transformer.wte.weight": torch.randn(32000 + (kind == "mdm"), d), "lm_head.weight": torch.randn(32000, d),
             "transformer.ln_f.weight": torch.ones(d)}
    for i in range(layers):
        state |= {f"transformer.h.{i}.{name}": torch.randn(*shape) * 0.02 for name, shape in [
            ("norm_1.weight", (d,)), ("attn.attn.weight", (3 * d, d)), ("attn.proj.weight", (d, d)),
            ("norm_2.weight", (d,)), ("mlp.swiglu.w1.weight", (hidden, d)), ("mlp.swiglu.w2.weight", (hidden, d)),
            ("mlp.swiglu.w3.weight", (d, hidden))]}
    save_file(state, tmp_path / f"{kind}-6M-10e18.safetensors")
    model = load_model(tmp_path, device="cpu")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32000) and model.config.causal == (kind == "ar")
    assert torch.equal(model.transformer.wte.weight, state["transformer.wte.weight"])


@pytest.mark.parametrize("change,msg", [(dict(n_layer=None), "lit_config.json has no 'n_layer' key"),
                                        (dict(_norm_class="LayerNorm"), "_norm_class='LayerNorm' is not implemented"),
                                        (dict(parallel_residual=True), "parallel_residual=True is not implemented")])
def test_a_lit_config_it_cannot_honour_is_one_line(tmp_path, change, msg):
    folder = make_folder(tmp_path, "m")
    cfg = json.loads((folder / "lit_config.json").read_text())
    cfg = {k: v for k, v in (cfg | change).items() if v is not None}
    (folder / "lit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=msg):
        read_config(folder)
