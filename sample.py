"""Diffusion sampling: LLaDA's `generate.py` and Dream's `diffusion_generate`, each with the official names and
signature, greedy decoding for causal models, and a CLI that shows them."""
import sys
import time

import torch
import torch.nn.functional as F

from cli import (DREAM_ALGS, ArgumentParser, check_length, check_schedule, decode_answer, load_tokenizer, model_flags,
                 non_negative, prompt_ids, read_text, run_cli, sampling_settings, schedule_flags, show_steps)
from model import UserError, load_model, read_config


# --- LLaDA (Nie et al. 2025): its `generate.py`, blocks of masked tokens revealed by confidence ---

def add_gumbel_noise(logits, temperature):
    """Gumbel-max in float64: argmax(exp(l) / (-log U)^t) samples softmax(l / t); low precision would bias it."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    gumbel_noise = (-torch.log(torch.rand_like(logits))) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index, steps):
    """Tokens to reveal at each step of a block: n masked over s steps, the first n % s get one more (equal shares:
    LLaDA's linear noise schedule, Sec. 2.4)."""
    mask_num = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    num_transfer_tokens = (mask_num // steps).repeat(1, steps)  # (B, steps)
    num_transfer_tokens += torch.arange(steps, device=mask_index.device) < mask_num % steps
    return num_transfer_tokens


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking='low_confidence', mask_id=None, logits_eos_inf=False,
             confidence_eos_eot_inf=False, on_step=None, cache=None, threshold=None):
    """Returns prompt + answer (B, T + gen_length). The answer starts all [MASK]; each step predicts every masked
    token of the current block and keeps the most confident ones; `on_step(x, step)` sees each step. Fast-dLLM's
    approximations (Wu et al. 2025), off by default: `cache` 'prefix' or 'dual' reuses the block's first keys/values
    (README); `threshold` reveals every masked token at least that confident (one at least). A causal model gets
    greedy decoding (with `cache`: an exact KV cache)."""
    if model.config.causal:  # (the threshold means nothing to greedy decoding)
        return greedy(model, prompt, attention_mask, gen_length, cache)
    config, (B, P) = model.config, prompt.shape
    num_blocks = check_schedule(gen_length, block_length, steps, cache, threshold)
    mask_id = config.mask_token_id if mask_id is None else mask_id
    if P == 0 or (prompt == mask_id).any() or remasking not in ('low_confidence', 'random'):
        raise UserError("the prompt is empty or contains the mask token, or remasking is not low_confidence/random")
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], 1)
    if attention_mask is not None:  # answer positions are tokens; CFG's unconditional copy has the same padding
        attention_mask = F.pad(attention_mask, (0, gen_length), value=1).repeat(1 + (cfg_scale > 0), 1)
    prompt_index = x != mask_id
    kv, step = model.new_cache(B * (1 + (cfg_scale > 0)), x.shape[1]) if cache else None, 0
    for num_block in range(num_blocks):
        block = slice(P + num_block * block_length, P + (num_block + 1) * block_length)
        num_transfer_tokens = get_num_transfer_tokens(x[:, block] == mask_id, steps // num_blocks)
        i = 0  # Only the current block can change, so the LM head and the softmax run on its rows only, not all T.
        while (mask_index := x[:, block] == mask_id).any():  # (B, block_length); `steps` times, or fewer (threshold)
            # Fed: all of x, or (cache, after a block's first step) the block on ('prefix') or the block ('dual')
            fed = slice(block.start if cache and i > 0 else 0, block.stop if cache == 'dual' and i > 0 else None)
            rows = slice(block.start - fed.start, block.stop - fed.start)
            if cfg_scale > 0:  # classifier-free guidance: unconditional copy = prompt masked out
                un_x = torch.where(prompt_index, mask_id, x)
                logits, un_logits = model(torch.cat([x, un_x])[:, fed], attention_mask, rows, kv, fed.start).chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x[:, fed], attention_mask, rows, kv, fed.start)  # (B, block_length, V)
            if logits_eos_inf:
                logits[:, :, config.eos_token_id] = -torch.inf
            x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)  # (B, block_length)
            if confidence_eos_eot_inf:  # the official aliasing quirk, as it acts at temperature 0
                logits[:, :, [t for t in (config.eos_token_id, config.eot_token_id) if t is not None]] = -torch.inf
            if remasking == 'low_confidence':  # softmax in the logits' dtype as LLaDA does; float64 as Fast-dLLM
                p = F.softmax(logits.double() if cache or threshold else logits, dim=-1)
                x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
            else:
                x0_p = torch.rand(x0.shape, device=x0.device)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            for j in range(B):
                k = num_transfer_tokens[j, i] if threshold is None else \
                    max((confidence[j] >= threshold).sum(), mask_index[j].any())  # all sure ones, at least one
                select_index = torch.topk(confidence[j], k=int(k)).indices
                x[j, block][select_index] = x0[j, select_index]
            i, step = i + 1, step + 1
            if on_step is not None:
                on_step(x, step)
    return x


