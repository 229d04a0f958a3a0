"""RoPE scaling methods (PI, dynamic NTK, YaRN, LLaMA-3.1, LongRoPE): HF parity, both config forms, LLaDA, the CLI,
files of factors, and the import graph."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLADA, LLAMA, ROOT, run_script
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
    extra = dict(low_freq_factor=1.0, high_freq_factor=4.0) if kind == "llama3" else {}  # HF requires them
    scaled = load_model(LLADA / "ckpt", rope_scaling={"rope_type": kind, "factor": 4.0, **extra})(ids)
    assert torch.isfinite(scaled).all() and (scaled - plain).abs().max() > 1e-3
    if kind != "dynamic":  # factor 1 is plain RoPE (YaRN's attention factor is 1 then); dynamic NTK still grows
        one = load_model(LLADA / "ckpt", rope_scaling={"rope_type": kind, "factor": 1.0, **extra})(ids)
        torch.testing.assert_close(one, plain, atol=1e-5, rtol=0)


def test_static_ntk_then_method(expected):
    """rope_scale multiplies the base first; the method acts on that base (README)."""
    a = load_model(LLADA / "ckpt", rope_scale=4, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    b = load_model(LLADA / "ckpt", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    cfg = json.loads((LLADA / "ckpt" / "config.json").read_text())
    assert a.rope_base == 4 * cfg["rope_theta"] == 4 * b.rope_base
    assert (a(expected["long.ids"]) - b(expected["long.ids"])).abs().max() > 1e-3


@pytest.mark.parametrize("scaling,msg", [({"rope_type": "mrope", "factor": 2.0}, "'mrope' is not implemented"),
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


# --- LongRoPE (HF `longrope`; LongDLLM's per-dimension factors) ---

LONGROPE = json.loads((LLAMA / "longrope.json").read_text())


@pytest.fixture(scope="module")
def hf_longrope():
    return load_file(LLAMA / "longrope.safetensors")


def transformers5_form(cfg):
    """The same config written the transformers 5.x way: every key inside rope_parameters, factor included."""
    cfg, scaling = dict(cfg), dict(cfg["rope_scaling"])
    del cfg["rope_scaling"]
    cfg["rope_parameters"] = {k: v for k, v in scaling.items() if k != "type"} | dict(
        rope_type="longrope", rope_theta=cfg.pop("rope_theta"), factor=cfg["max_position_embeddings"] / 64,
        original_max_position_embeddings=cfg.pop("original_max_position_embeddings"))
    return cfg


@pytest.mark.parametrize("form", ["phi3", "transformers5"])
def test_longrope_matches_hf_short_and_long(llama_copy, hf_longrope, form):
    model = with_config(llama_copy, LONGROPE if form == "phi3" else transformers5_form(LONGROPE))
    assert hf_longrope["short.ids"].shape[1] <= 64 < hf_longrope["long.ids"].shape[1]  # short / long factors
    for length in ("short", "long"):
        torch.testing.assert_close(model(hf_longrope[f"{length}.ids"]), hf_longrope[f"{length}.fp32"], atol=1e-4,
                                   rtol=0)


def test_longrope_picks_the_factors_per_forward_and_scales_cos_sin():
    s = dict(rope_type="longrope", long_factor=[4.0] * 4, short_factor=[2.0] * 4, factor=8.0,
             original_max_position_embeddings=64)
    short, a = scaled_inv_freq(8, 1e4, s, seq_len=64)
    long, _ = scaled_inv_freq(8, 1e4, s, seq_len=65)
    torch.testing.assert_close(short, inv_freq(8, 1e4) / 2)
    torch.testing.assert_close(long, inv_freq(8, 1e4) / 4)
    assert a == pytest.approx(math.sqrt(1 + math.log(8) / math.log(64)))  # 1.2247, at every length
    assert scaled_inv_freq(8, 1e4, s | dict(attention_factor=1.5), seq_len=10)[1] == 1.5


def test_longrope_on_llada_changes_the_logits(expected):
    ids = expected["long.ids"]
    plain = load_model(LLADA / "ckpt")(ids)
    s = dict(rope_type="longrope", long_factor=[2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0], factor=4.0)
    scaled = load_model(LLADA / "ckpt", rope_scaling=s | dict(short_factor=s["long_factor"]))
    assert scaled.rope_scaling["original_max_position_embeddings"] == 64  # LLaDA's trained length
    assert torch.isfinite(scaled(ids)).all() and (scaled(ids) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("change,msg", [
    (dict(long_factor=[1.0] * 7), "needs a list of 8 finite positive long_factor"),
    (dict(short_factor=[1.0] * 7 + [0.0]), "needs a list of 8 finite positive short_factor"),
    (dict(short_factor=[1.0] * 7 + [math.nan]), "short_factor"),
    (dict(long_factor=None), "long_factor, got None"),
    (dict(factor=-2.0), "finite positive factor")])
def test_bad_longrope_is_refused(change, msg):
    s = dict(rope_type="longrope", long_factor=[2.0] * 8, short_factor=[1.0] * 8) | change
    with pytest.raises(UserError, match=msg):
        load_model(LLADA / "ckpt", rope_scaling=s)


@pytest.mark.parametrize("missing", ["low_freq_factor", "high_freq_factor", "factor"])
def test_llama3_without_a_required_key_names_it(llama_copy, missing):
    cfg = dict(CONFIGS["llama3"])
    cfg["rope_scaling"] = {k: v for k, v in cfg["rope_scaling"].items() if k != missing}
    with pytest.raises(UserError, match=f"llama3 rope scaling needs a finite positive {missing}, got None"):
        with_config(llama_copy, cfg)


def test_llama3_without_original_max_uses_max_position_embeddings(llama_copy, hf):
    """transformers 5.x fills it from max_position_embeddings (64 here, as the fixture's own value)."""
    cfg = dict(CONFIGS["llama3"], max_position_embeddings=64)  # the fixture's T0, which the file then leaves out
    cfg["rope_scaling"] = {k: v for k, v in cfg["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert CONFIGS["llama3"]["rope_scaling"]["original_max_position_embeddings"] == 64
    torch.testing.assert_close(with_config(llama_copy, cfg)(hf["ids"]), hf["llama3.fp32"], atol=1e-4, rtol=0)
    cfg["max_position_embeddings"] = 128
    assert (with_config(llama_copy, cfg)(hf["ids"]) - hf["llama3.fp32"]).abs().max() > 1e-3


def longdllm_file(tmp_path, phi3=False):
    """A LongDLLM-style file for the tiny LLaDA: one factor list for every length, factor = target / trained."""
    f = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 8.0]
    s = dict(type="longrope", long_factor=f, short_factor=f) if phi3 else dict(
        rope_type="longrope", long_factor=f, short_factor=f, factor=256 / 64, original_max_position_embeddings=64)
    path = tmp_path / ("phi3.json" if phi3 else "longdllm_tiny.json")
    path.write_text(json.dumps(s))
    return path


@pytest.mark.parametrize("phi3", [False, True])
def test_rope_scaling_file_works_in_every_script(ckpt_bytes, tmp_path, monkeypatch, phi3):
    file = longdllm_file(tmp_path, phi3)
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    common = ["--model", ckpt_bytes, "--device", "cpu", "--rope-scaling", file]
    schedule = ["--gen-length", 4, "--steps", 4, "--block-length", 4]
    runs = [("sample.py", "--prompt", "Hi", *schedule),
            ("eval_ppl.py", "--text", text, "--max-len", 128, "--chunk", 32, "--mc", 2, "--out", tmp_path / "p.json"),
            ("eval_niah.py", "--lengths", 700, "--depths", 50, "--repeats", 1, *schedule, "--out",
             tmp_path / "n.jsonl"),
            ("eval_ruler.py", "--tasks", "vt", "--lengths", 600, "--samples", 1, *schedule, "--out",
             tmp_path / "r.jsonl"),
            ("qk_states.py", "--text", text, "--length", 100, "--points", 30, "--perplexity", 5, "--out",
             tmp_path / "qk.png")]
    for script, *args in runs:
        r = run_script(script, *common, *args)
        assert r.returncode == 0, f"{script}: {r.stderr}"
    recorded = json.loads((tmp_path / "n.jsonl").read_text().splitlines()[0])["settings"]["rope_scaling"]
    assert recorded == json.loads(file.read_text()) | dict(file=file.name)  # the whole dict, and where it came from
    assert "longrope" in json.loads((tmp_path / "p.json").read_text())["settings"]["rope_scaling"].values()
    monkeypatch.chdir(tmp_path)  # the default results/ file name
    r = run_script("eval_niah.py", *common, "--lengths", 700, "--depths", 50, "--repeats", 1, *schedule)
    assert r.returncode == 0 and f"_longrope{'' if phi3 else '4'}-{file.stem}_steps4.png" in r.stdout


@pytest.mark.parametrize("content,msg", [(None, "cannot read a rope-scaling dict"), ("{not json", "cannot read"),
                                         ("[1, 2]", "holds no HF rope-scaling dict"),
                                         ('{"rope_type": "longrope", "long_factor": [1]}', "needs a list of 8")])
def test_bad_rope_scaling_file_gets_one_line(ckpt_bytes, tmp_path, content, msg):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    r = run_script("sample.py", "--model", ckpt_bytes, "--device", "cpu", "--prompt", "Hi", "--rope-scaling", path)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_rope_py_draws_a_longrope_curve(tmp_path):
    f = tmp_path / "f.json"
    f.write_text(json.dumps(dict(long_factor=[1.0 + j for j in range(64)], short_factor=[1.0] * 64, factor=8.0)))
    r = subprocess.run([sys.executable, "rope.py", "--longrope", f, "--out", tmp_path / "x.png"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("LLaMA3-8B")[0].count("LongRoPE") == 1  # a row in the first model's table
    assert (tmp_path / "x_methods.png").exists()
    f.write_text(json.dumps(dict(long_factor=[1.0] * 3, short_factor=[1.0] * 3)))
    r = subprocess.run([sys.executable, "rope.py", "--longrope", f, "--out", tmp_path / "x.png"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--longrope" in r.stderr


def test_no_import_circle_among_the_project_files():
    """Every import between the project's files, at the top or inside a function, runs one way."""
    import ast
    files = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {name: {n for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import,
                                                                                           ast.ImportFrom))
                    for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
                    if n in files} for name, path in files.items()}
    assert "cli" in graph["sample"] and "rope" in graph["model"] and "plots" in graph["rope"]  # the walk sees them
    done, stack = set(), []

    def visit(name):
        assert name not in stack, f"import circle: {' -> '.join(stack + [name])}"
        if name not in done:
            stack.append(name)
            for other in graph[name]:
                visit(other)
            stack.pop()
            done.add(name)
    for name in graph:
        visit(name)
