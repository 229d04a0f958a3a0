"""Rotary position embedding (RoPE), its scaling methods, and the RoPE extrapolation scaling law.

RoPE rotates each (dim j, dim j + d/2) pair of a query/key by the angle m * theta_j, so that the dot product of a
query at position m and a key at position n depends only on m - n. A model only ever sees the relative positions of
its training: [0, T-1] for a causal LM, but [-(T-1), T-1] for a bidirectional diffusion LM such as LLaDA (LongLLaDA,
Sec. 3.2). `python rope.py` prints the scaling law's numbers and what each scaling method sets, and draws them.
This file imports nothing from the project: model.py and cli.py build on it.
"""
import argparse
import json
import math

import torch


def inv_freq(head_dim, base, device=None):
    """theta_j = base^(-2j/d), j = 0..d/2-1 (RoFormer, Su et al. 2021, Eq. 15), built in fp32 like LLaDA."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


# --- scaling methods (HF `modeling_rope_utils`): theta_j -> theta'_j, and an attention factor a for cos and sin ---
# Each reads a HF rope_scaling dict `s` (as checkpoints.rope_scaling_config leaves it), with HF names and defaults.

def linear_inv_freq(theta, s, **_):
    """Position interpolation (Chen et al. 2023, arXiv 2306.15595; HF "linear"): theta'_j = theta_j / s, the same
    as reading position m as m / s, so s times the trained length maps into the trained range. a = 1."""
    return theta / s["factor"], 1.0


def dynamic_inv_freq(theta, s, head_dim, base, max_len, seq_len):
    """Dynamic NTK (2023; HF `_compute_dynamic_ntk_parameters`): base' = base * (s L / T_max - (s - 1))^(d / (d-2))
    with L = max(T, T_max) for the current length T: nothing changes up to T_max, then the base grows with T. a = 1."""
    grown = s["factor"] * max(seq_len, max_len) / max_len - (s["factor"] - 1)
    return inv_freq(head_dim, base * grown ** (head_dim / (head_dim - 2)), theta.device), 1.0


def mscale(k, factor):
    """YaRN's attention scale 0.1 k ln(s) + 1 (1 for s <= 1)."""
    return 0.1 * k * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_inv_freq(theta, s, head_dim, base, **_):
    """YaRN (Peng et al. 2023, arXiv 2309.00071; HF `_compute_yarn_parameters`): pairs that turn fewer than
    beta_slow (1) times in T0 = original_max_position_embeddings tokens are interpolated (theta_j / s), pairs that
    turn more than beta_fast (32) times are kept, with a linear ramp between; pair j turns r times in T0 tokens at
    j = c(r) = d ln(T0 / (2 pi r)) / (2 ln base). a = 0.1 ln(s) + 1 (or attention_factor, or a ratio of mscales)."""
    factor, t0 = s["factor"], s["original_max_position_embeddings"]
    low, high = (head_dim * math.log(t0 / (2 * math.pi * r)) / (2 * math.log(base))  # c(beta_fast), c(beta_slow)
                 for r in (s.get("beta_fast") or 32, s.get("beta_slow") or 1))
    if s.get("truncate", True):
        low, high = max(math.floor(low), 0), min(math.ceil(high), head_dim - 1)
    j = torch.arange(head_dim // 2, device=theta.device, dtype=torch.float32)
    keep = 1 - ((j - low) / (high - low if high != low else 0.001)).clamp(0, 1)  # 1: extrapolate, 0: interpolate
    a = s.get("attention_factor") or (mscale(s["mscale"], factor) / mscale(s["mscale_all_dim"], factor)
                                      if s.get("mscale") and s.get("mscale_all_dim") else mscale(1, factor))
    return theta / factor * (1 - keep) + theta * keep, a


def llama3_inv_freq(theta, s, **_):
    """LLaMA-3.1 (Meta 2024; HF `_compute_llama3_parameters`): with wavelength w_j = 2 pi / theta_j and T0 =
    original_max_position_embeddings, pairs with w_j < T0 / high_freq_factor are kept, pairs with w_j > T0 /
    low_freq_factor are divided by s, and between them theta'_j = (1 - k) theta_j / s + k theta_j with
    k = (T0 / w_j - low_freq_factor) / (high_freq_factor - low_freq_factor). a = 1."""
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    smooth = ((s["original_max_position_embeddings"] * theta / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
    return (1 - smooth) * theta / s["factor"] + smooth * theta, 1.0


def longrope_inv_freq(theta, s, head_dim, base, seq_len, **_):
    """LongRoPE (Ding et al. 2024, arXiv 2402.13753; HF `_compute_longrope_parameters`): one searched factor f_j per
    pair, theta'_j = 1 / (f_j base^(2j/d)) in fp32, f = long_factor for a forward longer than T0 =
    original_max_position_embeddings, else short_factor. a = sqrt(1 + ln s / ln T0) at every length (1 if s <= 1),
    or attention_factor; s = factor, by default max_position_embeddings / T0."""
    t0, factor = s["original_max_position_embeddings"], s["factor"]
    f = torch.tensor(s["long_factor" if (seq_len or 0) > t0 else "short_factor"], device=theta.device)
    a = s.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(t0)) if factor > 1 else 1.0)
    return 1.0 / (f.float() * base ** (torch.arange(0, head_dim, 2, device=theta.device).float() / head_dim)), a


SCALING_METHODS = dict(linear=linear_inv_freq, dynamic=dynamic_inv_freq, yarn=yarn_inv_freq, llama3=llama3_inv_freq,
                       longrope=longrope_inv_freq)


def scaled_inv_freq(head_dim, base, scaling=None, max_len=None, seq_len=None, device=None):
    """(theta'_j, attention factor) for a forward over seq_len positions (only dynamic NTK looks at it) of a model
    trained on max_len; `scaling`: a HF rope_scaling dict (model.py checks it), None for plain RoPE."""
    theta = inv_freq(head_dim, base, device)
    if scaling is None:
        return theta, 1.0
    return SCALING_METHODS[scaling["rope_type"]](theta, scaling, head_dim=head_dim, base=base, max_len=max_len,
                                                 seq_len=seq_len)


def rope_cos_sin(positions, inv, attention_factor=1.0):
    """cos and sin of m * theta_j (inv: theta_j) at the positions m, in fp32 and times the attention factor:
    positions (T,) give (T, d), per-row positions (B, T) give (B, 1, T, d), to broadcast over the heads. Frequency j
    drives dims j and j + d/2 (the half-split layout of the LLaDA and HF weights): emb = cat(angles, angles)."""
    angles = positions.to(torch.float32)[..., None] * inv  # (..., T, d/2)
    emb = torch.cat((angles, angles), dim=-1)  # (..., T, d)
    emb = emb[:, None] if emb.dim() == 3 else emb  # (B, 1, T, d)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(x, cos, sin):
    """x' = x cos(m theta) + rotate_half(x) sin(m theta) in cos's dtype (LLaDA: fp32; HF LLaMA and Dream cast cos and
    sin to the activations' dtype), cast back; x: (B, nh, T, hs). rotate_half (x1, x2) = (-x2, x1) is multiplication
    by i in the half-split layout; interleaved pairs (Meta's LLaMA code) would give wrong logits silently (tested)."""
    xr = x.to(cos.dtype)
    x1, x2 = xr.chunk(2, dim=-1)
    return (xr * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


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
    LongLLaDA (Sec. 4) applies it as *static NTK*: rope_theta <- lambda * rope_theta, for every dim and at every
    length. HF's "NTK-aware" form writes the new base as base * alpha^(d/(d-2)), so that the lowest frequency is
    stretched exactly alpha times: the same family with lambda = alpha^(d/(d-2)) (lambda 14 <-> alpha 13.45)."""
    d_extra = critical_dim(head_dim, base, train_len)
    return math.ceil((target_len / (2 * math.pi)) ** (head_dim / d_extra) / base)


# --- python rope.py: the tables and the pictures ---

PRESETS = [("LLaDA-8B", 128, 500000.0, 4096, True), ("LLaMA3-8B", 128, 500000.0, 8192, False),  # d, base, T, bidir
           ("Dream-v0-7B", 128, 1e6, 2048, True)]


def methods_for(target, d, base, train_len, longrope=None):
    """Each method set up for `target` tokens: (name, its setting, theta'_j). Static NTK takes the scaling law's
    lambda (the bound it reaches in brackets); the others s = target / train_len, T0 = train_len; LongRoPE a dict."""
    s, lam = target / train_len, ntk_scale_for(target, d, base, train_len)
    bound = extrapolation_bound(d, base, train_len, lam)
    out = [("static NTK", f"lambda {lam} ({bound:.0f})", inv_freq(d, lam * base))]
    cfg = dict(factor=s, original_max_position_embeddings=train_len, low_freq_factor=1.0, high_freq_factor=4.0)
    for kind, name in [("linear", "PI"), ("dynamic", "dynamic NTK"), ("yarn", "YaRN"), ("llama3", "LLaMA-3.1")]:
        inv, a = scaled_inv_freq(d, base, cfg | dict(rope_type=kind), train_len, target)
        base_x = (inv_freq(d, base)[1] / inv[1]).item() ** (d / 2)  # theta_1 = base^(-2/d) gives the new base
        out.append((name, f"s {s:g}" + {"dynamic": f", base x{base_x:.3g}", "yarn": f", a {a:.3f}"}.get(kind, ""), inv))
    if longrope:  # its own factor and T0 if the file gives them
        inv, a = scaled_inv_freq(d, base, cfg | longrope | dict(rope_type="longrope"), train_len, target)
        out.append(("LongRoPE", f"a {a:.3f}", inv))
    return out


def main():
    from plots import rope_rotations, rope_stretch  # here: only a run of this script draws
    p = argparse.ArgumentParser(description="RoPE scaling law and methods: tables, LongLLaDA Fig. 4, each method's "
                                "wavelength stretch.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"error: {message} (see --help)\n")  # one line, as every script's flags
    p.add_argument("--head-dim", type=int, help="head dimension of a custom model (default: the presets)")
    p.add_argument("--base", type=float, help="rope_theta of a custom model")
    p.add_argument("--train-len", type=int, help="trained context length of a custom model")
    p.add_argument("--causal", action="store_true", help="the custom model is causal (default: bidirectional)")
    p.add_argument("--target", type=int, nargs="+", default=[8192, 16384, 24576, 32768], help="target lengths")
    p.add_argument("--longrope", metavar="JSON", help="LongRoPE factors (e.g. LongDLLM's, README) for the first model")
    p.add_argument("--out", default="rope_extrapolation.png", help="Fig. 4; the stretch picture goes beside it")
    args = p.parse_args()
    models = PRESETS
    if args.head_dim or args.base or args.train_len:
        models = [("custom", args.head_dim or 128, args.base or 500000.0, args.train_len or 4096, not args.causal)]
    d, base, train_len = models[0][1:4]
    if d < 2 or d % 2 or base <= 1 or train_len < 8 or min(args.target) < 1:
        p.error("need an even --head-dim >= 2, --base > 1, --train-len >= 8 and --target lengths >= 1")
    try:  # the factors of a HF rope-scaling dict; model.py checks its own
        longrope = args.longrope and {k: v for k, v in json.load(open(args.longrope)).items() if k != "rope_type"}
        assert not longrope or all(len(longrope[k]) == d // 2 for k in ("long_factor", "short_factor"))
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        p.error(f"--longrope {args.longrope}: need a JSON dict with head_dim / 2 long_factor and short_factor values")
    for i, (name, d, base, train_len, _) in enumerate(models):  # one table per model: rows methods, columns targets
        print(f"{name} (trained {train_len}, head_dim {d}, base {base:g}): d_extra {critical_dim(d, base, train_len)},"
              f" T_extra {extrapolation_bound(d, base, train_len):.0f}\n  {'method':<12}" +
              "".join(f"{f'{t / 1024:g}k' if t % 1024 == 0 else t:>19}" for t in args.target))
        rows = [methods_for(t, d, base, train_len, longrope if i == 0 else None) for t in args.target]
        print("\n".join(f"  {r[0][0]:<12}" + "".join(f"{c[1]:>19}" for c in r) for r in zip(*rows)))
    span = max(max(args.target) // 2, 2 * max(train_len for _, _, _, train_len, _ in models))
    rope_rotations([(*m, critical_dim(*m[1:4])) for m in models], span, args.out)
    name, d, base, train_len, _ = models[0]  # the loop above left its own
    stretch = args.out.removesuffix(".png") + "_methods.png"
    rope_stretch(name, [(t, methods_for(t, d, base, train_len, longrope)) for t in args.target], inv_freq(d, base),
                 critical_dim(d, base, train_len), stretch)
    print(f"wrote {args.out} and {stretch}")


if __name__ == "__main__":
    main()
