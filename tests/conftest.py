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