# --- Dream (Ye et al. 2025): its `generation_utils.py`, same names, same random draws in the same order ---

def top_p_logits(logits, top_p=None):
    """Nucleus filtering: keep the likeliest tokens up to cumulative probability top_p, and the one crossing it."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    sorted_indices_to_remove = F.pad((torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p)[..., :-1], (1, 0))
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits, top_k=None):
    """Keep the top_k largest logits (ties with the k-th included)."""
    indices_to_remove = logits < torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False):
    """(confidence, token) per row: temperature, top-p, top-k, a draw from the softmax (argmax at temperature 0);
    confidence: the token's probability, top-1 minus top-2 (margin) or sum p log p (entropy). In bf16 torch's check
    often rejects the probabilities (sum not within 1e-6 of 1): Dream's code, and this, keep the step's argmax."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    try:
        if temperature > 0:
            x0 = torch.distributions.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    except ValueError:  # the probability check failed
        pass
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def diffusion_generate(model, input_ids, attention_mask=None, max_new_tokens=512, steps=512, eps=1e-3, alg='origin',
                       alg_temp=None, temperature=0.0, top_p=None, top_k=None, on_step=None):
    """Dream's sampler: prompt + answer (B, P + max_new_tokens), no blocks. The answer starts all [MASK]; from t to s
    on the timesteps linspace(1, eps, steps + 1) a share 1 - s/t of the masked tokens is revealed: at random ('origin')
    or the most confident (sample_tokens), or drawn by confidence / alg_temp. `on_step(x, step)` sees each step."""
    mask_id = model.config.mask_token_id
    if not input_ids.numel() or (input_ids == mask_id).any() or alg not in DREAM_ALGS:
        raise UserError(f"need a non-empty prompt without the mask token, and a known alg (got {alg!r})")
    x = F.pad(input_ids, (0, max_new_tokens), value=mask_id)
    if attention_mask is not None:
        attention_mask = F.pad(attention_mask, (0, max_new_tokens), value=1)  # the answer's masks are tokens
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_id  # (B, N)
        # Dream predicts token j from the hidden state at j - 1 (logits shifted right, kept from the AR model it
        # started from): the LM head runs on the rows just before the masked positions, in their order.
        mask_logits = model(x, attention_mask, logits_at=F.pad(mask_index[:, 1:], (0, 1)))  # (masked, V)
        t, s = timesteps[i], timesteps[i + 1]
        if alg == 'origin':  # each masked token is revealed with probability 1 - s/t, all at the last step
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full_like(x[mask_index], mask_id)
            transfer_index_t_s = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer_index_t_s] = sample_tokens(mask_logits[transfer_index_t_s], temperature, top_p, top_k)
            x[mask_index] = x0
        else:
            confidence, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, margin_confidence=alg ==
                                           'topk_margin', neg_entropy=alg == 'entropy')
            num_mask_token = mask_index.sum() / mask_index.shape[0]  # per row (a float tensor, as Dream's)
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, dtype=mask_logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:  # drawn without replacement, by softmax(confidence / alg_temp)
                    transfer_index = torch.multinomial(F.softmax(full_confidence / alg_temp, dim=-1),
                                                       num_samples=number_transfer_tokens)
                x_ = torch.full_like(x, mask_id).masked_scatter(mask_index, x0)  # (B, N): the new tokens in place
                x.scatter_(1, transfer_index, x_.gather(1, transfer_index))
        if on_step is not None:
            on_step(x, i + 1)
    return x


