import json
import random
import re

import pytest
from tokenizers import Tokenizer

from conftest import run_script, write_byte_tokenizer
from eval_niah import score
from haystack import PROMPT, build_prompt, generated_sentences
from model import UserError

NEEDLE = "Hidden on Marrow Island is the legendary Jade Crown."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def sentence_ids(tok, seed):
    return (tok.encode(" " + s, add_special_tokens=False).ids for s in generated_sentences(random.Random(seed)))


@pytest.mark.parametrize("length", [700, 1500])
@pytest.mark.parametrize("depth", [0, 10, 35, 50, 90, 100])
def test_needle_at_depth_within_one_sentence_and_exact_length(tok, length, depth):
    ids = build_prompt(tok, sentence_ids(tok, 1), length, depth, "Marrow", NEEDLE)
    assert len(ids) == length
    text = tok.decode(ids)
    assert text.endswith("The legendary item hidden on the Marrow Island is")
    head, tail = len(PROMPT[0]), len(PROMPT[1].format("Marrow"))
    context = text[head:len(text) - tail]  # byte tokenizer: characters = tokens for this ASCII text
    at = context.index("\n" + NEEDLE + "\n")
    haystack = context[:at] + context[at + len(NEEDLE) + 2:]
    assert context.count(NEEDLE) == 1
    sentences = [len(s) for s in re.split(r"(?<=\.) ", haystack)]
    target = depth / 100 * len(haystack)
    assert abs(at - target) <= max(sentences) / 2 + 1  # the nearest sentence boundary to the asked depth
    assert at in (0, len(haystack)) or haystack[at - 1] == "."  # a sentence boundary, or an end of the document


def test_generation_is_deterministic_for_a_seed(tok):
    a = build_prompt(tok, sentence_ids(tok, "0-3"), 900, 50, "Marrow", NEEDLE)
    b = build_prompt(tok, sentence_ids(tok, "0-3"), 900, 50, "Marrow", NEEDLE)
    c = build_prompt(tok, sentence_ids(tok, "0-4"), 900, 50, "Marrow", NEEDLE)
    assert a == b and a != c
    text = " ".join(s for s, _ in zip(generated_sentences(random.Random(0)), range(300)))
    assert len(set(re.split(r"(?<=\.) ", text))) > 200  # varied prose, not a few repeated sentences


def test_too_short_length_or_haystack(tok):
    with pytest.raises(UserError, match="cannot hold the prompt scaffold"):
        build_prompt(tok, sentence_ids(tok, 0), 300, 50, "Marrow", NEEDLE)
    with pytest.raises(UserError, match="the haystack has 41 tokens"):
        build_prompt(tok, iter([[1] * 40, [2]]), 700, 50, "Marrow", NEEDLE)


def test_score():
    assert score(" the Jade Crown, of course.", "Jade Crown", NEEDLE) == 100
    near = score("Hidden on Marrow Island is the legendary Jade Crow.", "Jade Crown", NEEDLE)
    assert near == pytest.approx(0.2 * 100 * (1 - 1 / len(NEEDLE)))
    assert score("  ", "Jade Crown", NEEDLE) == 0  # whitespace-stripped: distance = the needle's length
    assert 0 <= score("zzzz", "Jade Crown", NEEDLE) < 2


def niah(*args):
    return run_script("eval_niah.py", *args)


def test_end_to_end_resume_and_plot(ckpt_bytes, tmp_path):
    out = tmp_path / "res" / "tiny.jsonl"
    args = ["--model", ckpt_bytes, "--lengths", "700,900", "--depths", "0:100:50", "--repeats", 2, "--steps", 4,
            "--gen-length", 8, "--block-length", 8, "--device", "cpu", "--out", out]
    r = niah(*args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["length"], r["depth"], r["repeat"]) for r in rows) == \
        sorted((n, d, i) for n in (700, 900) for d in (0, 50, 100) for i in range(2))
    assert all(0 <= r["score"] <= 100 and r["settings"]["steps"] == 4 for r in rows)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and "sample 12/12" in r.stderr
    before = out.read_bytes()
    r = niah(*args)  # resume: nothing left to do, so no model is loaded and nothing is written
    assert r.returncode == 0 and "loaded" not in r.stderr and out.read_bytes() == before
    out.write_text("".join(before.decode().splitlines(keepends=True)[:7]))  # as if killed after 7 samples
    r = niah(*args)
    assert r.returncode == 0 and "sample 5/5" in r.stderr and out.read_bytes() == before
    r = niah(*args[:-2], "--steps", 8, "--out", out)
    assert r.returncode == 2 and "other settings" in r.stderr
    out.with_suffix(".png").unlink()
    r = niah("--plot", out)
    assert r.returncode == 0 and out.with_suffix(".png").exists() and "overall" in r.stdout
    (tmp_path / "empty.jsonl").write_text("")
    assert niah("--plot", tmp_path / "empty.jsonl").stderr.startswith("error: no results to plot")


def test_file_haystack(ckpt_bytes, tmp_path):
    hay = tmp_path / "book.txt"
    hay.write_text("")
    args = ["--model", ckpt_bytes, "--lengths", "700", "--depths", "50", "--repeats", 1, "--steps", 4,
            "--gen-length", 4, "--block-length", 4, "--device", "cpu", "--out", tmp_path / "h.jsonl"]
    r = niah(*args, "--haystack", hay)
    assert r.returncode == 2 and "the haystack has 0 tokens" in r.stderr
    hay.write_text("Short. Text.")
    r = niah(*args, "--haystack", hay)
    assert r.returncode == 2 and "the haystack has 13 tokens" in r.stderr and "loaded" not in r.stderr
    hay.write_text(" ".join(f"Sentence number {i} is here." for i in range(200)))
    assert niah(*args, "--haystack", hay).returncode == 0


@pytest.mark.parametrize("extra,msg", [(["--depths", "0:120:10"], "within 0 to 100"),
                                       (["--lengths", "100"], "cannot hold the prompt scaffold"),
                                       (["--lengths", "lots"], "argument --lengths: expected lengths like 8k"),
                                       (["--steps", 40], "a multiple of 1 up to 32"),
                                       (["--model", "/no/such/dir"], "model folder not found")])
def test_bad_input(ckpt_bytes, tmp_path, extra, msg):
    r = niah("--model", ckpt_bytes, "--device", "cpu", "--out", tmp_path / "x.jsonl", *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr
    assert "loaded" not in r.stderr  # refused before the weights are loaded
