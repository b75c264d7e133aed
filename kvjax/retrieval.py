"""Long-context retrieval tasks from a seeded generator: the prompts that show whether a compressed
KV cache still holds the facts a question needs. Formats (plain text, documented in the README):

  key-value recall  prose with records "The code of <name> is <dddd>." scattered through it, then
                    the question "What is the code of <name>?"; the reply repeats the record
                    ("The code of <name> is <dddd>."), and it is right when the first 4-digit
                    number in it is the code.
  needle            one record placed at a chosen depth (0.0 = the start, 1.0 = the end) of the
                    prose, then the same question about it.

The reply repeats the record because then the code follows "<name> is" in both places: the model
copies it as an induction head would, rather than first recalling which record was asked about.
Names are drawn from a fixed list (NAMES: 62 people of the KJV), codes uniformly from 1000-9999;
the same seed gives the same task. Prose is any list of sentences (the training split, or held-out text for evaluation).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from kvjax.errors import KVJaxError

# Each one BPE token for the shipped tokenizer (" David" -> one id), so a question names its record
# in one token; multi-token names that share suffixes (" Ad" "a", " Cor" "a") made binding a code to
# its name much harder to learn for the small default model.
NAMES = (
    "Aaron", "Abner", "Abraham", "Abram", "Absalom", "Ahab", "Ahaz", "Amaziah", "Asa", "Azariah", "Balaam",
    "Balak", "Benaiah", "Benjamin", "Daniel", "David", "Eleazar", "Elijah", "Elisha", "Esau", "Gideon",
    "Hezekiah", "Isaac", "Ishmael", "Jacob", "Jehoiada", "Jehu", "Jeremiah", "Jeroboam", "Jesse", "Joab",
    "Joash", "Job", "John", "Jonathan", "Joseph", "Joshua", "Josiah", "Laban", "Levi", "Mary", "Moses",
    "Nathan", "Noah", "Paul", "Peter", "Pilate", "Rachel", "Rehoboam", "Reuben", "Samson", "Samuel", "Sarah",
    "Saul", "Shemaiah", "Shimei", "Simeon", "Simon", "Solomon", "Zadok", "Zechariah", "Zedekiah",
)


_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")
_CODE = re.compile(r"(?<!\d)\d{4}(?!\d)")


def sentences(text: str) -> list[str]:
    """Prose -> its sentences (newlines read as spaces), the units tasks are built from."""
    return [s for s in _SENTENCE_END.split(text.replace("\n", " ")) if s]


@dataclasses.dataclass(frozen=True)
class Task:
    context: str  # prose with the records in it
    name: str  # whose code is asked
    answer: str  # the 4 digits
    depth: float  # where the asked record sits in the context (0 = start, 1 = end)
    records: tuple[tuple[str, str], ...] = ()  # every (name, code) in the context, in order

    @property
    def question(self) -> str:
        return question(self.name)

    @property
    def reply(self) -> str:
        """The reply a model is trained to give: the record again."""
        return record(self.name, int(self.answer))

    def is_answered_by(self, text: str) -> bool:
        """Whether the first 4-digit number in a model's reply is the code."""
        found = _CODE.search(text)
        return found is not None and found.group(0) == self.answer


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
    records = tuple((NAMES[n], str(int(c))) for n, c in zip(names, codes))  # places are sorted: context order
    return Task(" ".join(parts), NAMES[names[asked]], str(int(codes[asked])), depth, records)


def needle(sentences: Sequence[str], seed: int, *, depth: float, num_words: int = 300) -> Task:
    """One record at `depth` (0-1) of ~num_words words of prose, then the question about it."""
    if not 0.0 <= depth <= 1.0:
        raise KVJaxError(f"needle depth must be in [0, 1], got {depth}")
    rng = np.random.default_rng(seed)
    name, code = NAMES[int(rng.integers(len(NAMES)))], int(rng.integers(1000, 10000))
    prose = _prose(sentences, rng, num_words)
    place = round(depth * len(prose))
    parts = prose[:place] + [record(name, code)] + prose[place:]
    return Task(" ".join(parts), name, str(code), place / max(len(parts) - 1, 1), ((name, str(code)),))
