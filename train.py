"""Train a tiny diffusion LM with LLaDA's objective, or its causal twin, from scratch on a CPU: the paper's phenomena
on a laptop. Both use model.py's own class and are saved in the real layout (LLaDA's or HF LLaMA's config.json,
model.safetensors, tokenizer.json), so that every script of the project reads them unchanged."""
import json
import math
import os
import random
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cli import ArgumentParser, count, progress, read_text, run_cli
from checkpoints import LLADA_KEYS, module_name
from haystack import generated_sentences
from model import LLaDA, LLaDAConfig, UserError


def diffusion_loss(model, x, mask_id, generator=None, eps=1e-3):
    """LLaDA's pre-training loss (Nie et al. 2025, Eq. 3): per sequence t ~ U(0, 1), each token masked with probability
    p = (1 - eps) t + eps; the masked tokens' cross-entropy, each divided by p (every rate weighs alike: a bound on
    the negative log-likelihood), summed and averaged over all B x L tokens. The LM head runs on masked rows only."""
    B, L = x.shape
    p = ((1 - eps) * torch.rand(B, 1, generator=generator) + eps).expand(B, L)  # (B, L)
    masked = torch.rand(B, L, generator=generator) < p
    logits = model(torch.where(masked, mask_id, x), logits_at=masked)  # (N, V)
    return (F.cross_entropy(logits, x[masked], reduction="none") / p[masked]).sum() / (B * L)


def causal_loss(model, x):
    """Next-token cross-entropy, averaged over the positions: the autoregressive twin's objective."""
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def training_loss(model, x, generator=None):
    """The loss a model trains on: LLaDA's for a bidirectional model, next-token for a causal one."""
    mask_id = model.config.mask_token_id
    return causal_loss(model, x) if model.config.causal else diffusion_loss(model, x, mask_id, generator)


