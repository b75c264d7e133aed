"""The built-in demo datasets, written once under $KVJAX_HOME/train-demo so training runs offline.

Text: each record asks to continue a window of sentences of `kvjax.demo.DEMO_TEXT` and answers
with the next sentence, so contexts are long enough to compress. Images: 12 PIL-drawn shapes
(3 shapes x 4 colours) in LLaVA-style JSON, each asked about and described in one sentence.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from kvjax.testing.text import DEMO_TEXT, kvjax_home

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
    return kvjax_home() / "train-demo"


def ensure_demo_dataset() -> pathlib.Path:
    """Write (once) and return the demo text JSONL."""
    path = demo_dataset_dir() / "text.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".text.jsonl.{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in demo_records()))
        os.replace(tmp, path)  # atomic: parallel test workers never read half a file
    return path


SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
QUESTIONS = ("What is in the image?", "Describe the picture.", "Which shape and colour do you see?")


def _draw(shape: str, color, background, size: int = 64):
    from PIL import Image, ImageDraw  # noqa: PLC0415

    image = Image.new("RGB", (size, size), background)
    draw, box = ImageDraw.Draw(image), (size // 5, size // 5, size - size // 5, size - size // 5)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    return image


def ensure_demo_image_dataset() -> pathlib.Path:
    """Write (once) and return the demo LLaVA-style JSON; its images (PIL-drawn shapes) lie beside it."""
    path = demo_dataset_dir() / "images" / "images.json"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    records, backgrounds = [], [(250, 250, 250), (30, 30, 30)]
    for i, (shape, (name, color)) in enumerate((s, c) for s in SHAPES for c in COLORS.items()):
        background = backgrounds[i % 2]
        file = f"{name}_{shape}.png"
        tmp = path.parent / f".{file}.{os.getpid()}"
        _draw(shape, color, background).save(tmp, format="PNG")
        os.replace(tmp, path.parent / file)
        shade = "light" if background[0] > 128 else "dark"
        records.append({"image": file, "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
            {"from": "gpt", "value": f"A {name} {shape} on a {shade} background."}]})
    tmp = path.with_name(f".images.json.{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)  # written last and atomically: its presence means the images are there
    return path
