"""Long-context retrieval tasks from a seeded generator: the prompts that show whether a compressed
KV cache still holds the facts a question needs. Formats (plain text, documented in the README):

  key-value recall  prose with records "The code of <name> is <dddd>." scattered through it, then
                    the question "What is the code of <name>?"; the answer is the 4 digits.
  needle            one record placed at a chosen depth (0.0 = the start, 1.0 = the end) of the
                    prose, then the same question about it.

Names are drawn from a fixed list, codes uniformly from 1000-9999; the same seed gives the same
task. Prose is any list of sentences (the training split, or held-out text for evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kvjax.errors import KVJaxError

NAMES = (
    "Abel", "Ada", "Agnes", "Alba", "Amos", "Anna", "Arden", "Asa", "Basil", "Bea", "Bram", "Cora", "Cyrus",
    "Dara", "Dell", "Edda", "Eli", "Enid", "Ezra", "Faye", "Finn", "Gale", "Gus", "Hale", "Hana", "Ida", "Ira",
    "Ivo", "Jada", "Jem", "Juno", "Kai", "Kit", "Lars", "Lena", "Lior", "Mabel", "Milo", "Nell", "Nico", "Noor",
    "Odo", "Olga", "Otto", "Pia", "Quin", "Rhea", "Rolf", "Ruth", "Sage", "Saul", "Tess", "Theo", "Uma",
    "Vera", "Wade", "Wren", "Xena", "Yara", "Yusuf", "Zane", "Zora",
)


@dataclasses.dataclass(frozen=True)
class Task:
    context: str  # prose with the records in it
    question: str  # "What is the code of <name>?"
    answer: str  # the 4 digits
    depth: float  # where the asked record sits in the context (0 = start, 1 = end)


def record(name: str, code: int) -> str:
    return f"The code of {name} is {code}."


def question(name: str) -> str:
    return f"What is the code of {name}?"


def _prose(sentences: Sequence[str], rng: np.random.Generator, num_words: int) -> list[str]:
    """Consecutive sentences from a random start, about num_words words in all."""
    if not sentences:
        raise KVJaxError("no prose sentences to build retrieval tasks from")
    start, out, words = int(rng.integers(len(sentences))), [], 0
    while words < num_words:
        sentence = sentences[(start + len(out)) % len(sentences)]
        out.append(sentence)
        words += len(sentence.split())
    return out


def key_value_recall(sentences: Sequence[str], seed: int, *, num_records: int = 4, num_words: int = 300) -> Task:
    """num_records records at random places in ~num_words words of prose; one of them is asked."""
    rng = np.random.default_rng(seed)
    names = rng.choice(len(NAMES), size=num_records, replace=False)
    codes = rng.integers(1000, 10000, size=num_records)
    prose = _prose(sentences, rng, num_words)
    places = np.sort(rng.integers(0, len(prose) + 1, size=num_records))
    asked = int(rng.integers(num_records))
    parts = list(prose)
    for i in reversed(range(num_records)):  # insert from the back so earlier places stay valid
        parts.insert(int(places[i]), record(NAMES[names[i]], int(codes[i])))
    position = int(places[asked]) + asked  # index of the asked record after all insertions
    depth = position / max(len(parts) - 1, 1)
    return Task(" ".join(parts), question(NAMES[names[asked]]), str(int(codes[asked])), depth)


def needle(sentences: Sequence[str], seed: int, *, depth: float, num_words: int = 300) -> Task:
    """One record at `depth` (0-1) of ~num_words words of prose, then the question about it."""
    if not 0.0 <= depth <= 1.0:
        raise KVJaxError(f"needle depth must be in [0, 1], got {depth}")
    rng = np.random.default_rng(seed)
    name, code = NAMES[int(rng.integers(len(NAMES)))], int(rng.integers(1000, 10000))
    prose = _prose(sentences, rng, num_words)
    place = round(depth * len(prose))
    parts = prose[:place] + [record(name, code)] + prose[place:]
    return Task(" ".join(parts), question(name), str(code), place / max(len(parts) - 1, 1))
