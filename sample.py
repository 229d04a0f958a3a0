"""LLaDA diffusion sampling (LLaDA's `generate.py`, same names and signature) and a CLI that shows it."""
import sys
import time

import torch
import torch.nn.functional as F

from cli import (ArgumentParser, check_length, decode_answer, load_tokenizer, model_flags, non_negative, read_text,
                 run_cli, schedule_flags)
from model import UserError, load_model, read_config


CHAT_TEMPLATE = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"  # LLaDA-Instruct
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")


def add_gumbel_noise(logits, temperature):
    """Gumbel-max in float64: argmax(exp(l) / (-log U)^t) samples softmax(l / t); low precision would bias it."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    gumbel_noise = (-torch.log(torch.rand_like(logits))) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index, steps):
    """Tokens to reveal at each step of a block: n masked over s steps, the first n % s steps get one more.
    Equal shares are the linear noise schedule of LLaDA (Sec. 2.4)."""
    mask_num = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    num_transfer_tokens = (mask_num // steps).repeat(1, steps)  # (B, steps)
    num_transfer_tokens += torch.arange(steps, device=mask_index.device) < mask_num % steps
    return num_transfer_tokens


def check_schedule(gen_length, block_length, steps, cache=None, threshold=None):
    """The number of blocks, after checking that blocks tile the answer and steps split evenly over them (and
    Fast-dLLM's settings: a cache of None, 'prefix' or 'dual', a threshold in (0, 1] or None)."""
    num_blocks = gen_length // max(block_length, 1)
    if min(block_length, num_blocks, steps) < 1 or gen_length % block_length or steps % num_blocks \
            or steps > gen_length:
        raise UserError(f"need gen_length ({gen_length}) = k * block_length ({block_length}) and steps ({steps}) "
                        f"= n * {num_blocks} block(s), with 1 <= n <= {block_length}")
    if cache not in (None, 'prefix', 'dual') or threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"need cache None, 'prefix' or 'dual' (got {cache!r}), threshold None or in (0, 1]")
    return num_blocks


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking='low_confidence', mask_id=None, logits_eos_inf=False,
             confidence_eos_eot_inf=False, on_step=None, cache=None, threshold=None):
    """Returns prompt + answer (B, T + gen_length). The answer starts all [MASK]; each step predicts every
    masked token of the current block and keeps the most confident ones. `on_step(x, step)` sees each step.
    Fast-dLLM's approximations (Wu et al. 2025), off by default: `cache` 'prefix' or 'dual' reuses the keys/values
    of the block's first step (README); `threshold` reveals every masked token at least that confident (one at
    least), so a block can take fewer steps. A causal model gets greedy decoding (with `cache`: an exact KV cache)."""
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
        i = 0
        # Only the current block can change: earlier positions are prompt or revealed, later ones get
        # confidence -inf. So the LM head and the softmax run on block_length rows, not all T.
        while (mask_index := x[:, block] == mask_id).any():  # (B, block_length); `steps` times, or fewer (threshold)
            # Fed tokens: all of x, or (cache, after the block's first step) from the block on ('prefix') or the
            # block only ('dual'); the kept keys/values stand in for the rest.
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


def greedy(model, prompt, attention_mask, gen_length, cache=None):
    """Greedy decoding for a causal model. Without a cache every token costs one full forward, as a diffusion
    step does; with one, the prompt is encoded once and each new token is one forward of one token."""
    kv, pos = model.new_cache(prompt.shape[0], prompt.shape[1] + gen_length) if cache else None, 0
    for _ in range(gen_length):
        token = model(prompt[:, pos:], attention_mask, slice(-1, None), kv, pos).argmax(-1)  # (B, 1)
        pos = prompt.shape[1] if kv else 0
        prompt = torch.cat([prompt, token], 1)
        attention_mask = None if attention_mask is None else F.pad(attention_mask, (0, 1), value=1)
    return prompt


def main():
    p = ArgumentParser("Generate with LLaDA by iterative unmasking (a causal checkpoint decodes greedily).")
    model_flags(p, required=True)
    schedule_flags(p, gen_length=128, steps=128, block_length=32)
    p.add_argument("--prompt", required=True, help="the prompt, or @file.txt to read it from a file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat template")
    p.add_argument("--temperature", type=non_negative, default=0., help="0 = greedy; > 0 samples (Gumbel-max)")
    p.add_argument("--cfg", type=non_negative, default=0., help="classifier-free guidance scale (0 = off)")
    p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"], help="reveal order")
    p.add_argument("--seed", type=int, default=0, help="random seed for temperature / random remasking")
    p.add_argument("--show", action="store_true", help="redraw the answer after every step")
    args = p.parse_args()
    if not read_config(args.model).causal:  # checked before minutes of loading weights
        check_schedule(args.gen_length, args.block_length, args.steps)
    tok = load_tokenizer(args.model)
    text = read_text(args.prompt[1:]) if args.prompt.startswith("@") else args.prompt
    # Encoded as the checkpoint's tokenizer does by default (LLaMA-3 adds its BOS, LLaDA nothing); the chat
    # template brings its own <|startoftext|>.
    ids = tok.encode(CHAT_TEMPLATE.format(text.strip()) if args.chat else text, add_special_tokens=not args.chat).ids
    model = load_model(args.model, args.device, rope_scale=args.rope_scale, rope_scaling=args.rope_scaling,
                       verbose=True)
    prompt, mask_id = torch.tensor([ids], device=model.device), model.config.mask_token_id
    check_length(model, prompt.shape[1] + args.gen_length)
    torch.manual_seed(args.seed)

    def show(x, step):
        cells = ["░" if t == mask_id else tok.decode([t]) for t in x[0, prompt.shape[1]:].tolist()]
        print(("\033[2J\033[H" if sys.stdout.isatty() else "") + f"[step {step}]\n" + "".join(cells))

    t0 = time.time()
    out = generate(model, prompt, None, args.steps, args.gen_length, args.block_length, args.temperature, args.cfg,
                   args.remasking, on_step=show if args.show else None, cache=args.cache, threshold=args.threshold)
    seconds = time.time() - t0
    print(decode_answer(tok, model, out[0, prompt.shape[1]:]))
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    print(f"[{prompt.shape[1]} prompt tokens, {args.gen_length / seconds:.1f} tokens/s, {seconds:.1f}s{mem}]",
          file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