def greedy(model, prompt, attention_mask, gen_length, cache=None):
    """Greedy decoding for a causal model: a full forward per token, or with `cache` one token per forward."""
    kv, pos = model.new_cache(prompt.shape[0], prompt.shape[1] + gen_length) if cache else None, 0
    for _ in range(gen_length):
        token = model(prompt[:, pos:], attention_mask, slice(-1, None), kv, pos).argmax(-1)  # (B, 1)
        pos = prompt.shape[1] if kv else 0
        prompt = torch.cat([prompt, token], 1)
        attention_mask = None if attention_mask is None else F.pad(attention_mask, (0, 1), value=1)
    return prompt


def answer(model, prompt, s, seed=0, on_step=None):
    """What the scripts call: prompt + answer under their settings `s` (cli.sampling_settings), drawn after
    torch.manual_seed(seed): Dream's sampler for Dream, LLaDA's generate otherwise (greedy for a causal model)."""
    torch.manual_seed(seed)
    if model.config.model_type == "dream":
        return diffusion_generate(model, prompt, None, s["gen_length"], s["steps"], alg=s["alg"],
                                  temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"], on_step=on_step)
    return generate(model, prompt, None, s["steps"], s["gen_length"], s["block_length"], s.get("temperature", 0.),
                    s.get("cfg", 0.), s.get("remasking", "low_confidence"), on_step=on_step, cache=s["cache"],
                    threshold=s["threshold"])


def main():
    p = ArgumentParser("Generate by iterative unmasking with LLaDA or Dream (a causal checkpoint decodes greedily).")
    model_flags(p, required=True)
    schedule_flags(p, gen_length=128, steps=128, block_length=32)
    p.add_argument("--prompt", required=True, help="the prompt, or @file.txt to read it from a file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat template")
    p.add_argument("--cfg", type=non_negative, default=0., help="LLaDA: classifier-free guidance scale (0 = off)")
    p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"], help="LLaDA's order")
    p.add_argument("--seed", type=int, default=0, help="random seed for temperature / random remasking")
    p.add_argument("--show", action="store_true", help="redraw the answer after every step")
    args = p.parse_args()
    config, tok = read_config(args.model), load_tokenizer(args.model)
    if config.model_type == "dream" and (args.cfg or args.remasking != "low_confidence"):
        raise UserError("--cfg and --remasking are LLaDA's; Dream's sampler has --alg, --top-p and --top-k")
    s = sampling_settings(args, config)[0] | dict(cfg=args.cfg, remasking=args.remasking)  # checked before loading
    ids = prompt_ids(tok, config, read_text(args.prompt[1:]) if args.prompt.startswith("@") else args.prompt, args.chat)
    model = load_model(args.model, args.device, rope_scale=args.rope_scale, rope_scaling=args.rope_scaling, verbose=1)
    prompt = torch.tensor([ids], device=model.device)
    check_length(model, prompt.shape[1] + args.gen_length)
    t0 = time.time()
    show = show_steps(tok, model.config.mask_token_id, len(ids)) if args.show else None
    out = answer(model, prompt, s, args.seed, show)
    seconds = time.time() - t0
    print(decode_answer(tok, model, out[0, len(ids):]))
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    print(f"[{len(ids)} prompt tokens, {args.gen_length / seconds:.1f} tokens/s, {seconds:.1f}s{mem}]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