def char_tokenizer(text):
    """A character-level `tokenizers` tokenizer over the text's characters, with <unk>, an end-of-text and a mask."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(set(text)) + ["<unk>"])}, [], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # no merges above: one token per character, joined back without spaces
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|mdm_mask|>")])
    return tok


def make_model(kind, vocab, length, layers=4, width=128, seed=0):
    """The project's LLaDA class at toy size (4 heads, base 10000); the causal twin differs only in its mask."""
    torch.manual_seed(seed)
    config = LLaDAConfig(d_model=width, n_heads=4, n_kv_heads=4, n_layers=layers, mlp_hidden_size=width * 8 // 3,
                         vocab_size=vocab, embedding_size=vocab, rope_theta=10000.0, max_sequence_length=length,
                         mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2, eot_token_id=None)
    if kind == "causal":  # as load_model reads a HF LLaMA config back
        config.causal, config.model_type, config.mask_token_id, config.rope_full_precision = True, "llama", None, False
    model = LLaDA(config)
    for p in model.parameters():  # GPT-2's initialisation: normal(0, 0.02); the norms' weights at 1
        torch.nn.init.normal_(p, 0, 0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model


HF_BLOCK = ("input_layernorm post_attention_layernorm self_attn.q_proj self_attn.k_proj self_attn.v_proj "
            "self_attn.o_proj mlp.gate_proj mlp.up_proj mlp.down_proj").split()
HF_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{{}}.{s}.weight" for s in HF_BLOCK]  # HF LLaMA's tensor names, {} the layer


def save_checkpoint(model, tok, folder):
    """config.json, model.safetensors and tokenizer.json in LLaDA's layout, or HF LLaMA's for the causal twin (its
    names: the loader's module_name, inverted); each file written whole, then renamed: never half a file."""
    c, state = model.config, {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if c.causal:
        cfg = dict(model_type="llama", hidden_act="silu", tie_word_embeddings=False, hidden_size=c.d_model,
                   num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, num_hidden_layers=c.n_layers,
                   intermediate_size=c.mlp_hidden_size, vocab_size=c.vocab_size, rope_theta=c.rope_theta,
                   max_position_embeddings=c.max_sequence_length, rms_norm_eps=c.rms_norm_eps,
                   eos_token_id=c.eos_token_id)
        names = {module_name(n, "llama"): n for n in {f.format(i) for f in HF_NAMES for i in range(c.n_layers)}}
        state = {names[k]: v for k, v in state.items()}
    else:
        cfg = {k: getattr(c, k) for k in LLADA_KEYS} | dict(model_type="llada", block_type="llama", weight_tying=False)
        state = {"model." + k: v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in [("model.safetensors", lambda f: save_file(state, f)), ("tokenizer.json", tok.save),
                        ("config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=1)))]:
        write(str(folder / f"{name}.tmp"))
        os.replace(folder / f"{name}.tmp", folder / name)


def main():
    p = ArgumentParser("Train a tiny diffusion LM (LLaDA's objective) or its causal twin on CPU; rerun to resume.")
    p.add_argument("--kind", choices=["diffusion", "causal"], required=True, help="the objective")
    p.add_argument("--length", type=int, default=128, help="training sequence length in characters")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in all (a resumed run continues)")
    p.add_argument("--out", required=True, help="checkpoint folder (written every --save-every steps and at the end)")
    p.add_argument("--text", help="a UTF-8 text file to learn (default: the project's generated haystack prose)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and the masks")
    p.add_argument("--batch", type=count, default=32, help="sequences per step")
    p.add_argument("--save-every", type=count, default=100, help="steps between checkpoints")
    args = p.parse_args()
    text = read_text(args.text) if args.text else " ".join(islice(generated_sentences(random.Random(0)), 20000))
    if args.length < 2 or args.steps < 1 or len(text) < 40 * args.length:
        raise UserError(f"need --length >= 2, --steps >= 1 and a text of 40 x --length characters ({len(text)} here)")
    out, tok = Path(args.out), char_tokenizer(text)
    ids = torch.tensor(tok.encode(text).ids)
    train, held = ids.split([int(0.95 * len(ids)), len(ids) - int(0.95 * len(ids))])  # the last 5% held out
    held_x = held[:len(held) // args.length * args.length].view(-1, args.length)[:64]  # fixed held-out windows
    model = make_model(args.kind, tok.get_vocab_size(), args.length, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen, step, run = torch.Generator().manual_seed(args.seed), 0, {k: v for k, v in vars(args).items() if k != "steps"}
    if (out / "train_state.pt").exists():  # resume: weights, optimizer, the batches' and masks' generator, step
        state = torch.load(out / "train_state.pt")
        if state["run"] != run:
            raise UserError(f"{out} holds a run with other settings {state['run']}; choose another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = state["step"]
    warmup, first, t0, show = max(1, args.steps // 20), step, time.time(), progress(args.steps - step)
    for step in range(step, args.steps):
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * max(0, step - warmup) / max(1, args.steps - warmup)))
        opt.param_groups[0]["lr"] = 2e-3 * min((step + 1) / warmup, decay)  # 5% warm-up, cosine decay to 1/10
        starts = torch.randint(0, len(train) - args.length, (args.batch,), generator=gen)
        loss = training_loss(model, torch.stack([train[s:s + args.length] for s in starts]), gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done, note = step + 1, ""
        if done % args.save_every == 0 or done == args.steps:  # the checkpoint, then what resuming needs
            with torch.no_grad():  # the same held-out masks every time, so comparable across steps
                note = f"  held-out {training_loss(model, held_x, torch.Generator().manual_seed(1)).item():.4f}"
            save_checkpoint(model, tok, out)
            (out / "heldout.txt").write_text(tok.decode(held.tolist()), encoding="utf-8")  # for eval_ppl.py & co
            torch.save(dict(run=run, step=done, model=model.state_dict(), optimizer=opt.state_dict(),
                            generator=gen.get_state()), out / "train_state.tmp")
            os.replace(out / "train_state.tmp", out / "train_state.pt")
        rate = (done - first) / (time.time() - t0)  # steps per second
        show(done - first, f"step {done}/{args.steps}  loss {loss.item():.4f}{note}  "
             f"{rate * args.batch * args.length:,.0f} tok/s  ETA {(args.steps - done) / rate / 60:.1f} min")
    print(f"{args.kind} model at step {args.steps} in {out}")


if __name__ == "__main__":
    run_cli(main)
