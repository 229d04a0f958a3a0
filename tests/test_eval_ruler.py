"""RULER's tasks (LongLLaDA Table 2): prompts that fit the budget and whose answers can be read off the prompt
itself, RULER's scoring and Table 2's averages, and the script end to end on the tiny checkpoints."""
import json
import re
from collections import Counter

import pytest
from tokenizers import Tokenizer

from conftest import run_script, write_byte_tokenizer
from eval_ruler import score, string_match_all, string_match_part, summary
from ruler_tasks import NIAH, TASKS, budget, haystack_size, make_sample, prompt_text, prompt_tokens, read_qa

SYNTHETIC = TASKS[:11]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Byte-level with a BOS by default: every character is a token, so budgets are tight and the specials show."""
    folder = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(folder, bos=True)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def answers_from_prompt(task, text):
    """What a reader of the prompt alone would answer: the task's rule applied to the text."""
    if task in NIAH:
        question = text.rsplit("\n", 1)[1]
        queries = re.search(r"magic \w+ for (.+?) mentioned", question).group(1).replace(", and ", ", ").split(", ")
        needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", text)
        return sorted(value for q in queries for key, value in needles if key == q)
    if task == "vt":
        value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
        found = [n for n, v in re.findall(r"^VAR (\w+) = (\d+)$", text, re.M) if v == value]
        links = re.findall(r"^VAR (\w+) = VAR (\w+)$", text, re.M)
        while any(b in found and a not in found for a, b in links):
            found += [a for a, b in links if b in found and a not in found]
        return sorted(found)
    if task == "cwe":
        main = text.rsplit("Below is a numbered list of words.", 1)[1].split("\nQuestion")[0]
        counts = Counter(re.findall(r"\d+\. (\w+)", main)).most_common()
        assert counts[9][1] > counts[10][1]  # the top 10 are unambiguous
        return sorted(w for w, _ in counts[:10])
    if task == "fwe":
        coded = text.split("coded words. ", 1)[1].split("\nQuestion")[0].split()
        counts = Counter(w for w in coded if w != "...").most_common()
        assert counts[2][1] > counts[3][1]
        return sorted(w for w, _ in counts[:3])


@pytest.mark.parametrize("task", SYNTHETIC)
@pytest.mark.parametrize("length", [2500, 9000])  # both sides of 4096 (cwe differs)
def test_prompt_fits_the_budget_fully_and_holds_its_answers(tok, task, length):
    ids, answers = make_sample(task, tok, length, 0, 3)
    assert ids[0] == 376 and ids.count(376) == 1  # the tokenizer's BOS, not counted by RULER
    assert len(ids) - 1 <= budget(task, length)  # never over
    n = haystack_size(task, tok, length, 0, 3)
    assert prompt_tokens(tok, prompt_text(task, 0, 3, length, n + 1)[0]) > budget(task, length)  # no room for more
    text = tok.decode(ids)
    assert text == prompt_text(task, 0, 3, length, n)[0]
    assert answers_from_prompt(task, text) == sorted(answers)


def test_samples_depend_on_seed_task_and_index_only(tok):
    a = make_sample("niah_multikey_1", tok, 3000, 5, 7)
    assert make_sample("niah_multikey_1", tok, 3000, 5, 7) == a
    assert make_sample("niah_multikey_1", tok, 3000, 5, 8) != a and make_sample("niah_multikey_1", tok, 3000, 6, 7) != a
    # the same needles at another length: only the haystack grows
    assert make_sample("niah_multikey_1", tok, 6000, 5, 7)[1] == a[1]


def test_templates(tok):
    single = tok.decode(make_sample("niah_single_1", tok, 2500, 0, 0)[0])
    assert single.startswith("A special magic number is hidden within the following text.")
    assert single.endswith(" The special magic number for " + re.search(r"for (\S+) mentioned", single).group(1)
                           + " mentioned in the provided text is")
    assert "One of the special magic numbers for " in single and "The grass is green. The sky is blue." in single
    multi = tok.decode(make_sample("niah_multivalue", tok, 2500, 0, 0)[0])
    assert multi.startswith("Some special magic numbers are hidden") and multi.endswith("provided text are")
    uuids = make_sample("niah_multikey_3", tok, 2500, 0, 0)[1]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuids[0])
    vt = tok.decode(make_sample("vt", tok, 2500, 0, 0)[0])
    assert vt.endswith("5 variables are assigned the value " + re.search(r"value (\d+) in", vt).group(1) +
                       ", they are: ")


def test_too_short_length(tok):
    with pytest.raises(Exception, match="length 300 cannot hold a cwe prompt and 120 tokens to generate"):
        make_sample("cwe", tok, 300, 0, 0)


