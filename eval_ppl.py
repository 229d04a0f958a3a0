"""Perplexity against context length for a diffusion LM (LongLLaDA Fig. 1a; protocol in REFERENCE.md section 3)."""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import (ArgumentParser, all_gather, check_length, count, distributed, load_tokenizer, model_flags,
                 parse_lengths, progress, read_text, rope_label, run_cli, save_json)
from model import UserError, load_model
from plots import ppl_curves


def draw_masks(mc_num, L, generator=None):
    """(mc_num, L) bool: per sample, k ~ U{1..L} positions chosen uniformly (the ranks of random keys below k)."""
    k = torch.randint(1, L + 1, (mc_num, 1), generator=generator)
    return torch.rand(mc_num, L, generator=generator).argsort(1) < k


@torch.no_grad()
def chunk_nll(model, prefix, answer, mc_num=8, mask_id=None, batch=None, generator=None):
    """Per-token negative conditional ELBO of `answer` given the clean `prefix`, in nats (LLaDA Eq. 6).

    Each Monte-Carlo sample masks k ~ U{1..L} random answer positions and takes the mean cross-entropy
    over them; E[(1/k) sum_{i in S} CE_i] is the per-token bound E[(L/k) sum CE_i] / L. The samples go
    through the model together (`batch` rows at most) and the LM head runs on the masked positions only."""
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    P, L, dev = len(prefix), len(answer), model.device
    masked = draw_masks(mc_num, L, generator)  # (mc, L)
    seq, answer = torch.cat([prefix, answer]).to(dev), answer.to(dev)
    total, shift = 0.0, int(model.config.model_type == "dream")  # Dream: row i - 1's logits predict token i
    for m in masked.to(dev).split(batch or mc_num):
        x = seq.repeat(len(m), 1)  # (n, P + L)
        x[:, P:][m] = mask_id
        logits = model(x, logits_at=F.pad(m, (P - shift, shift)))  # (N, V): the rows predicting the masked tokens
        ce = F.cross_entropy(logits.float(), answer.expand_as(m)[m], reduction="none")
        per_sample = torch.zeros(m.shape, dtype=torch.float64, device=dev).masked_scatter_(m, ce.double())
        total += (per_sample.sum(1) / m.sum(1)).sum().item()
    return total / mc_num


@torch.no_grad()
def next_token_nll(model, ids, piece=1024):
    """Per-token next-token cross-entropy (T-1,) of a causal model, from one forward; the LM head runs on
    `piece` positions at a time (16k x 128k full logits would be 4 GB in bf16)."""
    ids = ids.to(model.device)
    h = model.hidden_states(ids[None])[0, :-1]  # (T-1, C): position t predicts token t+1
    return torch.cat([F.cross_entropy(model.lm_head(h[s:s + piece]).float(), ids[s + 1:s + 1 + piece], reduction="none")
                      for s in range(0, len(h), piece)])


def curve(run):
    """(context lengths, perplexity): exp of the cumulative mean of the chunk values (the cumulative geometric mean),
    or, for a run of chosen lengths (--at), of each chunk's own value."""
    nll = torch.tensor([c["nll"] for c in run["chunks"]], dtype=torch.float64)
    mean = nll if "at" in run["settings"] else nll.cumsum(0) / torch.arange(1, len(nll) + 1)
    return [c["length"] for c in run["chunks"]], mean.exp().tolist()


def plot(runs, out):
    curves = [(f"{r['settings']['model']} ({rope_label(r['settings'])})", *curve(r), "at" in r["settings"])
              for r in runs]
    for label, lengths, ppl, at in curves:  # and in numbers: the curve at each doubling of the context, or each point
        print(f"{label}: " + ", ".join(f"{n} {p:.3f}" for n, p in zip(lengths, ppl) if at or n & (n - 1) == 0))
    ppl_curves(curves, [r["train_len"] for r in runs], out)


