"""What the scripts share and the model does not need: one-line errors, the checkpoint's tokenizer, torchrun
ranks, and result files that survive an interruption."""
import json
import os
import sys
from pathlib import Path

import torch

from model import UserError


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


def model_flags(p, required=False):
    """The flags of every script that loads a model."""
    p.add_argument("--model", required=required, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--rope-scale", type=float, default=1.0, help="static NTK factor lambda (python rope.py prints it)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def schedule_flags(p, gen_length, steps, block_length):
    """The flags of sample.generate's schedule, with a script's defaults."""
    p.add_argument("--gen-length", type=int, default=gen_length, help="answer length in tokens")
    p.add_argument("--steps", type=int, default=steps, help="denoising steps in total")
    p.add_argument("--block-length", type=int, default=block_length, help="semi-autoregressive block length")


def load_tokenizer(folder):
    """The checkpoint's own tokenizer.json, read with `tokenizers` (checked before the weights are loaded)."""
    from tokenizers import Tokenizer
    if not (Path(folder) / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer.json in {folder}" if Path(folder).is_dir() else
                        f"model folder not found: {folder}")
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


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
    """The JSON lines of a results file; none if there is no file yet."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
