"""Synthetic image question answering from a seeded generator: the scenes that show whether a
compressed image KV cache still holds what a question about the picture needs.

A scene is 2-8 shapes (circle, square, triangle, diamond; red, green, blue, yellow, purple, orange;
small or large) in distinct cells of a 4 x 4 grid on a plain background, drawn with PIL. Questions
(formats documented in the README), each answered with one word or one number:

  colour    "What colour is the <shape>?"              (that kind appears once)      -> "red"
  shape     "What shape is the <colour> one?"          (that colour appears once)    -> "circle"
  count     "How many <shape>s are there?"             (0-6)                         -> "3"
  tally     "How many <colour> shapes are there?"      (0-4)                         -> "2"
  exists    "Is there a <colour> <shape>?"                                           -> "yes" / "no"
  left      "Which is further left, the <colour> <shape> or the <colour> <shape>?"   -> "<shape>"
  above     "Which is higher, the <colour> <shape> or the <colour> <shape>?"         -> "<shape>"

(left / above ask about two shapes of different kinds in different columns / rows, so the answer
is one word.) A reply is right when its first word is the answer (case and punctuation ignored).
Training also asks "List the shapes.", answered with every shape in reading order (row by row,
left to right): "red circle, blue square, ..." (`listing`), which teaches what and where at once.
Splits use disjoint seed ranges: SPLIT_SEEDS[split] + i is the i-th scene of that split.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from kvjax.errors import KVJaxError

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
           "purple": (140, 60, 190), "orange": (245, 135, 30)}
BACKGROUNDS = ((250, 250, 250), (200, 200, 200), (40, 40, 40))
SIZES = {"small": 0.45, "large": 0.85}  # side of the shape's box, as a fraction of its grid cell
GRID = 4
KINDS = ("colour", "shape", "count", "tally", "exists", "left", "above")
LIST_QUESTION = "List the shapes."
SPLIT_SEEDS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int
    col: int
    dx: float  # jitter of the centre within the cell, fraction of a cell (-0.5 to 0.5)
    dy: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]

    def render(self, size: int = 112):
        """The scene as an RGB PIL image of size x size pixels."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (size, size), self.background)
        draw, cell = ImageDraw.Draw(image), size / GRID
        for s in self.shapes:
            cx, cy = (s.col + 0.5) * cell, (s.row + 0.5) * cell
            half = SIZES[s.size] * cell / 2
            cx += s.dx * (cell / 2 - half)  # jitter keeps the shape inside its cell
            cy += s.dy * (cell / 2 - half)
            box = (cx - half, cy - half, cx + half, cy + half)
            fill = COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse(box, fill=fill)
            elif s.kind == "square":
                draw.rectangle(box, fill=fill)
            elif s.kind == "triangle":
                draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
            else:
                draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
        return image


@dataclasses.dataclass(frozen=True)
class Question:
    kind: str  # one of KINDS
    text: str
    answer: str

    def is_answered_by(self, reply: str) -> bool:
        """Whether the reply's first word is the answer (case and punctuation ignored)."""
        words = re.findall(r"[a-z0-9]+", reply.lower())
        return bool(words) and words[0] == self.answer


def scene(seed: int) -> Scene:
    """The scene of a seed: 2-8 shapes in distinct grid cells, every (colour, kind) pair distinct."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 9))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    pairs = rng.choice(len(SHAPES) * len(COLOURS), size=count, replace=False)
    colours = list(COLOURS)
    shapes = tuple(Shape(SHAPES[p % len(SHAPES)], colours[p // len(SHAPES)], ("small", "large")[int(rng.integers(2))],
                         int(c // GRID), int(c % GRID), float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
                   for c, p in zip(cells, pairs))
    return Scene(shapes, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def _plural(kind: str) -> str:
    return kind + "s"


def questions(s: Scene, seed: int) -> list[Question]:
    """One question of each kind the scene allows, in KINDS order (seeded choices within a kind)."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the scene's own
    pick = lambda items: items[int(rng.integers(len(items)))]  # noqa: E731
    out = []
    kinds = [x.kind for x in s.shapes]
    colours = [x.colour for x in s.shapes]
    unique_kind = [x for x in s.shapes if kinds.count(x.kind) == 1]
    if unique_kind:
        x = pick(unique_kind)
        out.append(Question("colour", f"What colour is the {x.kind}?", x.colour))
    unique_colour = [x for x in s.shapes if colours.count(x.colour) == 1]
    if unique_colour:
        x = pick(unique_colour)
        out.append(Question("shape", f"What shape is the {x.colour} one?", x.kind))
    kind = pick(SHAPES)
    out.append(Question("count", f"How many {_plural(kind)} are there?", str(kinds.count(kind))))
    colour = pick(list(COLOURS))
    out.append(Question("tally", f"How many {colour} shapes are there?", str(colours.count(colour))))
    if rng.random() < 0.5:
        x = pick(s.shapes)
        out.append(Question("exists", f"Is there a {x.colour} {x.kind}?", "yes"))
    else:
        present = {(x.colour, x.kind) for x in s.shapes}
        absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
        c, k = pick(absent)
        out.append(Question("exists", f"Is there a {c} {k}?", "no"))
    for relation, coordinate, text in (("left", "col", "Which is further left"), ("above", "row", "Which is higher")):
        pairs = [(a, b) for a in s.shapes for b in s.shapes
                 if a.kind != b.kind and getattr(a, coordinate) < getattr(b, coordinate)]
        if pairs:
            a, b = pick(pairs)
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            out.append(Question(relation, f"{text}, the {first.name} or the {second.name}?", a.kind))
    return out


def listing(s: Scene) -> str:
    """Every shape in reading order (row by row, left to right): "red circle, blue square"."""
    return ", ".join(x.name for x in sorted(s.shapes, key=lambda x: (x.row, x.col)))


def cell_classes() -> int:
    """How many classes `patch_cells` uses: none, then every (colour, kind) pair."""
    return 1 + len(COLOURS) * len(SHAPES)


def patch_cells(s: Scene, side: int) -> np.ndarray:
    """int32 [side * side]: for each patch of a side x side patch grid (row-major), what its grid cell
    holds: 0 for nothing, else 1 + colour index * len(SHAPES) + kind index (a shape stays inside its cell)."""
    grid = np.zeros((GRID, GRID), np.int32)
    for x in s.shapes:
        grid[x.row, x.col] = 1 + list(COLOURS).index(x.colour) * len(SHAPES) + SHAPES.index(x.kind)
    cell = np.arange(side) * GRID // side
    return grid[cell[:, None], cell[None, :]].reshape(-1)


def task(split: str, index: int) -> tuple[Scene, list[Question]]:
    """The index-th scene of a split and its questions."""
    if split not in SPLIT_SEEDS:
        raise KVJaxError(f"unknown scene split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if not 0 <= index < 10_000_000:
        raise KVJaxError(f"scene index must be in [0, 10000000), got {index}")
    seed = SPLIT_SEEDS[split] + index
    s = scene(seed)
    return s, questions(s, seed)
