"""RULER's tasks (Hsieh et al. 2024, arXiv 2404.06654) as LongLLaDA's Table 2 runs them (REFERENCE.md section 7):
each sample's prompt and answers, made from (seed, task, index) only and filling a token budget.

Every task is a function of (rng, n) -> (context, query, answers), n the haystack size in its units (sentences,
lines, words or documents). Draws that do not depend on n come first, so a sample's answers and the beginning of
its haystack are the same at every n; make_sample then looks for the largest n whose prompt fits.
"""
import json
import random
import string
import uuid
from itertools import islice

from cli import read_text, special_ends
from haystack import generated_sentences
from model import UserError

TOKENS_TO_GENERATE = dict(niah=128, vt=30, cwe=120, fwe=50, qa=32)  # RULER's budgets: prompt <= length - these
NIAH = dict(  # haystack, key kind, value kind, keys, values per key, queries
    niah_single_1=("noise", "words", "numbers", 1, 1, 1), niah_single_2=("essay", "words", "numbers", 1, 1, 1),
    niah_single_3=("essay", "words", "uuids", 1, 1, 1), niah_multikey_1=("essay", "words", "numbers", 4, 1, 1),
    niah_multikey_2=("needle", "words", "numbers", 1, 1, 1), niah_multikey_3=("needle", "uuids", "uuids", 1, 1, 1),
    niah_multivalue=("essay", "words", "numbers", 1, 4, 1), niah_multiquery=("essay", "words", "numbers", 4, 1, 4))
TASKS = [*NIAH, "vt", "cwe", "fwe", "qa_1", "qa_2"]
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TEMPLATES = dict(  # (template, answer prefix); the prompt ends exactly at the prefix
    niah=("Some special magic {type} are hidden within the following text. Make sure to memorize it. I will quiz you "
          "about the {type} afterwards.\n{context}\nWhat are all the special magic {type} for {query} mentioned in "
          "the provided text?", " The special magic {type} for {query} mentioned in the provided text are"),
    vt=("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
        "Find all variables that are assigned the value {query} in the text above.", " Answer: According to the "
        "chain(s) of variable assignment in the text above, 5 variables are assigned the value {query}, they are: "),
    cwe=("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
         "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
         " Answer: The top 10 words that appear most often in the list are:"),
    fwe=("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
         "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
         "What are the three most frequently appeared words in the above coded text?",
         " Answer: According to the coded text above, the three most frequently appeared words are:"),
    qa=("Answer the question based on the given documents. Only give me the answer and do not output any other words."
        "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {query}", " Answer:"))


def distinct(n, draw):
    """The first n different values that draw() returns, in the order drawn."""
    found = {}
    while len(found) < n:
        found.setdefault(draw())
    return list(found)


def pseudo_words(n=10000, seed=0):
    """The project's own word source (RULER uses the `wonderwords` lists): n distinct lowercase words of 2-3
    consonant-vowel syllables, the same for every model and run."""
    syllables, rng = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"], random.Random(seed)
    return sorted(distinct(n, lambda: "".join(rng.choice(syllables) for _ in range(rng.choice((2, 3))))))


WORDS = pseudo_words()


