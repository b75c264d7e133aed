"""Training data: records from LLaVA-style JSON or text JSONL, split, shuffled and padded to buckets.

Accepted records (one JSON list for `.json`, one object per line for `.jsonl`):
  {"image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                              {"from": "gpt", "value": "..."}, ...]}   (LLaVA)
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
  {"text": "..."}   (the first half of its tokens is the context, the rest the continuation)
Only the first user turn and the first answer are used, as FastCache did (reference notes section 5).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterator, Sequence

import numpy as np

from kvjax.errors import KVJaxError
from kvjax.prompts import bucket, encode_chat
from training.objective import Batch

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"


@dataclasses.dataclass(frozen=True)
class Record:
    """One parsed entry, before tokenization; `source` names its file and entry for errors."""

    question: str
    answer: str | None  # None for plain text: split by tokens instead
    image: pathlib.Path | None
    source: str


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]  # the context's token ids, ending where the answer starts
    answer: tuple[int, ...]
    image: pathlib.Path | None = None
    image_len: int = 0  # image prefix of the prompt (kvjax.multimodal); 0 = text only


def _bad(source: str, why: str) -> KVJaxError:
    return KVJaxError(f"{source}: {why}")


def _parse(entry, source: str, image_root: pathlib.Path | None) -> Record:
    if not isinstance(entry, dict):
        raise _bad(source, f"expected a JSON object, got {type(entry).__name__}")
    if "text" in entry and "conversations" not in entry and "messages" not in entry:
        text = entry["text"]
        if not isinstance(text, str) or not text.strip():
            raise _bad(source, "'text' must be a non-empty string")
        return Record(text, None, None, source)
    turns = entry.get("conversations", entry.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise _bad(source, "needs a non-empty 'conversations' or 'messages' list, or a 'text' string")
    messages = []
    for turn in turns:
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise _bad(source, f"bad turn {turn!r}: needs from/role in {sorted(ROLES)} and a string value/content")
        messages.append((ROLES[role], content))
    users = [i for i, (role, _) in enumerate(messages) if role == "user"]
    answer = next((i for i, (role, _) in enumerate(messages) if role == "assistant" and users and i > users[0]), None)
    if answer is None:
        raise _bad(source, "needs a user turn followed by an assistant (gpt) turn")
    question = messages[users[0]][1].replace(IMAGE_MARKER, "").strip()
    image = entry.get("image")
    if image is not None:
        if not isinstance(image, str) or image_root is None:
            raise _bad(source, "has an 'image' but no --image-root was given" if image_root is None
                       else f"'image' must be a relative path string, got {image!r}")
        image = image_root / image
        if not image.is_file():
            raise _bad(source, f"image {str(image)!r} does not exist")
    return Record(question, messages[answer][1], image, source)


def read_records(path, image_root=None) -> list[Record]:
    """Parse a `.json` list or `.jsonl` file; any bad entry raises one error naming file and entry."""
    path = pathlib.Path(path).expanduser()
    root = pathlib.Path(image_root).expanduser() if image_root else None
    if not path.is_file():
        raise KVJaxError(f"data file {str(path)!r} does not exist; pass --data FILE (.json or .jsonl)")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".jsonl":
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            entries = []
            for n, line in lines:
                try:
                    entries.append((f"{path}:line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise _bad(f"{path}:line {n}", f"not valid JSON ({e.msg})")
        else:
            data = json.loads(text)
            if not isinstance(data, list):
                raise _bad(str(path), "a .json data file must hold a list of records")
            entries = [(f"{path}:entry {i}", entry) for i, entry in enumerate(data)]
    except json.JSONDecodeError as e:
        raise _bad(str(path), f"not valid JSON ({e.msg} at line {e.lineno})")
    if not entries:
        raise KVJaxError(f"{path}: holds no records; add at least 2 (one to train on, one to validate)")
    return [_parse(entry, source, root) for source, entry in entries]


def tokenize(records: Sequence[Record], tokenizer, *, max_context_len: int, max_answer_len: int,
             min_context_len: int, contexts=None) -> list[Example]:
    """Records -> token ids. Contexts keep their last max_context_len tokens (image contexts stay
    whole: the image cannot be cut); answers end with EOS. `contexts` (training.vision.ImageContexts)
    renders VLM prompts in the model's own format, image placeholders expanded."""
    examples = []
    for record in records:
        image_len = 0
        if record.answer is None:
            ids = list(tokenizer(record.question)["input_ids"])
            half = len(ids) // 2
            prompt, answer = ids[:half], ids[half:]
        else:
            if contexts is None:
                prompt = encode_chat(tokenizer, [{"role": "user", "content": record.question}])
            else:
                prompt, image_len = contexts.prompt(record.question, record.image, record.source)
            # a space separates the answer from a prompt that does not already end in one ("Assistant:"
            # vs a template's "<|assistant|>\n"), so the answer tokenizes as the model would write it
            space = "" if tokenizer.decode(prompt[-1:]).endswith((" ", "\n")) else " "
            answer = list(tokenizer(space + record.answer, add_special_tokens=False)["input_ids"])
            answer.append(tokenizer.eos_token_id)
        prompt, answer = (prompt if image_len else prompt[-max_context_len:]), answer[:max_answer_len]
        # the last prompt token is fed to both models, so the compressed context is one shorter
        if len(prompt) - 1 < min_context_len or not answer:
            raise _bad(record.source, f"too short to train on: {len(prompt) - 1} context tokens (need "
                       f">= {min_context_len} = compression factor x min_seq_len) and {len(answer)} answer tokens")
        examples.append(Example(tuple(prompt), tuple(answer), record.image, image_len))
    return examples


