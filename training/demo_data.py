"""The built-in demo dataset: chat turns cut from the demo tokenizer's own text, written once.

Each record asks to continue a window of sentences of `kvjax.demo.DEMO_TEXT` and answers with the
next sentence, so contexts are long enough to compress and the demo runs offline.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from kvjax.demo import DEMO_TEXT

WINDOW = 3  # sentences of context per record


def demo_records() -> list[dict]:
    sentences = [s.strip() for s in re.split(r"(?<=[.?!:])\s+", " ".join(DEMO_TEXT.split())) if s.strip()]
    records = []
    for start in range(len(sentences) - WINDOW):
        context = " ".join(sentences[start:start + WINDOW])
        records.append({"messages": [{"role": "user", "content": f"Continue the story: {context}"},
                                     {"role": "assistant", "content": sentences[start + WINDOW]}]})
    return records


def demo_dataset_dir() -> pathlib.Path:
    home = os.environ.get("KVJAX_HOME") or pathlib.Path.home() / ".cache" / "kvjax"
    return pathlib.Path(home).expanduser() / "train-demo"


def ensure_demo_dataset() -> pathlib.Path:
    """Write (once) and return the demo text JSONL."""
    path = demo_dataset_dir() / "text.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".text.jsonl.{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in demo_records()))
        os.replace(tmp, path)  # atomic: parallel test workers never read half a file
    return path