def draw(kind, rng):
    """A needle key or value: a word pair (RULER: adjective-noun), a 7-digit number or a uuid4."""
    if kind == "words":
        return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def niah(task, rng, n, book=None):
    """Needles `One of the special magic {numbers} for {key} is: {value}.` in n sentences of prose (at distinct
    depths of 40 evenly spaced ones, at sentence boundaries), or among n noise lines or n distractor needles (at
    random lines)."""
    hay, key_kind, kind, n_keys, n_values, n_queries = NIAH[task]
    keys = distinct(n_keys, lambda: draw(key_kind, rng))
    values = [[draw(kind, rng) for _ in range(n_values)] for _ in keys]
    needles = [f"One of the special magic {kind} for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    queries = rng.sample(keys, n_queries)
    answers = [v for q in queries for v in values[keys.index(q)]]
    if hay == "essay":
        start = rng.randrange(len(book)) if book else 0
        sentences = list(islice(generated_sentences(rng), n)) if book is None else (book[start:] + book[:start])[:n]
        cuts = sorted(int(n * d / 100) for d in rng.sample([round(100 * i / 39) for i in range(40)], len(needles)))
        pieces = [" ".join(sentences[a:b]) for a, b in zip([0] + cuts, cuts + [n])]
        context = " ".join(p for pair in zip(pieces, needles + [""]) for p in pair if p)
    else:
        lines = [NOISE] * n if hay == "noise" else []
        while len(lines) < n:  # distractor needles with fresh keys
            key = draw(key_kind, rng)
            lines += [f"One of the special magic {kind} for {key} is: {draw(kind, rng)}."] * (key not in keys)
        for needle in needles:
            lines.insert(rng.randint(0, len(lines)), needle)
        context = "\n".join(lines)
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    return context, query, answers


def vt(rng, n):
    """One chain of 5 variables (5 random capitals each), `VAR A = 12345` then `VAR B = VAR A` ..., in order
    among n noise lines; the answer is the 5 names."""
    names = distinct(5, lambda: "".join(rng.choices(string.ascii_uppercase, k=5)))
    value = str(rng.randint(10000, 99999))
    lines = [NOISE] * n
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    for i, at in enumerate(sorted(rng.randint(0, n) for _ in statements)):
        lines.insert(at + i, statements[i])
    return "\n".join(lines), value, names


def cwe(rng, n, short=False):
    """A numbered list of shuffled words: 10 common ones x 30 and n others x 3 (x 6 and x 1 for lengths < 4096);
    before it one solved example (40 words x 10 and x 3; 20 words x 3 and x 1 for lengths < 4096)."""
    words = rng.sample(WORDS, len(WORDS))  # a permutation: the first words are the same at every n

    def numbered(common, others, times):
        items = common * times[0] + others * times[1]
        rng.shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    ex, ex_times, times = (words[:20], (3, 1), (6, 1)) if short else (words[:40], (10, 3), (30, 3))
    template, prefix = TEMPLATES["cwe"]
    example = template.format(context=numbered(ex[:10], ex[10:], ex_times)) + prefix + " " + " ".join(
        f"{i + 1}. {w}" for i, w in enumerate(ex[:10]))
    common, others = words[len(ex):len(ex) + 10], words[len(ex) + 10:len(ex) + 10 + n]
    return numbered(common, others, times), example, common


def fwe(rng, n, vocab_size):
    """Coded text: vocab_size random 6-letter words, the one of rank k repeated floor(N k^-2 / zeta(2)) times for
    N = 100 + n words (Zipf), rank 1 written as '...' (noise), shuffled; the answer is ranks 2-4."""
    vocab = distinct(vocab_size, lambda: "".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab[0] = "..."
    text = [w for k, w in enumerate(vocab, 1) for _ in range(int((100 + n) * k ** -2 / 1.6449))]
    rng.shuffle(text)
    return " ".join(text), vocab[1:4]


def qa(rng, n, data, index):
    """Question `index` (in file order) with its gold document(s), then documents of the same article, then others,
    n in all (at least the gold ones), shuffled and written `Document {i}:\\n{text}`."""
    questions, docs = data
    q = questions[index % len(questions)]
    others = [d for d in rng.sample(range(len(docs)), len(docs)) if d not in q["gold"] + q["more"]]
    chosen = (q["gold"] + q["more"] + others)[:max(n, len(q["gold"]))]
    rng.shuffle(chosen)
    return "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen)), q["question"], q["answers"]


def read_qa(path, hotpot):
    """SQuAD 2.0 dev (answerable questions; gold: its paragraph, more: the article's others) or HotpotQA dev
    distractor (gold: its 10 paragraphs, `title\\ntext`) JSON, as (questions, documents)."""
    try:
        data = json.loads(read_text(path))
        if hotpot:
            items = [(d["question"], [d["answer"]], [f"{t}\n{''.join(s)}" for t, s in d["context"]], []) for d in data]
        else:
            items = [(qa["question"], [a["text"] for a in qa["answers"]], [p["context"]],
                      [o["context"] for o in art["paragraphs"] if o is not p])
                     for art in data["data"] for p in art["paragraphs"] for qa in p["qas"] if not qa["is_impossible"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a {'HotpotQA' if hotpot else 'SQuAD 2.0'} dev file ({e!r})") from None
    docs = sorted({d for _, _, gold, more in items for d in gold + more})
    ids = {d: i for i, d in enumerate(docs)}
    return [dict(question=q, answers=a, gold=[ids[d] for d in g], more=[ids[d] for d in m])
            for q, a, g, m in items], docs


def prompt_text(task, seed, index, length, n, book=None, qa_data=None):
    """The prompt (template + answer prefix, no chat template) and answers of one sample at haystack size n."""
    rng, family = random.Random(f"{seed}-{task}-{index}"), task.split("_")[0]
    template, prefix = TEMPLATES[family]
    if family == "niah":
        context, query, answers = niah(task, rng, n, book)
        kind = NIAH[task][2]
        if NIAH[task][4] * NIAH[task][5] == 1:  # one value, one query: RULER makes the template singular
            template, prefix = (t.replace("Some", "A").replace("are all", "is").replace("are", "is")
                                for t in (template, prefix))
            kind = kind[:-1]
        return (template + prefix).format(type=kind, context=context, query=query), answers
    if family == "cwe":
        context, example, answers = cwe(rng, n, short=length < 4096)
        return example + "\n" + (template + prefix).format(context=context), answers
    if family == "vt":
        context, query, answers = vt(rng, n)
    elif family == "fwe":
        (context, answers), query = fwe(rng, n, length // 50), None
    else:
        context, query, answers = qa(rng, n, qa_data, index)
    return (template + prefix).format(context=context, query=query), answers


def budget(task, length):
    """Prompt tokens a sample may have: the length minus the task's tokens_to_generate (RULER's rule)."""
    return length - TOKENS_TO_GENERATE[task.split("_")[0]]


def prompt_tokens(tok, text):
    """Tokens of a prompt as RULER counts them: without the tokenizer's specials (a BOS is not counted)."""
    return len(tok.encode(text, add_special_tokens=False).ids)


def haystack_size(task, tok, length, seed, index, book=None, qa_data=None):
    """The largest haystack n whose prompt fits the budget (doubling, then bisection; more haystack, more tokens)."""
    if task == "cwe":
        limit = len(WORDS) - 50  # the words left besides the example's 40 and the 10 common ones
    elif task.startswith("qa"):
        limit = len(qa_data[1])  # every document of the file
    elif book and NIAH.get(task, [None])[0] == "essay":
        limit = len(book)  # every sentence of --haystack
    else:
        limit = budget(task, length)  # a unit is at least one token

    def fits(n):
        return prompt_tokens(tok, prompt_text(task, seed, index, length, n, book, qa_data)[0]) <= budget(task, length)
    if not fits(0):
        raise UserError(f"length {length} cannot hold a {task} prompt and {length - budget(task, length)} tokens to "
                        "generate")
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        lo, hi = ((lo + hi) // 2, hi) if fits((lo + hi) // 2) else (lo, (lo + hi) // 2)
    return lo


def make_sample(task, tok, length, seed, index, book=None, qa_data=None, bos=""):
    """(prompt ids, answers) of sample `index` of `task` at `length` tokens, with the largest haystack that fits
    (the ids include what the tokenizer adds by default, e.g. LLaMA-3's BOS, after the text `bos`: Dream's,
    cli.PROMPT_BOS). book: the sentences of --haystack (default: generated prose); qa_data: read_qa() of its file."""
    n = haystack_size(task, tok, length, seed, index, book, qa_data)
    text, answers = prompt_text(task, seed, index, length, n, book, qa_data)
    before, after = special_ends(tok, bos)
    return before + tok.encode(text, add_special_tokens=False).ids + after, answers
