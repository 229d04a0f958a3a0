"""What the scripts share and the model does not need: flags checked with one-line errors, the checkpoint's
tokenizer, progress lines, torchrun ranks, and result files that survive an interruption."""
import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch

from model import UserError, load_model
from rope import extrapolation_bound


def run_cli(main):
    """Run a script's main(): a UserError or Ctrl-C is one line on stderr (exit code 2 / 130), no traceback.
    Under torchrun the ranks of a finished run leave together: one rank closing its process group while
    another still works (rank 0 drawing the plot) has been seen to abort gloo at exit."""
    try:
        main()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    except (UserError, OSError) as e:  # OSError: a missing or unreadable file named by the user
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--help` showing each flag's default, and a bad flag reported in one line (exit code 2)."""

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, action):  # no "(default: None)" on flags that have no default
            return action.help if action.default in (None, False) else super()._get_help_string(action)

    def __init__(self, description):
        super().__init__(description=description, formatter_class=self.Formatter)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def number(kind, ok, what):
    """An argparse type: a float for which ok(x) holds; `what` says which values are allowed."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and ok(x)):
            raise argparse.ArgumentTypeError(f"{kind} must be {what}, got {text!r}")
        return x
    return parse


positive = number("the value", lambda x: x > 0, "a finite number > 0")
non_negative = number("the value", lambda x: x >= 0, "a finite number >= 0")


def count(text):
    """An argparse type: an integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def tasks_flag(known):
    """An argparse type: "a,b" -> ["a", "b"], each a task among `known` (the first unknown one is named)."""
    def parse(text):
        unknown = [t for t in text.split(",") if t not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown task {unknown[0]!r}; the tasks are {', '.join(known)}")
        return text.split(",")
    return parse


def rope_scaling_flag(text):
    """'yarn:4' -> {'rope_type': 'yarn', 'factor': 4.0}, a HF rope-scaling dict; or FILE.json holding such a dict
    (any method, e.g. LongRoPE's factor lists), with the file's name added under 'file' (model.py ignores it)."""
    if text.endswith(".json"):
        try:
            s = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"cannot read a rope-scaling dict from {text}: {e}") from None
        if not isinstance(s, dict) or not isinstance(s.get("rope_type", s.get("type")), str):
            raise argparse.ArgumentTypeError(f"{text} holds no HF rope-scaling dict (one with a rope_type)")
        return s | dict(file=Path(text).name)
    kind, _, factor = text.partition(":")
    if kind not in ("linear", "dynamic", "yarn"):
        raise argparse.ArgumentTypeError(f"expected TYPE:FACTOR with TYPE linear, dynamic or yarn, or a .json file, "
                                         f"got {text!r}")
    return dict(rope_type=kind, factor=number("FACTOR", lambda x: x > 0, "a finite number > 0")(factor))


def device_flag(name):
    """A torch device that this machine has: checked before any weight is read."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {name!r} (cpu, cuda, cuda:1, mps, ...)") from None
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()
                                     and (device.index or 0) < backend.device_count()):
        raise argparse.ArgumentTypeError(f"device {name} is not available on this machine")
    return name


def cache_flag(text):
    """'none' -> None; 'prefix' and 'dual' stay: sample.generate's `cache`."""
    if text not in ("none", "prefix", "dual"):
        raise argparse.ArgumentTypeError(f"expected none, prefix or dual, got {text!r}")
    return None if text == "none" else text


def model_flags(p, required=False):
    """The flags of every script that loads a model."""
    p.add_argument("--model", required=required, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--rope-scale", type=positive, default=1.0, help="static NTK factor lambda (python rope.py)")
    p.add_argument("--rope-scaling", type=rope_scaling_flag, metavar="TYPE:FACTOR|FILE.json",
                   help="a RoPE scaling method: linear (PI), dynamic (NTK) or yarn, e.g. yarn:4, or a JSON file with a "
                   "HF rope-scaling dict (any method, LongRoPE too); applied after --rope-scale")
    p.add_argument("--device", type=device_flag, help="cuda, cpu, ... (default: cuda if available)")


DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")  # Dream's reveal rules (sample.diffusion_generate)


def schedule_flags(p, gen_length, steps, block_length):
    """The samplers' flags: the schedule with a script's defaults, Fast-dLLM's approximations (LLaDA), the
    temperature, and Dream's rule with the paper's settings (sample.answer reads them)."""
    p.add_argument("--gen-length", type=count, default=gen_length, help="answer length in tokens")
    p.add_argument("--steps", type=count, default=steps, help="denoising steps in total")
    p.add_argument("--block-length", type=count, default=block_length, help="semi-autoregressive block length")
    p.add_argument("--cache", type=cache_flag, metavar="{none,prefix,dual}", help="Fast-dLLM's approximate key/value "
                   "cache (not the paper's protocol; default none); for a causal model an exact KV cache")
    p.add_argument("--threshold", type=number("the threshold", lambda x: 0 < x <= 1, "in (0, 1]"),
                   help="Fast-dLLM's parallel decoding: reveal every token at least this confident (e.g. 0.9)")
    p.add_argument("--temperature", type=non_negative, help="sampling temperature (default: the paper's, 0 = greedy "
                   "for LLaDA, 0.2 for Dream)")
    p.add_argument("--alg", default="entropy", choices=DREAM_ALGS,
                   help="Dream: which masked tokens a step reveals")
    p.add_argument("--top-p", type=number("--top-p", lambda x: 0 < x <= 1, "in (0, 1]"), default=0.95,
                   help="Dream: nucleus sampling")
    p.add_argument("--top-k", type=count, default=50, help="Dream: sample among the k likeliest tokens (transformers "
                   "4.x's default, which the paper's calls got)")


def scaling_words(s, joiner):
    """A rope-scaling dict in short: its type, factor (after `joiner`) and file: 'yarn x4', 'longrope4-longdllm'."""
    kind, factor, file = s.get("rope_type", s.get("type")), s.get("factor"), s.get("file")
    return kind + (f"{joiner}{factor:g}" if factor else "") + (f"-{Path(file).stem}" if file else "")


def rope_label(settings):
    """A results file's RoPE settings in words: 'rope_scale 14', 'rope_scale 1, yarn x4'."""
    s = settings.get("rope_scaling")
    return f"rope_scale {settings['rope_scale']:g}" + (f", {scaling_words(s, ' x')}" if s else "")


def parse_lengths(text):
    """'2k,4k,20000' -> [2048, 4096, 20000] (k = 1024 tokens), each at least 1; an argparse type."""
    try:
        lengths = [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",")]
    except ValueError:
        lengths = [0]
    if min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected lengths like 8k,16k or 20000, got {text!r}")
    return lengths


def read_text(path):
    """A user's text file (UTF-8), or one line that names it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def progress(total, every=30.0):
    """Progress on stderr, called as show(done, text): on a terminal one line redrawn in place; in a log file or
    a pipe whole lines, the first, the last and at most one every `every` seconds between."""
    last = -math.inf

    def show(done, text):
        nonlocal last
        now = time.time()
        if sys.stderr.isatty():
            print("\r" + text, end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done in (1, total) or now - last >= every:
            print(text, file=sys.stderr, flush=True)
            last = now
    return show


def check_length(model, length):
    """Longer contexts than the scaling law's bound (rope.py) are allowed, but warned about: some RoPE angles
    there were never seen in training. (The bound is static NTK's; a scaling method gets no warning.)"""
    c, scale = model.config, model.rope_base / model.config.rope_theta
    bound = extrapolation_bound(c.head_dim, c.rope_theta, c.max_sequence_length, scale)
    if length > bound and model.rope_scaling is None:
        print(f"warning: {length} tokens exceed the extrapolation bound {bound:.0f} of rope_scale {scale:g}; "
              "see `python rope.py`", file=sys.stderr)


def load_tokenizer(folder):
    """The checkpoint's own tokenizer.json, read with `tokenizers` (checked before the weights are loaded)."""
    from tokenizers import Tokenizer
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"no tokenizer.json in {folder}" if Path(folder).is_dir() else
                        f"model folder not found: {folder}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
        raise UserError(f"{path} is not a tokenizer that `tokenizers` can read ({str(e)[:80]}): download it "
                        "again") from None


# What the paper's scripts fed each family beyond its text. LongLLaDA's Dream wrapper prepends "<|beginoftext|>" as
# text to NIAH and RULER prompts (Dream's tokenizer adds no BOS of its own); the chat templates (sample.py --chat, one
# user turn) bring their own begin-of-text, LLaDA's and LLaMA-3's, or none (Dream: Qwen2.5's, with its system turn).
PROMPT_BOS = dict(dream="<|beginoftext|>")
CHAT_TEMPLATES = dict(
    llada="<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant"
          "<|end_header_id|>\n\n",
    llama="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant"
          "<|end_header_id|>\n\n",
    dream="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
          "<|im_start|>assistant\n")


def prompt_ids(tok, config, text, chat=False):
    """A prompt as the tokenizer encodes it by default (LLaMA-3 and SMDM add a BOS, LLaDA and Dream nothing), or wrapped
    in the model's chat template, which brings its own begin-of-text."""
    if chat and config.model_type not in CHAT_TEMPLATES:
        raise UserError(f"--chat: {config.model_type} models have no chat template (no Instruct version)")
    chat = chat and CHAT_TEMPLATES[config.model_type].format(text.strip())
    return tok.encode(chat or text, add_special_tokens=not chat).ids


def special_ends(tok, text_before=""):
    """The ids that go before and after a prompt's text: what the tokenizer's post-processor adds by default, as
    tok.encode(text) does ([<|begin_of_text|>] for LLaMA-3, nothing for LLaDA and Dream), then `text_before`'s ids
    (PROMPT_BOS). The paper's scripts encoded with those defaults; prompts assembled from pieces get them here."""
    probe = tok.encode("x")
    text = [i for i, s in enumerate(probe.sequence_ids) if s is not None]
    before = probe.ids[:text[0]] + tok.encode(text_before, add_special_tokens=False).ids
    return before, probe.ids[text[-1] + 1:]


def show_steps(tok, mask_id, start):
    """An on_step(x, step) for the samplers that prints the answer of row 0 (from `start`) after every step, masked
    positions as a block; on a terminal redrawn in place."""
    def show(x, step):
        cells = ["░" if t == mask_id else tok.decode([t]) for t in x[0, start:].tolist()]
        print(("\033[2J\033[H" if sys.stdout.isatty() else "") + f"[step {step}]\n" + "".join(cells))
    return show


def decode_answer(tok, model, answer):
    """Text of the answer ids up to the first EOS / end-of-turn, special tokens dropped."""
    answer, stops = answer.tolist(), (model.config.eos_token_id, model.config.eot_token_id)
    return tok.decode(answer[:min([answer.index(t) for t in stops if t in answer], default=len(answer))])


def distributed(device):
    """Under torchrun: join the process group; return (rank, world size, this rank's device). With plain
    python: (0, 1, device), and nothing of torch.distributed is initialised. run_cli closes the group."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 1, device
    cuda, local = torch.cuda.is_available() and device in (None, "cuda"), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), f"cuda:{local}" if cuda else device


def all_gather(obj, world):
    """Every rank's `obj`, in rank order; also a barrier. Without torchrun: [obj]."""
    objs = [obj] * world
    if world > 1:
        torch.distributed.all_gather_object(objs, obj)
    return objs


def save_json(obj, out):
    """Write-then-rename, so that a kill never leaves half a JSON file behind."""
    out.with_suffix(".tmp").write_text(json.dumps(obj))
    out.with_suffix(".tmp").replace(out)


def append_line(obj, out):
    """One JSON line in one O_APPEND write: a kill loses at most the line in flight, and the lines of
    several ranks appending to one file never interleave."""
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps(obj) + "\n").encode())
    os.close(fd)


def read_lines(path):
    """The JSON lines of a file (results, or data such as LongBench's); none if there is no file yet. A line that is
    not JSON is reported in one line with the file and line number."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines() if path.exists() else [], 1):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise UserError(f"{path}, line {n}: not a JSON line ({e})") from None
    return rows


def check_schedule(gen_length, block_length, steps, cache=None, threshold=None):
    """The number of blocks of LLaDA's generate, after checking, in plain words, that the blocks tile the answer and
    the steps split evenly over them (and Fast-dLLM's settings: a cache of None, 'prefix' or 'dual', a threshold in
    (0, 1] or None)."""
    if min(gen_length, block_length, steps) < 1:
        raise UserError(f"the answer length, block length and steps must each be at least 1 (got {gen_length}, "
                        f"{block_length} and {steps})")
    if gen_length % block_length:
        raise UserError(f"the answer length ({gen_length}) must be a multiple of the block length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks or steps > gen_length:
        raise UserError(f"the steps ({steps}) must split evenly over the {num_blocks} block(s) of the answer, at most "
                        f"one step per token: a multiple of {num_blocks} up to {gen_length}")
    if cache not in (None, "prefix", "dual") or threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"need cache None, 'prefix' or 'dual' (got {cache!r}), threshold None or in (0, 1]")
    return num_blocks


def model_settings(args):
    """The model and its RoPE as results files record them, and the start of their default names:
    ({model, rope_scale, rope_scaling}, '<model>_rope<scale>[_<method>]')."""
    scaling, model = args.rope_scaling, Path(args.model).name
    name = f"{model}_rope{args.rope_scale:g}" + (f"_{scaling_words(scaling, '')}" if scaling else "")
    return dict(model=model, rope_scale=args.rope_scale, rope_scaling=scaling), name


def sampling_settings(args, config):
    """What a generated answer depends on (model, RoPE, schedule, Fast-dLLM's or Dream's settings), for a results file's
    rows, and a name that tells runs apart: <model>_rope<scale>[_<method>]_steps<n>[_<cache>][_t<threshold>][_<alg>
    <temperature>]. Dream's rule is recorded for Dream only, a temperature for LLaDA only when above 0. Checked here,
    before any weight is read: LLaDA's schedule (check_schedule); Dream's sampler has no blocks, caches or threshold."""
    dream = config.model_type == "dream"
    if not (dream or config.causal):  # LLaDA's generate: LLaDA, SMDM's MDM
        check_schedule(args.gen_length, args.block_length, args.steps)
    if dream and (args.cache or args.threshold):
        raise UserError("Dream's sampler takes no --cache or --threshold (Fast-dLLM's caches are implemented for "
                        "LLaDA's sampler only)")
    settings, name = model_settings(args)
    settings |= dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length, cache=args.cache,
                     threshold=args.threshold)
    if dream:  # the paper's Dream runs: entropy, temperature 0.2, top_p 0.95 (top_k 50 from transformers 4.x)
        settings |= dict(alg=args.alg, temperature=0.2 if args.temperature is None else args.temperature,
                         top_p=args.top_p, top_k=args.top_k)
    elif args.temperature and not config.causal:
        settings["temperature"] = args.temperature
    tags = [f"steps{args.steps}", args.cache, args.threshold and f"t{args.threshold:g}", "temperature" in settings and
            f"{settings.get('alg', 'T')}{settings['temperature']:g}"]
    return settings, "_".join([name] + [t for t in tags if t])


def sample_seed(*key):
    """A sampler seed from what names a sample, e.g. (seed, length, depth, repeat): the same on every rank and in
    every rerun (crc32, not Python's salted hash)."""
    return zlib.crc32(repr(key).encode())


def share_and_load(args, todo, longest):
    """Under torchrun, this rank's share of `todo` (every world-th item), and the model if that share is not empty
    (with a warning if `longest` tokens exceed its RoPE bound): (rank, world, share, model)."""
    rank, world, device = distributed(args.device)
    all_gather(None, world)  # barrier: every rank has read the results file before any rank appends to it
    todo = todo[rank::world]
    model = load_model(args.model, device, rope_scale=args.rope_scale, rope_scaling=args.rope_scaling,
                       verbose=rank == 0) if todo else None
    if model:
        check_length(model, longest)
    return rank, world, todo, model


def pending(out, settings, items, key):
    """Of `items`, those not yet in the results file `out` (key(row) names a row's item). A file made with other
    settings is refused: a resumed grid must be the same experiment."""
    rows = read_lines(out)
    if any(r["settings"] != settings for r in rows):
        raise UserError(f"{out} holds results with other settings; choose another --out")
    done = {key(r) for r in rows}
    return [item for item in items if item not in done]


def append_rows(items, work, out, describe, rank=0, world=1):
    """row = work(item) for each item, each appended to `out` as soon as it is done (a kill loses at most the one
    in flight), with progress: describe(row) and the time left."""
    t0, show = time.time(), progress(len(items))
    out.parent.mkdir(parents=True, exist_ok=True)
    for c, item in enumerate(items):
        row = work(item)
        append_line(row, out)
        eta = (time.time() - t0) / (c + 1) * (len(items) - c - 1) / 60
        show(c + 1, f"[rank {rank}] " * (world > 1) + f"sample {c + 1}/{len(items)}  {describe(row)}  "
             f"ETA {eta:.1f} min")
