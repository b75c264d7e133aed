"""MiniCPM-V slicing: the grid table and the resize rule (shared/reference/minicpm-v-2.6.md §5), the
placeholder layout and image_bound spans (§6), and the pixel strips fed to the tower."""

import numpy as np
import pytest
from PIL import Image

from kvjax.config import ModelConfig
from kvjax.vision.minicpmv import (find_best_resize, image_bounds, placeholder_ids, preprocess, slice_image,
                                   sliced_grid)
from kvjax.models.minicpmv import MiniCPMVConfig
from kvjax.models.vit import VisionConfig

# (width, height), max_slice_nums -> (cols, rows) or None, worked out by hand from the rule:
# n = min(ceil(W*H / 448²), max); candidates n-1, n, n+1 (not 1, not > max); nearest log aspect.
GRID_TABLE = [
    ((500, 375), 9, None),  # area ratio 0.93: never sliced
    ((448, 448), 9, None),  # exactly one slice's area
    ((640, 480), 9, (2, 1)),  # ratio 1.53 -> n = 2 -> {2, 3}
    ((600, 400), 9, (2, 1)),
    ((1344, 448), 9, (3, 1)),  # ratio 3 -> {2, 3, 4}; 3x1 has the image's aspect exactly
    ((448, 1344), 9, (1, 3)),
    ((1000, 1000), 9, (2, 2)),  # ratio 4.98 -> n = 5 -> {4, 5, 6}
    ((1920, 1080), 9, (4, 2)),  # ratio 10.3 -> capped at 9 -> {8, 9}
    ((4000, 500), 9, (8, 1)),
    ((1920, 1080), 1, None),  # max_slice_nums 1 (FastCache's harness): never sliced
    ((1920, 1080), 4, (3, 1)),  # capped at 4 -> {3, 4}: 3x1 is nearest 16:9 in log terms
]


@pytest.mark.parametrize("size, max_slices, grid", GRID_TABLE)
def test_slice_grid_table(size, max_slices, grid):
    assert sliced_grid(size, 448, max_slices) == grid


def test_resize_rule_and_slice_sizes():
    # 500x375 (a GQA image): upscaled to ~448² area, patch aligned -> 37 x 28 patches.
    assert find_best_resize((500, 375), 448, 14, allow_upscale=True) == (518, 392)
    assert find_best_resize((300, 200), 448, 14) == (294, 196)  # small, no upscale: only aligned
    pieces, grid = slice_image(Image.new("RGB", (640, 480)), 448, 14, 9)
    # source: downscaled to ~448² area; each of the 2x1 tiles: a 320x480 half upscaled to ~448².
    assert grid == (2, 1) and [p.size for p in pieces] == [(518, 392), (364, 546), (364, 546)]
    pieces, grid = slice_image(Image.new("RGB", (500, 375)), 448, 14, 9)
    assert grid is None and [p.size for p in pieces] == [(518, 392)]


class FakeTokenizer:
    """Special tokens get ids 1000+; any other text encodes one id per character."""

    def __init__(self):
        self.vocab = {t: 1000 + i for i, t in enumerate(
            ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>"))}
        self.unk_token_id = self.vocab["<unk>"]

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) for ch in text]}


def tiny_cfg(**fields):
    text = ModelConfig.tiny("qwen2", hidden_size=128, head_dim=32)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, image_size=70,
                          patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    return MiniCPMVConfig(text=text, vision=vision, **{"query_num": 4, "scale_resolution": 56, **fields})


def test_placeholder_layout_and_image_bounds():
    tok, cfg = FakeTokenizer(), tiny_cfg()
    image = preprocess(Image.new("RGB", (112, 56), (200, 30, 30)), cfg)  # area ratio 2 -> 2 cols x 1 row
    assert image.grid == (2, 1) and len(image.strips) == 3
    ids = placeholder_ids(tok, cfg, image, index=0)
    v, unk = tok.vocab, [tok.vocab["<unk>"]] * 4
    expected = ([v["<image_id>"], ord("0"), v["</image_id>"], v["<image>"], *unk, v["</image>"]]
                + [v["<slice>"], *unk, v["</slice>"]] * 2)
    assert ids == expected
    bounds = image_bounds([7, 7, *ids, 9], tok)
    np.testing.assert_array_equal(bounds, [[6, 10], [12, 16], [18, 22]])  # exactly the <unk> runs
    # Two grid rows are joined by a newline; no image id without use_image_id.
    tall = preprocess(Image.new("RGB", (56, 112)), tiny_cfg(use_image_id=False))
    ids = placeholder_ids(tok, tiny_cfg(use_image_id=False), tall)
    assert tall.grid == (1, 2) and ids[0] == v["<image>"] and ids.count(ord("\n")) == 1
    assert placeholder_ids(tok, tiny_cfg(slice_mode=False), image) == expected[:9]  # source only


def test_preprocess_pixels_are_normalized_patch_strips():
    cfg = tiny_cfg()
    image = preprocess(Image.new("RGB", (112, 56), (255, 0, 128)), cfg)
    pixels, position_ids, patch_mask, tgt_sizes = image.inputs
    np.testing.assert_array_equal(tgt_sizes, [(3, 6), (4, 4), (4, 4)])  # source 84x42, tiles 56x56
    assert pixels.shape == (3, 3, 14, 14 * 18) and patch_mask.sum(1).tolist() == [18, 16, 16]
    strip = image.strips[1]
    np.testing.assert_allclose(strip[0], 1.0, atol=1e-6)  # R 255 -> +1
    np.testing.assert_allclose(strip[1], -1.0, atol=1e-6)  # G 0 -> -1
    assert np.all(pixels[1, :, :, 14 * 16:] == 0) and position_ids[1, 16] == 0  # padding
    slice_off = preprocess(Image.new("RGB", (112, 56)), tiny_cfg(slice_mode=False))
    assert slice_off.grid is None and len(slice_off.strips) == 1
