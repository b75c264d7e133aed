"""SigLIP vision tower with MiniCPM-V's variable-resolution ("NaViT") patch positions.

An image of (h, w) patches arrives as a one-row strip of its patches, [C, p, p * h * w]
(MiniCPM-V's `reshape_by_patch`), right-padded to the longest image of the batch. Each patch gets
a position id from the native grid of `grid_size`² learned positions by bucketing its fractional
row and column bit for bit as the remote code's float32 torch CPU arange does; the ids depend
only on the static patch counts, so they are built on the host (`navit_position_ids`). At the
native size (h = w = grid_size) the ids are 0..grid²-1, i.e. transformers' SiglipVisionModel.
Output = post_layernorm(last hidden state); there is no pooling head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.models.vit import Encoder, LayerNorm, PatchEmbedding, VisionConfig


TORCH_FLOAT32_LANES = 8  # torch 2.13's CPU arange float vector width, under DEFAULT, AVX2 and AVX512 alike


def torch_arange_f32(start: float, stop: float, step: float) -> np.ndarray:
    """torch.arange(start, stop, step) as float32 on CPU, bit for bit (checked against torch up to
    1000 elements). torch works in double but writes pairs of 8-lane vectors, lane k of a vector
    starting at index b being f32(f32(start + b * step) + k * step); the elements after the last
    full pair are f32(start + i * step). The float32 rounding of b's value moves some buckets."""
    count = int(np.ceil((stop - start) / step))
    index = np.arange(count)
    lane = index % TORCH_FLOAT32_LANES
    vector_base = (start + (index - lane) * step).astype(np.float32).astype(np.float64)
    is_vector = index < count - count % (2 * TORCH_FLOAT32_LANES)
    return np.where(is_vector, vector_base + lane * step, start + index * step).astype(np.float32)


def _buckets(num_patches: int, boundaries: np.ndarray) -> np.ndarray:
    """The remote code's bucketize(arange(0, 1 - 1e-6, 1 / n), boundaries, right=True); n comes from
    int32 tgt_sizes, so its step 1 / n is a float32 division."""
    step = float(np.float32(1) / np.float32(num_patches))
    return np.searchsorted(boundaries, torch_arange_f32(0.0, 1 - 1e-6, step), side="right")


def navit_position_ids(num_rows: int, num_cols: int, grid_size: int) -> np.ndarray:
    """Position ids int32 [num_rows * num_cols], row-major, for an image of that many patches."""
    boundaries = torch_arange_f32(1 / grid_size, 1.0, 1 / grid_size)  # a Python-float step here
    rows, cols = _buckets(num_rows, boundaries), _buckets(num_cols, boundaries)
    return (rows[:, None] * grid_size + cols[None, :]).reshape(-1).astype(np.int32)


def patch_strip(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """An image [C, H, W] -> its patches as one row [C, p, p * (H/p)(W/p)], row-major (reshape_by_patch)."""
    c, h, w = pixels.shape
    p = patch_size
    patches = pixels.reshape(c, h // p, p, w // p, p).transpose(0, 2, 1, 3, 4)  # [C, p, gh, gw, p]
    return np.ascontiguousarray(patches.reshape(c, p, -1))


def batch_strips(images: list[np.ndarray], tgt_sizes: list[tuple[int, int]], cfg: VisionConfig):
    """Per-image strips + (rows, cols) -> pixels [N, C, p, p * Lmax], position_ids and patch_mask [N, Lmax]."""
    p = cfg.patch_size
    max_len = max(h * w for h, w in tgt_sizes)
    pixels = np.zeros((len(images), cfg.num_channels, p, p * max_len), np.float32)
    position_ids = np.zeros((len(images), max_len), np.int32)
    patch_mask = np.zeros((len(images), max_len), bool)
    for i, (strip, (h, w)) in enumerate(zip(images, tgt_sizes)):
        pixels[i, :, :, :strip.shape[-1]] = strip
        position_ids[i, :h * w] = navit_position_ids(h, w, cfg.grid_size)
        patch_mask[i, :h * w] = True
    return pixels, position_ids, patch_mask


class SiglipEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.patch_embedding = PatchEmbedding(cfg, bias=True, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.grid_size ** 2, cfg.hidden_size, dtype=dtype,
                                            param_dtype=dtype, rngs=rngs)

    def __call__(self, pixels, position_ids):
        return self.patch_embedding(pixels) + self.position_embedding(position_ids)


class SiglipVisionTower(nnx.Module):
    """HF's SiglipVisionModel without the pooling head (MiniCPM-V's `vpm`)."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, cfg.num_layers, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, pixels: jax.Array, position_ids: jax.Array, patch_mask: jax.Array) -> jax.Array:
        """pixels [N, C, p, p*L] strips; position_ids int32 [N, L]; patch_mask bool [N, L] -> [N, L, D]."""
        x = self.embeddings(pixels, position_ids)
        return self.post_layernorm(self.encoder(x, patch_mask)[-1])
