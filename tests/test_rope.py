import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from rope import apply_rope, critical_dim, extrapolation_bound, inv_freq, ntk_scale_for, rope_cos_sin


def rotated(x, pos, base=10000.0):
    cos, sin = rope_cos_sin(torch.tensor([pos]), inv_freq(x.shape[-1], base))
    return apply_rope(x[None, None, None, :], cos, sin)[0, 0, 0]


def test_dot_product_depends_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    for shift in [3, -5, 0]:
        dots = [rotated(q, m) @ rotated(k, m - shift) for m in range(10, 40, 7)]
        assert torch.allclose(torch.stack(dots), dots[0].expand(len(dots)), atol=1e-4)
    assert not torch.allclose(rotated(q, 20) @ rotated(k, 17), rotated(q, 20) @ rotated(k, 11), atol=1e-3)


def test_layout_is_half_split_not_interleaved():
    # Frequency j must rotate the pair (j, j + d/2). A unit vector on dim 0 at position 1 turns by
    # theta_0 = 1 radian into dim d/2. In the interleaved layout it would turn into dim 1 instead.
    d = 8
    x = torch.zeros(d)
    x[0] = 1.0
    y = rotated(x, 1, base=10000.0)
    expected = torch.zeros(d)
    expected[0], expected[d // 2] = math.cos(1.0), math.sin(1.0)
    assert torch.allclose(y, expected, atol=1e-6)


def test_position_zero_is_identity_and_dtype_is_kept():
    x = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(5), inv_freq(8, 500000.0))
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16 and torch.equal(y[:, :, 0], x[:, :, 0])


def test_scaling_law_numbers_from_reference():
    assert critical_dim(128, 5e5, 4096) == 64  # LLaDA-8B
    assert critical_dim(128, 5e5, 8192) == 70  # LLaMA3-8B
    assert critical_dim(128, 1e4, 4096) == 92  # LLaMA2-7B
    assert round(extrapolation_bound(128, 5e5, 4096)) == 4443
    assert round(extrapolation_bound(128, 5e5, 8192)) == 8219
    assert [ntk_scale_for(t, 128, 5e5, 4096) for t in (8192, 16384, 24576, 32768)] == [4, 14, 31, 55]
    assert [ntk_scale_for(t, 128, 5e5, 8192) for t in (16384, 32768)] == [4, 13]
    bounds = [extrapolation_bound(128, 5e5, 4096, lam) for lam in (4, 14, 31, 55)]
    assert [round(b) for b in bounds] == [8886, 16624, 24737, 32949]


@pytest.mark.parametrize("target", [5000, 8192, 20000, 32768])
def test_ntk_scale_is_the_smallest_integer_reaching_the_target(target):
    lam = ntk_scale_for(target, 128, 5e5, 4096)
    assert extrapolation_bound(128, 5e5, 4096, lam) >= target > extrapolation_bound(128, 5e5, 4096, lam - 1)


def test_cli_prints_table_and_writes_png(tmp_path):
    out = tmp_path / "fig4.png"
    r = subprocess.run([sys.executable, "rope.py", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "LLaDA-8B" in r.stdout and "LLaMA3-8B" in r.stdout
    assert "lambda 55 (32949)" in r.stdout and "lambda 13 (33419)" in r.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig4_methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_target(tmp_path):
    r = subprocess.run([sys.executable, "rope.py", "--target", "lots", "--out", str(tmp_path / "x.png")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--target" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
