import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts are flat files at the top level

FIXTURES = ROOT / "tests" / "fixtures"
LLADA = FIXTURES / "llada-tiny"


@pytest.fixture(scope="session")
def expected():
    return load_file(LLADA / "expected.safetensors")


@pytest.fixture(scope="session")
def tiny():
    from model import load_model
    return load_model(LLADA / "ckpt", device="cpu", dtype=torch.float32)


@pytest.fixture
def ckpt_copy(tmp_path):
    """A writable copy of the tiny LLaDA checkpoint, to break in tests."""
    dst = tmp_path / "ckpt"
    shutil.copytree(LLADA / "ckpt", dst)
    return dst


def edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


SPECIALS = {376: "<|startoftext|>", 377: "<|start_header_id|>", 378: "<|end_header_id|>", 379: "<|eot_id|>",
            380: "<|mdm_mask|>", 381: "<|endoftext|>"}  # 380 / 381 are the fixture's mask / EOS ids


def write_tokenizer(folder):
    """A word-level tokenizer.json over the tiny fixture's 384 ids: w0..w375 (plus 'user', 'assistant'),
    the chat specials and the mask / EOS tokens at the config's ids. Built here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    vocab = {f"w{i}": i for i in range(376)}
    vocab.update({"<unk>": 0, "user": 1, "assistant": 2, ".": 3, "w382": 382, "w383": 383})
    del vocab["w0"], vocab["w1"], vocab["w2"], vocab["w3"]
    vocab.update({tok: i for i, tok in SPECIALS.items()})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS.values()])
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture
def ckpt_tok(ckpt_copy):
    write_tokenizer(ckpt_copy)
    return ckpt_copy


# The same ids under LLaMA-3's names (its BOS 376 and EOS 381) and Dream's (EOS 376, BOS text 377, mask 380).
LLAMA_SPECIALS = {376: "<|begin_of_text|>", 377: "<|start_header_id|>", 378: "<|end_header_id|>", 379: "<|eot_id|>",
                  380: "<|reserved_special_token_0|>", 381: "<|end_of_text|>"}
DREAM_SPECIALS = {376: "<|endoftext|>", 377: "<|beginoftext|>", 378: "<|im_start|>", 379: "<|im_end|>",
                  380: "<|mask|>"}


def write_byte_tokenizer(folder, bos=False, specials=SPECIALS):
    """A byte-level tokenizer.json: ids 0-255 are the bytes (GPT-2 style symbols), no merges, so any
    English text encodes within the tiny fixture's vocabulary; specials as in write_tokenizer (or given). With `bos`,
    its post-processor puts id 376 before every text by default, as LLaMA-3's tokenizer.json does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_syms = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_syms)} | {t: i for i, t in specials.items()}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{specials[376]} $A",
                                                           special_tokens=[(specials[376], 376)])
    tok.save(str(folder / "tokenizer.json"))


def _byte_of(ch):
    """GPT-2's bytes_to_unicode, inverted: printable bytes map to themselves, the rest to 256 + n."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return ord(ch) if ord(ch) in printable else [b for b in range(256) if b not in printable][ord(ch) - 256]


@pytest.fixture
def ckpt_bytes(ckpt_copy):
    write_byte_tokenizer(ckpt_copy)
    return ckpt_copy


LLAMA = FIXTURES / "llama-tiny"
DREAM = FIXTURES / "dream-tiny"


@pytest.fixture
def llama_copy(tmp_path):
    dst = tmp_path / "llama"
    shutil.copytree(LLAMA / "ckpt", dst)
    write_byte_tokenizer(dst)
    return dst


@pytest.fixture
def dream_copy(tmp_path):
    """A writable copy of the tiny Dream checkpoint with a byte tokenizer under Dream's special names."""
    dst = tmp_path / "dream"
    shutil.copytree(DREAM / "ckpt", dst)
    write_byte_tokenizer(dst, specials=DREAM_SPECIALS)
    return dst


def run_script(script, *args):
    """`python script args` run in this process (no interpreter and torch start-up per test): returns an
    object with returncode, stdout and stderr like subprocess.run. Errors go through run_cli as in a shell."""
    import contextlib
    import importlib
    import io
    import types
    from cli import run_cli
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(module.main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