@pytest.fixture
def qa_files(tmp_path):
    paragraphs = [{"context": f"Paragraph {i} says the capital of land {i} is city {i}.",
                   "qas": [{"question": f"What is the capital of land {i}?", "is_impossible": False,
                            "answers": [{"text": f"city {i}"}, {"text": f"City {i}"}]},
                           {"question": "Unanswerable?", "is_impossible": True, "answers": []}]} for i in range(30)]
    squad = tmp_path / "dev-v2.0.json"
    squad.write_text(json.dumps({"data": [{"title": "A", "paragraphs": paragraphs[:15]},
                                          {"title": "B", "paragraphs": paragraphs[15:]}]}))
    hotpot = tmp_path / "hotpot_dev_distractor_v1.json"
    hotpot.write_text(json.dumps([{"question": f"Which river {i}?", "answer": f"river {i}",
                                   "context": [[f"Title {i}-{j}", [f"Sentence {j} of {i}. ", "More."]]
                                               for j in range(3)]} for i in range(10)]))
    return squad, hotpot


def test_qa_samples(tok, qa_files):
    squad, hotpot = (read_qa(f, hotpot=h) for f, h in zip(qa_files, (False, True)))
    assert len(squad[0]) == 30  # the answerable questions only
    ids, answers = make_sample("qa_1", tok, 1200, 0, 4, qa_data=squad)
    text = tok.decode(ids)
    assert answers == ["city 4", "City 4"] and "Paragraph 4 says" in text and text.endswith("Question: What is the "
                                                                                           "capital of land 4? Answer:")
    assert text.count("Document ") > 3 and len(ids) - 1 <= budget("qa_1", 1200)
    ids, answers = make_sample("qa_2", tok, 1200, 0, 2, qa_data=hotpot)
    assert answers == ["river 2"] and all(f"Title 2-{j}\nSentence {j} of 2. More." in tok.decode(ids) for j in range(3))


def test_scoring_rules():
    assert string_match_all("Alpha, beta and GAMMA", ["alpha", "beta", "gamma", "delta"]) == 0.75
    assert string_match_part("the answer is Paris", ["London", "paris"]) == 1.0
    assert string_match_part("no idea", ["London", "Paris"]) == 0.0
    assert score("qa_1", "\x00 Paris \n", ["paris"]) == 100 and score("vt", "A B", ["A", "B", "C", "D"]) == 50


def test_table_two_averages():
    rows = [dict(task=t, length=4096, score=s) for t, s in zip(TASKS, [90] * 8 + [60, 30, 30] + [80, 40])]
    rows += [dict(task="niah_single_1", length=4096, score=70)]  # two samples: their mean
    cells, columns = summary(rows)
    assert cells["niah_single_1", 4096] == 80
    niah = (80 + 90 * 7) / 8
    assert columns["NIAH", 4096] == niah and columns["AGG", 4096] == 40 and columns["QA", 4096] == 60
    assert columns["Avg", 4096] == pytest.approx((8 * niah + 3 * 40 + 2 * 60) / 13)


@pytest.mark.parametrize("causal", [False, True])
def test_end_to_end_resume_and_table(ckpt_bytes, llama_copy, qa_files, tmp_path, causal):
    model = llama_copy if causal else ckpt_bytes
    out = tmp_path / "ruler.jsonl"
    args = ["--model", model, "--tasks", "niah_single_1,vt,qa_1,qa_2", "--lengths", "2500", "--samples", 2,
            "--gen-length", 8, "--steps", 8, "--block-length", 8, "--device", "cpu", "--squad", qa_files[0],
            "--out", out]
    r = run_script("eval_ruler.py", *args)
    assert r.returncode == 0, r.stderr
    assert "qa_2: not run (it needs --hotpotqa FILE)" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["task"], r["index"]) for r in rows) == [(t, i) for t in ("niah_single_1", "qa_1", "vt")
                                                            for i in (0, 1)]
    assert all(0 <= r["score"] <= 100 and r["settings"]["qa_1"] == "dev-v2.0.json" for r in rows)
    assert re.search(r"^QA +\d", r.stdout, re.M) and re.search(r"^Avg +\d", r.stdout, re.M)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    before = out.read_bytes()
    r = run_script("eval_ruler.py", *args)  # resume: nothing left, no model loaded
    assert r.returncode == 0 and "loaded" not in r.stderr and out.read_bytes() == before
    r = run_script("eval_ruler.py", *args[:-2], "--seed", 1, "--out", out)
    assert r.returncode == 2 and "other settings" in r.stderr
    assert run_script("eval_ruler.py", "--table", out).returncode == 0


@pytest.mark.parametrize("extra,msg", [(["--tasks", "niah_single_9"], "unknown task 'niah_single_9'"),
                                       (["--lengths", "300"], "length 300 cannot hold"),
                                       (["--lengths", "x"], "argument --lengths"),
                                       (["--squad", "/no/such.json"], "No such file"),
                                       (["--samples", 0], "argument --samples: expected an integer >= 1")])
def test_bad_input(ckpt_bytes, tmp_path, extra, msg):
    r = run_script("eval_ruler.py", "--model", ckpt_bytes, "--device", "cpu", "--out", tmp_path / "x.jsonl", *extra)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr and "loaded" not in r.stderr
