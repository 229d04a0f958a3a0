"""LLaDA diffusion sampling (LLaDA's `generate.py`, same names and signature) and a CLI that shows it."""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import decode_answer, load_tokenizer, model_flags, run_cli, schedule_flags
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


def check_schedule(gen_length, block_length, steps):
    """The number of blocks, after checking that blocks tile the answer and steps split evenly over them."""
    num_blocks = gen_length // max(block_length, 1)
    if min(block_length, num_blocks, steps) < 1 or gen_length % block_length or steps % num_blocks \
            or steps > gen_length:
        raise UserError(f"need gen_length ({gen_length}) = k * block_length ({block_length}) and steps ({steps}) "
                        f"= n * {num_blocks} block(s), with 1 <= n <= {block_length}")
    return num_blocks


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking='low_confidence', mask_id=None, logits_eos_inf=False,
             confidence_eos_eot_inf=False, on_step=None):
    """Returns prompt + answer (B, T + gen_length). The answer starts all [MASK]; each step predicts every
    masked token of the current block and keeps the most confident ones. `on_step(x, step)` sees each step.
    A causal model (the LLaMA baseline) gets greedy decoding of gen_length tokens instead."""
    if model.config.causal:  # greedy, no KV cache: each token costs one full forward, as a diffusion step does
        for _ in range(gen_length):
            prompt = torch.cat([prompt, model(prompt, attention_mask, logits_at=slice(-1, None)).argmax(-1)], 1)
            attention_mask = None if attention_mask is None else F.pad(attention_mask, (0, 1), value=1)
        return prompt
    config, (B, P), num_blocks = model.config, prompt.shape, check_schedule(gen_length, block_length, steps)
    mask_id = config.mask_token_id if mask_id is None else mask_id
    if P == 0 or (prompt == mask_id).any() or remasking not in ('low_confidence', 'random'):
        raise UserError("the prompt is empty or contains the mask token, or remasking is not low_confidence/random")
    steps = steps // num_blocks
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], 1)
    if attention_mask is not None:
        attention_mask = F.pad(attention_mask, (0, gen_length), value=1)
        if cfg_scale > 0:
            attention_mask = torch.cat([attention_mask, attention_mask])
    prompt_index = x != mask_id
    for num_block in range(num_blocks):
        block = slice(P + num_block * block_length, P + (num_block + 1) * block_length)
        num_transfer_tokens = get_num_transfer_tokens(x[:, block] == mask_id, steps)
        for i in range(steps):
            # Only the current block can change: earlier positions are prompt or revealed, later ones get
            # confidence -inf. So the LM head and the softmax run on block_length rows, not all T.
            mask_index = x[:, block] == mask_id  # (B, block_length)
            if cfg_scale > 0:  # classifier-free guidance: unconditional copy = prompt masked out
                un_x = torch.where(prompt_index, mask_id, x)
                logits, un_logits = model(torch.cat([x, un_x]), attention_mask, logits_at=block).chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask, logits_at=block)  # (B, block_length, V)
            if logits_eos_inf:
                logits[:, :, config.eos_token_id] = -torch.inf
            x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)  # (B, block_length)
            if confidence_eos_eot_inf:  # the official aliasing quirk, as it acts at temperature 0
                logits[:, :, [t for t in (config.eos_token_id, config.eot_token_id) if t is not None]] = -torch.inf
            if remasking == 'low_confidence':  # softmax in the logits' dtype, as the official code does
                x0_p = torch.gather(F.softmax(logits, dim=-1), -1, x0[..., None])[..., 0]
            else:
                x0_p = torch.rand(x0.shape, device=x0.device)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            for j in range(B):
                select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i])).indices
                x[j, block][select_index] = x0[j, select_index]
            if on_step is not None:
                on_step(x, num_block * steps + i + 1)
    return x


def main():
    p = argparse.ArgumentParser(description="Generate with LLaDA by iterative unmasking.")
    model_flags(p, required=True)
    schedule_flags(p, gen_length=128, steps=128, block_length=32)
    p.add_argument("--prompt", required=True, help="the prompt, or @file.txt to read it from a file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat template")
    p.add_argument("--temperature", type=float, default=0., help="0 = greedy; > 0 samples (Gumbel-max)")
    p.add_argument("--cfg", type=float, default=0., help="classifier-free guidance scale (0 = off)")
    p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"], help="reveal order")
    p.add_argument("--seed", type=int, default=0, help="random seed for temperature / random remasking")
    p.add_argument("--show", action="store_true", help="redraw the answer after every step")
    args = p.parse_args()
    if not read_config(args.model).causal:  # checked before minutes of loading weights
        check_schedule(args.gen_length, args.block_length, args.steps)
    tok = load_tokenizer(args.model)
    text = Path(args.prompt[1:]).read_text() if args.prompt.startswith("@") else args.prompt
    if args.chat:  # plain prompts get no BOS (add_bos_token is false)
        text = CHAT_TEMPLATE.format(text.strip())
    model = load_model(args.model, args.device, rope_scale=args.rope_scale, verbose=True)
    prompt = torch.tensor([tok.encode(text, add_special_tokens=False).ids], device=model.device)
    model.check_length(prompt.shape[1] + args.gen_length)
    torch.manual_seed(args.seed)
    mask_id = model.config.mask_token_id

    def show(x, step):
        cells = ["░" if t == mask_id else tok.decode([t]) for t in x[0, prompt.shape[1]:].tolist()]
        print(("\033[2J\033[H" if sys.stdout.isatty() else "") + f"[step {step}/{args.steps}]\n" + "".join(cells))

    t0 = time.time()
    out = generate(model, prompt, None, args.steps, args.gen_length, args.block_length, args.temperature,
                   args.cfg, args.remasking, on_step=show if args.show else None)
    seconds = time.time() - t0
    print(decode_answer(tok, model, out[0, prompt.shape[1]:]))
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    print(f"[{prompt.shape[1]} prompt tokens, {args.steps / seconds:.2f} steps/s, {seconds:.1f}s{mem}]",
          file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