def split_train_val(examples: Sequence, val_ratio: float, seed: int) -> tuple[list, list]:
    """Deterministic shuffle by seed, then the last val_ratio (at least one) is validation."""
    if len(examples) < 2:
        raise KVJaxError(f"need at least 2 examples (train + validation), got {len(examples)}")
    order = np.random.default_rng(seed).permutation(len(examples))
    num_val = min(max(1, round(len(examples) * val_ratio)), len(examples) - 1)
    shuffled = [examples[i] for i in order]
    return shuffled[:-num_val], shuffled[-num_val:]


def epoch_order(num_examples: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    """The training batches of `epoch` (index arrays, full batches only): a pure function of its
    arguments, so a resumed run sees exactly the batches it would have seen."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return [order[i:i + batch_size] for i in range(0, num_examples - batch_size + 1, batch_size)]


def collate(examples: Sequence[Example], batch_size: int, pad_id: int, *, min_bucket: int = 32) -> Batch:
    """Right-pad to power-of-two buckets (few compiled shapes); missing rows are zero-length padding."""
    contexts = [ex.prompt[:-1] for ex in examples]
    conts = [ex.prompt[-1:] + ex.answer for ex in examples]
    context_len = bucket(max(map(len, contexts)), smallest=min_bucket)
    cont_len = bucket(max(map(len, conts)), smallest=max(8, min_bucket // 4))
    context = np.full((batch_size, context_len), pad_id, np.int32)
    cont = np.full((batch_size, cont_len), pad_id, np.int32)
    for row, (c, n) in enumerate(zip(contexts, conts)):
        context[row, :len(c)] = c
        cont[row, :len(n)] = n
    lengths = lambda rows: np.array([len(r) for r in rows] + [0] * (batch_size - len(rows)), np.int32)  # noqa: E731
    image_len = np.array([ex.image_len for ex in examples] + [0] * (batch_size - len(examples)), np.int32)
    return Batch(context=context, context_len=lengths(contexts), image_len=image_len,
                 cont=cont, cont_len=lengths(conts))


def eval_chunks(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    """Every example once, in order, batch_size at a time (the last chunk may be short)."""
    for i in range(0, len(examples), batch_size):
        yield list(examples[i:i + batch_size])
