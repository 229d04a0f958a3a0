"""The needle-in-a-haystack test material (REFERENCE.md section 5): a haystack generated from the project's
own word lists (or read from a file), seeded needles, and prompts of an exact token length."""
import random
import re
from itertools import islice

import torch

from cli import read_text, special_ends
from model import UserError

ISLANDS = ("Marrow Kestrel Tamsin Orlaith Brevik Solvang Quillon Harrowgate Ebbridge Corvane Lindqvist Maravel "
           "Ostrava Rennick Sablewick Thornmere Vantor Wexley Ysolde Pellmoor").split()
ITEMS = [f"{a} {b}" for a in "Amber Bronze Crystal Ebony Golden Ivory Jade Obsidian Silver Sapphire".split()
         for b in "Compass Crown Chalice Dagger Harp Lantern Mirror Scroll Shield Spear Telescope Key".split()]
# The default haystack is generated prose with real sentence boundaries. RULER's "noise" haystack repeats five
# fixed sentences, which makes any new sentence, such as the needle, stand out far too easily.
WORDS = dict(who="the old ferryman|a quiet archivist|the village council|my grandmother|a travelling merchant|two "
                 "fishermen|the schoolteacher|a tired soldier|the baker's daughter|the harbour master",
             did="carried|mended|painted|counted|buried|sold|studied|polished|traded|followed|measured|described",
             adj="weathered|narrow|crooked|silent|golden|borrowed|forgotten|heavy|fragile|ordinary|distant|painted",
             thing="lantern|ledger|bridge|orchard|wagon|letter|well|window|map|garden|bell|staircase|boat|fence",
             place="harbour|market square|mill|chapel|valley|library|northern road|inn|lighthouse|granary",
             when="the first frost|midsummer|the long rains|dawn|the harvest fair|the spring tide|late autumn")
TEMPLATES = ["{Who} {did} the {adj} {thing} near the {place}.", "By {when}, {who} had {did} every {thing} there.",
             "Nobody at the {place} could say why the {thing} had become so {adj}.",
             "It was said that the {adj} {thing} was only ever seen around {when}.",
             "The {place} was {adj} that year, and {who} {did} the {thing} without a word.",
             "When {when} came, the {thing} by the {place} was {adj} again."]
PROMPT = ("You are an intelligent AI assistant skilled in answering user questions.\nPlease keep your answers concise "
          "and clear. Do not talk about irrelevant topics or repeat your answers.\nThe document given to you by the "
          "user is ",  # {context}, then:
          "\n\nNow, the question is: What legendary item is hidden on {0} Island? Before answering, please consider "
          "what in the document is most relevant to this question. The legendary item hidden on the {0} Island is")


def generated_sentences(rng):
    """An endless stream of sentences drawn from the word lists and templates above."""
    words = {k: v.split("|") for k, v in WORDS.items()}
    while True:
        pick = {k: rng.choice(v) for k, v in words.items()}
        yield rng.choice(TEMPLATES).format(Who=pick["who"].capitalize(), **pick)


def build_prompt(tok, sentences, length, depth, island, needle, bos=""):
    """Exactly `length` token ids: scaffold + haystack, with the needle on its own line at the sentence
    boundary nearest `depth`% of the haystack, and what the tokenizer adds by default (LLaMA-3: its BOS) around
    it all, after the text `bos` (Dream's, cli.PROMPT_BOS), counted in the length. `sentences`: token ids, one
    sentence each."""
    head, tail, needle = (tok.encode(t, add_special_tokens=False).ids
                          for t in (PROMPT[0], PROMPT[1].format(island), f"\n{needle}\n"))
    before, after = special_ends(tok, bos)
    head, tail = before + head, tail + after
    budget = length - len(head) - len(tail) - len(needle)
    if budget < 1:
        raise UserError(f"length {length} cannot hold the prompt scaffold and needle ({length - budget + 1} at least)")
    pieces, n = [], 0
    for ids in sentences:
        if n >= budget:
            break
        pieces.append(ids[:budget - n])  # the last sentence is cut to fit exactly
        n += len(pieces[-1])
    if n < budget:
        raise UserError(f"the haystack has {n} tokens; length {length} needs {budget}")
    bounds = torch.tensor([0] + [len(p) for p in pieces]).cumsum(0)
    k = int((bounds - depth / 100 * n).abs().argmin())
    return head + sum(pieces[:k], []) + needle + sum(pieces[k:], []) + tail


def sample_prompt(tok, book, seed, length, depth, repeat, bos=""):
    """One sample's prompt ids, keyword and needle. The draws depend on (seed, repeat) only: the same needle
    and haystack at every length and depth, on any rank. `book`: a file's sentences, or None (generated)."""
    rng = random.Random(f"{seed}-{repeat}")
    island, item = rng.choice(ISLANDS), rng.choice(ITEMS)
    needle = f"Hidden on {island} Island is the legendary {item}."
    start = rng.randrange(max(len(book), 1)) if book is not None else 0  # each repeat from its own sentence
    text = book[start:] + book[:start] if book is not None else islice(generated_sentences(rng), length // 4)
    sentences = [e.ids for e in tok.encode_batch([" " + s for s in text], add_special_tokens=False)]
    return build_prompt(tok, sentences, length, depth, island, needle, bos), item, needle


def read_book(path):
    """The sentences of a text file given as --haystack; None (the generated haystack) without one."""
    return [s for s in re.split(r"(?<=[.!?])\s+", read_text(path)) if s] if path else None
