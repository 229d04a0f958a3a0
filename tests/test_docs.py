"""The README and docs/ as a newcomer meets them: links that resolve, download commands that today's `hf` takes,
and script commands whose flags exist."""
import re
import shlex

import pytest

from conftest import ROOT, run_script

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page):
    """The shell lines of a page's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    return [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8"))
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert local or page.name != "README.md"
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, missing


def test_front_page_is_short_and_keeps_the_laptop_figures():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    laptop = re.search(r"^## [^\n]*laptop[^\n]*\n(.*?)(?=^## )", text, re.M | re.S | re.I)
    assert laptop and "docs/laptop_ppl.png" in laptop[1] and "docs/laptop_qk.png" in laptop[1]


def test_no_removed_download_command_anywhere():
    gone = "huggingface" + "-cli"  # spelled in two pieces so that this file does not match itself
    files = [*PAGES, *ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), ROOT / "requirements.txt", ROOT / ".ci" / "run"]
    assert not [p for p in files if gone in p.read_text(encoding="utf-8", errors="ignore")]


def test_hf_download_lines_are_valid_for_hf_2():
    """`hf download REPO_ID [FILENAMES]... [--include P]... [--repo-type T] --local-dir DIR` (huggingface_hub 2.x)."""
    lines = [(p.name, c[c.index("hf download"):].split("#")[0]) for p in PAGES for c in commands(p)
             if "hf download" in c]
    assert len(lines) >= 10
    for page, line in lines:
        words = shlex.split(line.replace("$m", "M").replace(";", " "))[2:]
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", words[0]), (page, line)
        options = dict(zip(words[1::2], words[2::2]))
        flags = [w for w in words if w.startswith("-")]
        assert set(flags) <= {"--include", "--repo-type", "--local-dir"} and "--local-dir" in flags, (page, line)
        assert options.get("--repo-type", "dataset") in ("dataset", "model"), (page, line)
        assert all(w == "download" or not w.startswith("-") for w in words[words.index(flags[0]) + 1::2]), line


SCRIPTS = ["sample.py", "eval_ppl.py", "eval_niah.py", "qk_states.py", "eval_ruler.py", "eval_longbench.py",
           "train.py", "rope.py", "bench.py"]


@pytest.fixture(scope="module")
def helps():
    return {s: run_script(s, "--help").stdout for s in SCRIPTS}


def test_every_printed_script_flag_exists(helps):
    used = 0
    for page in PAGES:
        for line in commands(page):
            for script in re.findall(r"(?:python|torchrun[^\n]*?) +(\w+\.py)", line):
                assert script in helps, (page.name, line)
                for flag in re.findall(r" (--[a-z][a-z-]*)", line.split(script, 1)[1].split("#")[0]):
                    used += 1
                    assert re.search(re.escape(flag) + r"(?![\w-])", helps[script]), (page.name, script, flag)
    assert used > 100
