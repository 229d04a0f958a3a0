"""qk_states.py (LongLLaDA Fig. 5): the states it takes out of the model, the t-SNE, the script."""
import numpy as np
import pytest
import torch

from conftest import run_script, write_byte_tokenizer
from qk_states import qk_states, tsne
from rope import apply_rope, inv_freq, rope_cos_sin


def neighbours(z, k):
    d = torch.cdist(z, z)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False).indices


def kept_neighbours(x, z, k=10):
    """The share of each point's k nearest neighbours in x that are among its k nearest in z."""
    a, b = neighbours(x, k), neighbours(z, k)
    return sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(len(x))) / (k * len(x))


def test_separated_clusters_stay_apart():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(100)
    x = (torch.randn(3, 20, generator=g) * 10)[labels] + torch.randn(300, 20, generator=g)
    nearest = neighbours(tsne(x), 1)[:, 0]
    assert torch.equal(labels[nearest], labels)  # every point's nearest 2-D neighbour is in its own cluster


def test_a_curve_keeps_its_neighbours_where_pca_does_not():
    g = torch.Generator().manual_seed(4)
    t = torch.linspace(0, 1, 500)[:, None]
    freqs, phase = torch.randn(1, 25, generator=g) * 80, torch.rand(1, 25, generator=g) * 6.28
    x = torch.cat([torch.sin(t * freqs + phase), torch.cos(t * freqs + phase)], 1)  # a smooth closed-ish curve, 50-D
    centred = x - x.mean(0)
    pca = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:2].T
    assert kept_neighbours(x, pca) < 0.5  # 0.40: a linear map folds the curve onto itself
    assert kept_neighbours(x, tsne(x)) > 0.75  # 0.95


def test_deterministic_for_a_seed():
    x = torch.randn(120, 16, generator=torch.Generator().manual_seed(0))
    a, b, c = tsne(x, 10, seed=3), tsne(x, 10, seed=3), tsne(x, 10, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_states_are_the_layers_queries_and_keys_after_rope(tiny, expected):
    ids = expected["long.ids"][:, :100]
    inputs = []
    block = tiny.transformer.blocks[-1]
    hook = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    pos, q, k = qk_states(tiny, ids, layer=-1, points=25)
    hook.remove()
    h = block.attn_norm(inputs[0])
    cos, sin = rope_cos_sin(torch.arange(100), inv_freq(tiny.config.head_dim, tiny.config.rope_theta))
    for proj, got in [(block.q_proj, q), (block.k_proj, k)]:
        want = apply_rope(proj(h).view(1, 100, 4, 16).transpose(1, 2), cos, sin)  # (1, nh, T, hs)
        torch.testing.assert_close(got, want[0, :, pos].transpose(0, 1).reshape(25, 64), atol=1e-5, rtol=0)
    assert pos[0] == 0 and pos[-1] == 99 and len(set(pos.tolist())) == 25
    assert block.capture is None  # nothing kept after the call


@pytest.fixture
def doc(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text(" ".join(f"word{i % 37}" for i in range(400)))
    return f


def test_script_draws_saves_and_compares(ckpt_bytes, llama_copy, doc, tmp_path):
    write_byte_tokenizer(llama_copy, bos=True)
    runs = []
    for model, extra in [(ckpt_bytes, ["--rope-scale", 4]), (llama_copy, [])]:
        out = tmp_path / f"{model.name}.png"
        r = run_script("qk_states.py", "--model", model, "--text", doc, "--length", 300, "--points", 80,
                       "--perplexity", 10, "--device", "cpu", "--out", out, *extra)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:4] == b"\x89PNG"
        with np.load(out.with_suffix(".npz")) as f:
            assert f["positions"].shape == (80,) and f["queries"].shape == f["keys"].shape == (80, 2)
            assert np.isfinite(f["queries"]).all() and f["positions"][-1] == 299
        runs.append(out.with_suffix(".npz"))
    r = run_script("qk_states.py", "--compare", *runs, "--out", tmp_path / "both.png")
    assert r.returncode == 0 and (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line(ckpt_bytes, doc, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 " * 500)
    args = ["--device", "cpu", "--out", tmp_path / "x.png", "--points", 50, "--perplexity", 5]
    for extra, msg in [(["--model", ckpt_bytes, "--text", doc, "--length", 5000], "has 2689 tokens; --length 5000"),
                       (["--model", ckpt_bytes, "--text", bad], "is not UTF-8 text"),
                       (["--model", tmp_path / "none", "--text", doc], "model folder not found"),
                       (["--model", ckpt_bytes, "--text", doc, "--length", 300, "--layer", 2], "has 2 layers"),
                       (["--compare", doc, doc], "not a file written by qk_states.py")]:
        r = run_script("qk_states.py", *args, *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr
