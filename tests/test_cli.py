"""What a user meets first: the tokenizer's own specials, one-line errors for bad input, --help, progress lines."""
import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer

import cli
import sample
from conftest import LLAMA_SPECIALS, ROOT, run_script, write_byte_tokenizer
from eval_ppl import next_token_nll
from haystack import PROMPT, sample_prompt
from model import load_model

BOS = 376


@pytest.fixture
def llama_bos(llama_copy):
    write_byte_tokenizer(llama_copy, True, LLAMA_SPECIALS)  # as LLaMA-3's tokenizer.json: <|begin_of_text|> first
    return llama_copy


def prompt_fed_to_generate(monkeypatch, *args):
    seen = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, prompt, *a, **k: seen.append(prompt[0].tolist()) or
                        real(model, prompt, *a, **k))
    r = run_script("sample.py", *args)
    assert r.returncode == 0, r.stderr
    return seen[0]


def test_sample_encodes_as_the_tokenizer_does(monkeypatch, llama_bos, llama_copy):
    args = ["--prompt", "Hello there", "--gen-length", 2, "--device", "cpu"]
    assert prompt_fed_to_generate(monkeypatch, "--model", llama_bos, *args) == [BOS] + list(b"Hello there")
    chat = prompt_fed_to_generate(monkeypatch, "--model", llama_bos, *args, "--chat")
    assert chat.count(BOS) == 1 and chat[0] == BOS  # the template's own, not a second one
    write_byte_tokenizer(llama_copy, bos=False)  # a tokenizer that adds nothing (LLaDA's)
    assert prompt_fed_to_generate(monkeypatch, "--model", llama_copy, *args) == list(b"Hello there")


def test_ppl_bos_is_context_not_scored(llama_bos, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 10
    (tmp_path / "doc.txt").write_text(text)
    out = tmp_path / "p.json"
    r = run_script("eval_ppl.py", "--model", llama_bos, "--text", tmp_path / "doc.txt", "--max-len", 256,
                   "--chunk", 32, "--device", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    ids = torch.tensor([BOS] + list(text.encode()))[:256]
    nll = next_token_nll(load_model(llama_bos), ids)  # nll[t] scores token t + 1: the BOS is never a target
    chunks = json.loads(out.read_text())["chunks"]
    assert chunks[0]["nll"] == pytest.approx(nll[31:63].mean().item(), abs=1e-6)
    assert chunks[-1]["nll"] == pytest.approx(nll[223:255].mean().item(), abs=1e-6)


@pytest.mark.parametrize("bos", [True, False])
def test_niah_prompt_has_exact_length_with_the_tokenizers_specials(tmp_path, bos):
    write_byte_tokenizer(tmp_path, bos=bos)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for length in (700, 901):
        ids, _, _ = sample_prompt(tok, None, 0, length, 50, 0)
        assert len(ids) == length and ids.count(BOS) == bos and (ids[0] == BOS) == bos
        assert bytes(ids[bos:bos + 20]) == PROMPT[0][:20].encode()


SCRIPTS = [("sample.py", ["--prompt", "w5"]), ("eval_ppl.py", ["--text", "x.txt"]), ("eval_niah.py", [])]


@pytest.mark.parametrize("script,extra", SCRIPTS)
@pytest.mark.parametrize("flag,value,msg", [
    ("--rope-scale", "0", "must be a finite number > 0"), ("--rope-scale", "nan", "must be a finite number > 0"),
    ("--rope-scale", "-2", "must be a finite number > 0"), ("--rope-scale", "inf", "must be a finite number > 0"),
    ("--rope-scaling", "longrope:4", "TYPE linear, dynamic or yarn"), ("--rope-scaling", "yarn", "FACTOR must be"),
    ("--rope-scaling", "yarn:0", "FACTOR must be"), ("--rope-scaling", "linear:nan", "FACTOR must be"),
    ("--device", "bogus", "unknown device 'bogus'"), ("--device", "cuda:99", "device cuda:99 is not available"),
])
def test_bad_flags_are_one_line_in_every_script(ckpt_tok, script, extra, flag, value, msg):
    r = run_script(script, "--model", ckpt_tok, *extra, flag, value)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr and flag in r.stderr


@pytest.mark.parametrize("flag", ["--temperature", "--cfg"])
def test_negative_sampling_values_are_refused(ckpt_tok, flag):
    r = run_script("sample.py", "--model", ckpt_tok, "--prompt", "w5", flag, "-1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "must be a finite number >= 0" in r.stderr


def test_files_that_are_not_utf8_are_named(ckpt_bytes, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 100)
    out = ["--out", tmp_path / "o.json"]
    for script, args in [("sample.py", ["--prompt", f"@{bad}"]), ("eval_ppl.py", ["--text", bad, *out]),
                         ("eval_niah.py", ["--haystack", bad, "--lengths", "700", *out])]:
        r = run_script(script, "--model", ckpt_bytes, "--device", "cpu", *args)
        assert r.returncode == 2 and r.stderr == f"error: {bad} is not UTF-8 text\n", (script, r.stderr)


def test_help_shows_defaults():
    r = run_script("sample.py", "--help")
    assert r.returncode == 0 and "(default: 128)" in r.stdout and "(default: low_confidence)" in r.stdout
    assert "(default: None)" not in r.stdout


def test_progress_lines_in_a_log(monkeypatch, capsys):
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 42.0, 43.0])
    monkeypatch.setattr(cli.time, "time", lambda: next(clock, 99.0))
    show = cli.progress(7, every=30)
    for i in range(1, 8):
        show(i, f"item {i}/7")
    assert capsys.readouterr().err == "item 1/7\nitem 4/7\nitem 7/7\n"  # whole lines: first, every 30 s, last


def test_ppl_log_has_whole_lines(ckpt_tok, tmp_path):
    (tmp_path / "doc.txt").write_text(" ".join(f"w{4 + i % 300}" for i in range(400)))
    r = run_script("eval_ppl.py", "--model", ckpt_tok, "--text", tmp_path / "doc.txt", "--max-len", 256,
                   "--chunk", 32, "--mc", 2, "--device", "cpu", "--out", tmp_path / "p.json")
    assert r.returncode == 0 and "\r" not in r.stderr
    assert [line.split()[1] for line in r.stderr.splitlines() if line.startswith("chunk")] == ["1/7", "7/7"]


def test_rope_and_plots_do_not_import_each_other():
    code = ("import sys; sys.modules['plots'] = None; import rope; "  # rope.py imports without plots.py...
            "sys.modules['rope'] = None; del sys.modules['plots']; import plots")  # ...and plots.py without rope.py
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
