"""The last layer's queries and keys of a long text, embedded in 2-D with t-SNE (LongLLaDA Fig. 5).

One forward over the first N tokens; one layer's queries and keys (all heads; a GQA key head repeated for the
query heads it serves, as attention pairs them), taken after RoPE: the figure is about position, and RoPE is
what writes the position into them and what attention compares. In the paper, LLaMA3-8B (causal) splits into
two clusters, inside and beyond its 8k trained length, while LLaDA-8B (bidirectional) forms one continuous
manifold: no position beyond the trained length looks new to it, which is why its perplexity stays flat.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch

from cli import ArgumentParser, load_tokenizer, model_flags, positive, read_text, rope_label, run_cli
from model import UserError, load_model, read_config
from plots import qk_scatter


@torch.no_grad()
def tsne(x, perplexity=30.0, seed=0, iters=1000):
    """Exact t-SNE (van der Maaten & Hinton 2008, JMLR 9): x (N, D) -> (N, 2), deterministic for a seed, on x's device.

    P: around each point a Gaussian over the others, its width found by binary search so that its perplexity
    2^H is `perplexity`; symmetrised, p_ij = (p_j|i + p_i|j) / 2N. Q: a Student-t kernel on the 2-D points,
    q_ij ~ 1 / (1 + |y_i - y_j|^2). Gradient descent on KL(P || Q), dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j) /
    (1 + |y_i - y_j|^2), with early exaggeration (P x 12, the first 250 iterations), momentum 0.5 then 0.8 and
    per-coordinate adaptive gains, as in the paper; learning rate max(N / 48, 50) (Belkina et al. 2019)."""
    n, dev = len(x), x.device
    d2 = torch.cdist(x.double(), x.double()).square()
    d2 = d2 / d2.mean()  # scale-free: the search below starts near the right width
    d2.fill_diagonal_(math.inf)  # a point is not its own neighbour
    d2 = d2 - d2.min(1, keepdim=True).values  # exp() of the nearest is 1: no underflow
    target = math.log(min(perplexity, n - 1))  # entropy in nats of the wanted distribution
    beta, lo, hi = (torch.full((n, 1), v, dtype=torch.float64, device=dev) for v in (1.0, 0.0, math.inf))
    for _ in range(100):  # bisection on the precision beta = 1 / (2 sigma^2), all points at once
        p = torch.exp(-d2 * beta)
        p = p / p.sum(1, keepdim=True)
        entropy = -(p * p.clamp_min(1e-300).log()).sum(1, keepdim=True)
        too_wide = entropy > target
        lo, hi = torch.where(too_wide, beta, lo), torch.where(too_wide, hi, beta)
        beta = torch.where(hi.isinf(), beta * 2, (lo + hi) / 2)
    P = ((p + p.T) / (2 * n)).clamp_min(1e-12).float()
    y = torch.randn(n, 2, generator=torch.Generator(dev).manual_seed(seed), device=dev) * 1e-4
    update, gains, lr = torch.zeros_like(y), torch.ones_like(y), max(n / 48, 50.0)
    for it in range(iters):
        num = 1 / (1 + torch.cdist(y, y).square())
        num.fill_diagonal_(0)
        w = ((12.0 if it < 250 else 1.0) * P - (num / num.sum()).clamp_min(1e-12)) * num
        grad = 4 * (w.sum(1, keepdim=True) * y - w @ y)
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = (0.5 if it < 250 else 0.8) * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    return y


@torch.no_grad()
def qk_states(model, ids, layer=-1, points=2000):
    """One forward over ids (1, T): (positions, queries, keys) of `layer` after RoPE at `points` evenly spaced
    positions, each (P, n_heads * head_dim). The block's `capture` list receives them (model.py)."""
    block = model.transformer.blocks[layer]
    block.capture = []
    try:
        model.hidden_states(ids)
        q, k = block.capture  # (1, nh, T, hs), (1, nkv, T, hs)
    finally:
        block.capture = None
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: each key head serves nh / nkv query heads
    pos = torch.linspace(0, ids.shape[1] - 1, min(points, ids.shape[1]), device=ids.device).round().long()
    return pos, *(s[0, :, pos].transpose(0, 1).reshape(len(pos), -1) for s in (q, k))  # (P, nh * hs) each


def main():
    p = ArgumentParser("The last layer's query/key states in 2-D, coloured by position (LongLLaDA Fig. 5).")
    model_flags(p)
    p.add_argument("--text", help="a long text file, tokenized with the model's tokenizer")
    p.add_argument("--length", type=int, default=16384, help="tokens of the text to run (the first ones)")
    p.add_argument("--layer", type=int, default=-1, help="which layer's states (-1: the last)")
    p.add_argument("--points", type=int, default=2000, help="evenly spaced positions to embed")
    p.add_argument("--perplexity", type=positive, default=30.0, help="t-SNE perplexity (effective neighbours)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE seed")
    p.add_argument("--out", default="results/qk_states.png", help="the PNG; its 2-D points go beside it (.npz)")
    p.add_argument("--compare", nargs=2, metavar="NPZ", help="only draw two saved runs side by side (--out PNG)")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        qk_scatter([load_run(f) for f in args.compare], out)
        return print(f"wrote {out}")
    if not args.model or not args.text or args.length < 2 or args.points < 2:
        raise UserError("need --model and --text, a --length of at least 2 and --points of at least 2")
    config = read_config(args.model)
    if not -config.n_layers <= args.layer < config.n_layers:
        raise UserError(f"--layer {args.layer}: the model has {config.n_layers} layers (0..{config.n_layers - 1})")
    ids = load_tokenizer(args.model).encode(read_text(args.text)).ids  # the tokenizer's own specials, as everywhere
    if len(ids) < args.length:
        raise UserError(f"{args.text} has {len(ids)} tokens; --length {args.length} needs at least that many")
    if args.perplexity >= min(args.points, args.length) - 1:
        raise UserError(f"--perplexity {args.perplexity:g} needs more --points (t-SNE: perplexity < points - 1)")
    model = load_model(args.model, args.device, rope_scale=args.rope_scale, rope_scaling=args.rope_scaling,
                       verbose=True)
    pos, q, k = qk_states(model, torch.tensor([ids[:args.length]], device=model.device), args.layer, args.points)
    run = dict(positions=pos.cpu().numpy(), queries=tsne(q, args.perplexity, args.seed).cpu().numpy(),
               keys=tsne(k, args.perplexity, args.seed).cpu().numpy())
    meta = dict(model=Path(args.model).name, length=args.length, layer=args.layer % config.n_layers,
                causal=config.causal, train_len=config.max_sequence_length, rope_scale=args.rope_scale,
                rope_scaling=args.rope_scaling, text=Path(args.text).name)
    np.savez(out.with_suffix(".npz"), **run, meta=json.dumps(meta))
    qk_scatter([load_run(out.with_suffix(".npz"))], out)
    print(f"wrote {out} and {out.with_suffix('.npz')}")


def load_run(path):
    """A run saved by this script: its positions, 2-D queries and keys, and settings."""
    try:
        with np.load(path) as f:
            run, meta = {k: f[k] for k in ("positions", "queries", "keys")}, json.loads(str(f["meta"]))
    except (ValueError, KeyError) as e:
        raise UserError(f"{path} is not a file written by qk_states.py ({e})") from None
    title = f"{meta['model']}, {meta['length']:,} tokens, layer {meta['layer']}\n{rope_label(meta)}"
    return run | dict(title=title, train_len=meta["train_len"])


if __name__ == "__main__":
    run_cli(main)
