"""MiniCPM-V-2.6 image slicing, placeholder ids, `image_bound` spans and chat prompts (numpy/PIL).

Slicing follows MiniCPMVImageProcessor (see shared/reference/minicpm-v-2.6.md §5): an image of
area above scale_resolution² is cut into a grid of `cols x rows` slices (`sliced_grid`), and the
model sees [source image, slice(0,0), slice(0,1), ...]. Each slice becomes `query_num` LM tokens.
In the prompt one image reads
    <image_id>i</image_id><image>{unk x Q}</image>  then per grid row  (<slice>{unk x Q}</slice>) x cols,
rows joined by "\\n"; an image_bound span is the Q ids between a start and its end marker.
The image is placed in the first user message as `(<image>./</image>)\\n{text}`, as `chat()` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from kvjax.errors import KVJaxError
from kvjax.vision.images import open_image
from kvjax.vision.prompt import Prompter
from kvjax.models.siglip import batch_strips, patch_strip

IMAGE_MARKER = "(<image>./</image>)"
MARKER_TOKENS = ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>")
# preprocessor_config.json: norm_mean = norm_std = 0.5 on [0, 1] pixels.
_MEAN, _STD = 0.5, 0.5
# ChatML, for tokenizers without a chat template of their own (MiniCPM-V's is Qwen2's).
_CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"


def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of patch_size (Python's round: halves to even), at least one patch."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) -> patch-aligned size of about scale_resolution² area, same aspect ratio.
    Without allow_upscale an image smaller than that area keeps its size."""
    width, height = size
    if width * height > scale_resolution ** 2 or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def sliced_grid(size: tuple[int, int], scale_resolution: int, max_slice_nums: int) -> tuple[int, int] | None:
    """(width, height) -> (cols, rows) of the slice grid, or None when the image is not sliced.

    Slice count ≈ area / scale_resolution² (at most max_slice_nums); among the factorizations of
    that count ±1 the grid whose log aspect ratio is nearest the image's wins (first on ties).
    """
    width, height = size
    multiple = min(math.ceil(width * height / scale_resolution ** 2), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    grids = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    target = math.log(width / height)
    return min(grids, key=lambda grid: abs(target - math.log(grid[0] / grid[1])))


def slice_image(image, scale_resolution: int = 448, patch_size: int = 14, max_slice_nums: int = 9):
    """RGB PIL image -> ([source, slices row-major] as PIL images, grid (cols, rows) or None)."""
    from PIL import Image

    size = image.size
    grid = sliced_grid(size, scale_resolution, max_slice_nums)
    bicubic = Image.Resampling.BICUBIC
    if grid is None:
        return [image.resize(find_best_resize(size, scale_resolution, patch_size, True), bicubic)], None
    source = image.resize(find_best_resize(size, scale_resolution, patch_size), bicubic)
    cols, rows = grid
    tile = find_best_resize((ensure_divide(size[0], cols) / cols, ensure_divide(size[1], rows) / rows),
                            scale_resolution, patch_size, True)
    refined = image.resize((tile[0] * cols, tile[1] * rows), bicubic)
    tiles = [refined.crop((c * tile[0], r * tile[1], (c + 1) * tile[0], (r + 1) * tile[1]))
             for r in range(rows) for c in range(cols)]
    return [source, *tiles], grid


@dataclasses.dataclass(frozen=True)
class MiniCPMVImage:
    """One preprocessed image: a patch strip per slice and its patch grid."""

    strips: tuple  # float32 [3, p, p * rows * cols] per slice, source first
    tgt_sizes: tuple  # (patch rows, patch cols) per slice
    grid: tuple[int, int] | None  # (cols, rows) of the slice grid
    inputs: tuple  # the tower's arrays for this image alone (see `vision_inputs`)


def vision_inputs(images: Sequence[MiniCPMVImage], cfg):
    """Images -> (pixels [N, 3, p, p*Lmax], position_ids [N, Lmax], patch_mask [N, Lmax],
    tgt_sizes int32 [N, 2]) over all their slices, in order: MiniCPMV.image_features' input."""
    strips = [s for image in images for s in image.strips]
    sizes = [t for image in images for t in image.tgt_sizes]
    pixels, position_ids, patch_mask = batch_strips(strips, sizes, cfg.vision)
    return pixels, position_ids, patch_mask, np.asarray(sizes, np.int32).reshape(-1, 2)


def preprocess(image, cfg) -> MiniCPMVImage:
    """A path or PIL image -> MiniCPMVImage (slices resized, normalized to [-1, 1], patch strips)."""
    rgb = open_image(image)
    max_slices = cfg.max_slice_nums if cfg.slice_mode else 1
    slices, grid = slice_image(rgb, cfg.scale_resolution, cfg.patch_size, max_slices)
    p = cfg.patch_size
    strips, sizes = [], []
    for piece in slices:
        pixels = (np.asarray(piece, np.float32) / 255.0 - _MEAN) / _STD  # [H, W, 3]
        strips.append(patch_strip(pixels.transpose(2, 0, 1), p))
        sizes.append((piece.size[1] // p, piece.size[0] // p))
    partial = MiniCPMVImage(tuple(strips), tuple(sizes), grid, ())
    return dataclasses.replace(partial, inputs=vision_inputs([partial], cfg))


def _marker_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for token in MARKER_TOKENS:
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or (found == tokenizer.unk_token_id and token != "<unk>"):
            raise KVJaxError(f"the tokenizer has no {token!r} token; a MiniCPM-V tokenizer defines "
                             f"{', '.join(MARKER_TOKENS)}")
        ids[token] = found
    return ids


def placeholder_ids(tokenizer, cfg, image: MiniCPMVImage, index: int = 0) -> list[int]:
    """The ids that replace the index-th image's `(<image>./</image>)` marker."""
    ids = _marker_ids(tokenizer)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    unk = [ids["<unk>"]] * cfg.query_num
    out = [ids["<image_id>"], *encode(str(index)), ids["</image_id>"]] if cfg.use_image_id else []
    out += [ids["<image>"], *unk, ids["</image>"]]
    if cfg.slice_mode and image.grid is not None:
        cols, rows = image.grid
        row = [ids["<slice>"], *unk, ids["</slice>"]] * cols
        newline = encode("\n")
        for r in range(rows):
            out += (newline if r else []) + row
    return out


def image_bounds(ids: Sequence[int], tokenizer) -> np.ndarray:
    """int32 [K, 2] of [start, end) spans between `<image>`/`<slice>` and their end markers."""
    marks = _marker_ids(tokenizer)
    ids = np.asarray(ids)
    starts = np.flatnonzero((ids == marks["<image>"]) | (ids == marks["<slice>"])) + 1
    ends = np.flatnonzero((ids == marks["</image>"]) | (ids == marks["</slice>"]))
    if len(starts) != len(ends):
        raise KVJaxError(f"the prompt has {len(starts)} image/slice start markers but {len(ends)} end markers")
    return np.stack([starts, ends], axis=1).astype(np.int32).reshape(-1, 2)


def feature_mask(ids: Sequence[int], tokenizer) -> np.ndarray:
    """bool [T]: True inside the image_bound spans (where the resampler's outputs go)."""
    mask = np.zeros(len(ids), bool)
    for start, end in image_bounds(ids, tokenizer):
        mask[start:end] = True
    return mask


def render_chat(tokenizer, messages: Sequence[dict]) -> str:
    """Messages -> prompt text with the tokenizer's chat template (ChatML when it has none)."""
    if not messages or messages[-1]["role"] != "user":
        raise KVJaxError("a chat prompt must end with a user message")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    turns = "".join(_CHATML_TURN.format(role=m["role"], content=m["content"]) for m in messages)
    return turns + "<|im_start|>assistant\n"


def chat_ids(tokenizer, cfg, messages: Sequence[dict], image: MiniCPMVImage | None):
    """Conversation (+ one image for its first user turn) -> (ids, image_mask), image_mask True
    at the positions the resampler's outputs fill (the image_bound spans)."""
    messages = [dict(m) for m in messages]
    if image is not None:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_MARKER}\n{first_user['content']}"
    text = render_chat(tokenizer, messages)
    encode = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    if image is None:
        ids = encode(text)
    else:
        # Every placeholder id the marker expands to begins and ends at a special token, so
        # encoding the pieces apart equals encoding the expanded string (as the processor does).
        before, after = text.split(IMAGE_MARKER, 1)
        ids = encode(before) + placeholder_ids(tokenizer, cfg, image) + encode(after)
    mask = feature_mask(ids, tokenizer) if image is not None else np.zeros(len(ids), bool)
    if image is not None:
        if mask.sum() != len(image.strips) * cfg.query_num:
            raise KVJaxError("the conversation text itself holds image or slice marker tokens; remove "
                             "'<image>', '</image>', '<slice>' and '</slice>' from the messages")
    return ids, mask


class MiniCPMVPrompter(Prompter):
    """pixels: a MiniCPMVImage (slices as patch strips); ids from the tokenizer's chat template."""

    def pixels(self, image):
        return preprocess(image, self.cfg)

    def encode(self, messages, pixels=None) -> tuple[list[int], np.ndarray]:
        return chat_ids(self.tokenizer, self.cfg, messages, pixels)

    def image_mask(self, ids) -> np.ndarray:
        return feature_mask(ids, self.tokenizer)

    def vision_inputs(self, pixels: Sequence):
        return vision_inputs(pixels, self.cfg)
