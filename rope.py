"""Rotary position embedding (RoPE), static NTK, and the RoPE extrapolation scaling law.

RoPE rotates each (dim j, dim j + d/2) pair of a query/key by the angle m * theta_j, so that the
dot product of a query at position m and a key at position n depends only on m - n. A model only
ever sees the relative positions of its training: [0, T-1] for a causal LM, but [-(T-1), T-1] for a
bidirectional diffusion LM such as LLaDA (LongLLaDA, Sec. 3.2). `python rope.py` prints the scaling
law's numbers and draws a picture of that difference (LongLLaDA, Fig. 4).
"""
import argparse
import math

import torch


def inv_freq(head_dim, base, device=None):
    """theta_j = base^(-2j/d), j = 0..d/2-1 (RoFormer, Su et al. 2021, Eq. 15), built in fp32 like LLaDA."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(seq_len, head_dim, base, device=None):
    """cos and sin of m * theta_j for positions m = 0..T-1, each (T, d) in fp32.

    Frequency j drives dims j and j + d/2 (the half-split layout of the LLaDA and HF LLaMA weights):
    emb = cat(angles, angles). Positions start at 0 for every query and key, padding or not."""
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq(head_dim, base, device))  # (T, d/2)
    emb = torch.cat((angles, angles), dim=-1)  # (T, d)
    return emb.cos(), emb.sin()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: multiplication by i in the half-split layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x' = x * cos(m theta) + rotate_half(x) * sin(m theta), computed in fp32 and cast back to x's dtype.

    x: (B, nh, T, hs); cos, sin: (T, hs). Interleaved-pair layouts (Meta's original LLaMA code) give
    wrong logits on these checkpoints without any error, so the layout is pinned by a test."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# --- the scaling law (Liu et al. 2023, "Scaling Laws of RoPE-based Extrapolation", arXiv 2310.05209) ---

def critical_dim(head_dim, base, train_len):
    """d_extra = 2 * ceil((d/2) * log_base(T_train / (2 pi))): the dims whose period 2 pi base^(2j/d) fits
    inside the training length, i.e. the dims that saw every angle of a full turn in training (Eq. 3)."""
    return 2 * math.ceil(head_dim / 2 * math.log(train_len / (2 * math.pi), base))


def extrapolation_bound(head_dim, base, train_len, scale=1.0):
    """T_extra = 2 pi (scale * base)^(d_extra / d): the period of the critical dim once the base is
    multiplied by `scale`; beyond it that dim meets angles it never saw in training (Eq. 4)."""
    return 2 * math.pi * (scale * base) ** (critical_dim(head_dim, base, train_len) / head_dim)


def ntk_scale_for(target_len, head_dim, base, train_len):
    """lambda = ceil(base^-1 * (T / (2 pi))^(d / d_extra)): the smallest integer factor whose bound reaches T.

    LongLLaDA (Sec. 4) applies it as *static NTK*: rope_theta <- lambda * rope_theta, for every dim and
    at every length. HF's "NTK-aware" form writes the new base as base * alpha^(d/(d-2)) so that the
    lowest frequency is stretched exactly alpha times; the two are the same family with
    lambda = alpha^(d/(d-2)) (alpha = lambda^((d-2)/d), e.g. lambda 14 <-> alpha 13.45 at d = 128)."""
    d_extra = critical_dim(head_dim, base, train_len)
    return math.ceil((target_len / (2 * math.pi)) ** (head_dim / d_extra) / base)


# --- python rope.py: the table and the picture ---

def parse_lengths(text):
    """'2k,4k,20000' -> [2048, 4096, 20000] (k = 1024 tokens); ValueError on anything else."""
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",")]


PRESETS = [  # name, head_dim, base, train_len, bidirectional
    ("LLaDA-8B", 128, 500000.0, 4096, True),
    ("LLaMA3-8B", 128, 500000.0, 8192, False),
]


def print_table(models, targets):
    """Per model: the critical dim, the bound at lambda = 1, and per target length: lambda (the bound it gives)."""
    names = [f"{t / 1024:g}k" if t % 1024 == 0 else str(t) for t in targets]
    print(f"{'model':<10} {'d_extra':>7} {'T_extra':>7}" + "".join(f"{'lambda ' + n:>15}" for n in names))
    for name, d, base, train_len, _ in models:
        lams = [ntk_scale_for(t, d, base, train_len) for t in targets]
        cells = [f"{lam} ({extrapolation_bound(d, base, train_len, lam):.0f})" for lam in lams]
        print(f"{name:<10} {critical_dim(d, base, train_len):>7} {extrapolation_bound(d, base, train_len):>7.0f}"
              + "".join(f"{c:>15}" for c in cells))


def main():
    p = argparse.ArgumentParser(description="RoPE scaling-law table and the LongLLaDA Fig. 4 picture.")
    p.add_argument("--head-dim", type=int, help="head dimension of a custom model (default: the presets)")
    p.add_argument("--base", type=float, help="rope_theta of a custom model")
    p.add_argument("--train-len", type=int, help="trained context length of a custom model")
    p.add_argument("--causal", action="store_true", help="the custom model is causal (default: bidirectional)")
    p.add_argument("--target", default="8k,16k,24k,32k", help="target lengths for lambda, e.g. 8k,16k or 20000")
    p.add_argument("--out", default="rope_extrapolation.png", help="where to write the picture")
    args = p.parse_args()
    try:
        targets = parse_lengths(args.target)
    except ValueError:
        p.error(f"--target: expected lengths like 8k,16k or 20000, got {args.target!r}")
    models = PRESETS
    if args.head_dim or args.base or args.train_len:
        _, d, base, train_len, _ = PRESETS[0]
        d, base, train_len = args.head_dim or d, args.base or base, args.train_len or train_len
        if d < 2 or d % 2 or base <= 1 or train_len < 8 or min(targets) < 1:
            p.error("need an even --head-dim >= 2, --base > 1, --train-len >= 8 and positive --target")
        models = [("custom", d, base, train_len, not args.causal)]
    print_table(models, targets)
    span = max(max(targets) // 2, 2 * max(train_len for _, _, _, train_len, _ in models))
    from plots import rope_rotations  # imported here: plots.py imports rope.py at its top
    rope_rotations(models, span, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