def main():
    p = ArgumentParser("Perplexity against context length (LongLLaDA Fig. 1a).")
    model_flags(p)
    p.add_argument("--text", help="a long text file, tokenized with the model's tokenizer")
    p.add_argument("--max-len", type=count, default=16384, help="longest context in tokens (the curve's end)")
    p.add_argument("--at", type=parse_lengths, metavar="LENGTHS", help="only the chunks ending at these lengths (e.g. "
                   "2k,4k,8k; multiples of --chunk), each given all the text before it; the longest replaces --max-len")
    p.add_argument("--chunk", type=count, default=64, help="answer chunk length in tokens")
    p.add_argument("--mc", type=count, default=8, help="Monte-Carlo samples per chunk")
    p.add_argument("--seed", type=int, default=0, help="seed; each chunk draws its masks from (seed, chunk)")
    p.add_argument("--batch", type=count, default=8, help="most sequences per forward (lower it to save memory)")
    p.add_argument("--out", default="results/ppl.json", help="JSON to write (and resume); the PNG goes beside it")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="only overlay these runs in one figure (--out PNG)")
    args = p.parse_args()
    out, c = Path(args.out), args.chunk
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.compare:
        return plot([json.loads(Path(f).read_text()) for f in args.compare], out.with_suffix(".png"))
    max_len = max(args.at) if args.at else args.max_len
    if not args.model or not args.text:
        raise UserError("need --model (a checkpoint folder) and --text (a long text file)")
    if min(args.at or [max_len]) < 2 * c or any(n % c for n in args.at or []):
        raise UserError(f"each length must be at least 2 chunks ({2 * c} tokens), and each --at length a multiple of "
                        f"--chunk ({c})")
    # The tokenizer's defaults: LLaMA-3's and SMDM's BOS is context, never scored (nor is chunk 0), LLaDA gets none.
    ids = torch.tensor(load_tokenizer(args.model).encode(read_text(args.text)).ids)
    if len(ids) < max_len:
        raise UserError(f"{args.text} has {len(ids)} tokens; a context of {max_len} needs at least that many")
    settings = dict(model=Path(args.model).name, text=Path(args.text).name, max_len=max_len, chunk=c, mc=args.mc,
                    rope_scale=args.rope_scale, rope_scaling=args.rope_scaling, seed=args.seed)
    settings |= dict(at=sorted(set(args.at))) if args.at else {}
    run = json.loads(out.read_text()) if out.exists() else dict(settings=settings, chunks=[])
    if run["settings"] != settings:  # never mix runs: a resume must continue the same experiment
        raise UserError(f"{out} holds a run with other settings {run['settings']}; choose another --out")
    rank, world, device = distributed(args.device)
    model = load_model(args.model, device, rope_scale=args.rope_scale, rope_scaling=args.rope_scaling,
                       verbose=rank == 0)
    run["train_len"], finished = model.config.max_sequence_length, {chunk["length"] for chunk in run["chunks"]}
    check_length(model, max_len)
    todo = [n // c - 1 for n in settings.get("at", range(2 * c, max_len + 1, c)) if n not in finished]  # chunk indexes
    if model.config.causal:  # AR baseline: ordinary next-token perplexity, from one causal forward
        nll = next_token_nll(model, ids[:max_len]).cpu()
        run["chunks"] += [dict(length=(i + 1) * c, nll=nll[i * c - 1:(i + 1) * c - 1].mean().item()) for i in todo]
        todo = []

    def value(i):  # chunk i's masks depend on (seed, i) only: the same draws on any rank and in any rerun
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        return chunk_nll(model, ids[:i * c], ids[i * c:(i + 1) * c], args.mc, batch=args.batch, generator=gen)

    t0, work, show = time.time(), sum(todo), progress(len(todo))  # chunk i costs about i units
    for r in range(0, len(todo), world):  # under torchrun, rank k takes chunk todo[r + k] of each round
        now = todo[r:r + world]
        values = sum(all_gather([value(i) for i in now[rank:rank + 1]], world), [])
        run["chunks"] += [dict(length=(i + 1) * c, nll=v) for i, v in zip(now, values)]
        if rank == 0:  # after every round: an interrupted run resumes where it stopped
            save_json(run, out)
            done, seconds = sum(todo[:r + world]), time.time() - t0
            show(min(r + world, len(todo)), f"chunk {now[-1]}/{todo[-1]}  ppl {curve(run)[1][-1]:.3f}  "
                 f"{done * c * args.mc / seconds:,.0f} tok/s  ETA {seconds / done * (work - done) / 60:.1f} min")
    if rank == 0:
        save_json(run, out)
        plot([run], out.with_suffix(".png"))
        print(f"perplexity {curve(run)[1][-1]:.3f} at {run['chunks'][-1]['length']} tokens; wrote {out} and its PNG")


if __name__ == "__main__":
    run_cli(main)
