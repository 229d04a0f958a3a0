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
