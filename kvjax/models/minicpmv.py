"""MiniCPM-V-2.6 (openbmb's remote-code `MiniCPMV`): SigLIP tower -> perceiver resampler -> Qwen2 LM.

Each image slice (the source image and every grid tile, see `kvjax.minicpmv_prompt`) goes through
the NaViT SigLIP tower (`vpm`), and the resampler turns its patches into `query_num` LM-space
tokens: learned queries attend over `ln_kv(kv_proj(patches))`, with a fixed 2-D sin-cos position
embedding added to the keys only. The prompt holds `query_num` placeholder ids per slice inside
`<image>`/`<slice>` bounds; `embed_multimodal` overwrites those rows, slices in order.
Attribute names are the checkpoint's (`llm.*`, `vpm.*`, `resampler.*`), so loading is a table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.errors import KVJaxError
from kvjax.models.llama import CausalLM
from kvjax.models.llava import scatter_features
from kvjax.models.siglip import SiglipVisionTower
from kvjax.models.vit import LayerNorm, VisionConfig

RESAMPLER_HEAD_DIM = 128  # the remote code builds Resampler(num_heads=embed_dim // 128)
PROCESSOR_SLICING_KEYS = ("max_slice_nums", "patch_size", "scale_resolution")  # top-level preprocessor_config.json keys


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MiniCPMVConfig:
    text: ModelConfig
    vision: VisionConfig  # num_layers already lowered by one under drop_vision_last_layer
    query_num: int = 64  # resampler outputs (LM tokens) per slice
    scale_resolution: int = 448  # slicing: target area scale_resolution², see minicpmv_prompt
    patch_size: int = 14
    max_slice_nums: int = 9
    slice_mode: bool = True
    use_image_id: bool = True

    def __post_init__(self):
        for name in ("query_num", "scale_resolution", "patch_size", "max_slice_nums"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise KVJaxError(f"MiniCPM-V config field {name} must be a positive integer, got {value!r}")
        if self.text.hidden_size % RESAMPLER_HEAD_DIM:
            raise KVJaxError(f"MiniCPM-V hidden_size ({self.text.hidden_size}) must be a multiple of "
                             f"{RESAMPLER_HEAD_DIM}: the resampler uses {RESAMPLER_HEAD_DIM}-wide heads")
        if self.patch_size != self.vision.patch_size:
            raise KVJaxError(f"patch_size {self.patch_size} differs from vision_config.patch_size "
                             f"{self.vision.patch_size}; the slicer and the tower must agree")

    @property
    def resampler_heads(self) -> int:
        return self.text.hidden_size // RESAMPLER_HEAD_DIM

    @classmethod
    def from_config_json(cls, config: dict, text: ModelConfig, preprocessor: dict | None = None) -> MiniCPMVConfig:
        """From config.json read as data (no remote code); `text` is the Qwen2 LM's config and
        `preprocessor` the checkpoint's preprocessor_config.json, if it has one."""
        if "vision_config" not in config:
            raise KVJaxError("MiniCPM-V config.json has no vision_config; is this a MiniCPM-V-2.6 checkpoint?")
        # SiglipVisionConfig's defaults, which the hub's vision_config leaves out.
        vision = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, **config["vision_config"]}
        if config.get("drop_vision_last_layer", False):
            vision["num_hidden_layers"] = vision["num_hidden_layers"] - 1
        # The original image processor slices by preprocessor_config.json; slice_config is the fallback.
        processor = {k: v for k, v in (preprocessor or {}).items() if k in PROCESSOR_SLICING_KEYS}
        slicing = {**(config.get("slice_config") or {}), **processor}
        return cls(text=text, vision=VisionConfig.from_hf_config(vision),
                   query_num=int(config.get("query_num", 64)),
                   scale_resolution=int(slicing.get("scale_resolution", 448)),
                   patch_size=int(slicing.get("patch_size", config.get("patch_size", 14))),
                   max_slice_nums=int(slicing.get("max_slice_nums", 9)),
                   slice_mode=bool(config.get("slice_mode", True)),
                   use_image_id=bool(config.get("use_image_id", True)))


def sincos_2d(rows: jax.Array, cols: jax.Array, dim: int) -> jax.Array:
    """Fixed 2-D position embedding of grid cells (rows, cols int [...]) -> float32 [..., dim].

    First half encodes the column, second half the row; each half is sin(p·ω) ++ cos(p·ω) with
    ω_k = 10000^(-k / (dim/4)), k < dim/4 (MAE's table, which the remote code indexes [row, col]).
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)

    def encode(p):
        angles = p.astype(jnp.float32)[..., None] * omega
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

    return jnp.concatenate([encode(cols), encode(rows)], axis=-1)


class CrossAttention(nnx.Module):
    """torch.nn.MultiheadAttention's parameters (packed in_proj [3D, D] rows = [Wq; Wk; Wv])."""

    def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.in_proj_weight = nnx.Param(init(rngs.params(), (3 * dim, dim), dtype))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * dim,), dtype))
        self.out_proj = nnx.Linear(dim, dim, use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.num_heads = num_heads

    def __call__(self, q, k, v, key_mask):
        """q [Q, D] (shared by the batch); k, v [N, L, D]; key_mask bool [N, L] -> [N, Q, D]."""
        dim = q.shape[-1]
        w, b = self.in_proj_weight[...], self.in_proj_bias[...]
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = (q @ w[:dim].T + b[:dim]).reshape(-1, heads, head_dim)
        k = (k @ w[dim:2 * dim].T + b[dim:2 * dim]).reshape(*k.shape[:2], heads, head_dim)
        v = (v @ w[2 * dim:].T + b[2 * dim:]).reshape(*v.shape[:2], heads, head_dim)
        scores = jnp.einsum("qhd,nkhd->nhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(k.shape[0], -1, dim)
        return self.out_proj(out)


class Resampler(nnx.Module):
    """HF's `resampler.*`: query [Q, D], kv_proj (no bias; absent when kv_dim == D), attn,
    ln_q / ln_kv / ln_post (eps 1e-6) and proj [D, D] applied as `x @ proj`."""

    def __init__(self, num_queries: int, dim: int, num_heads: int, kv_dim: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.query = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_queries, dim), dtype))
        if kv_dim != dim:
            self.kv_proj = nnx.Linear(kv_dim, dim, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.attn = CrossAttention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.ln_q = LayerNorm(dim, eps=1e-6, dtype=dtype)
        self.ln_kv = LayerNorm(dim, eps=1e-6, dtype=dtype)
        self.ln_post = LayerNorm(dim, eps=1e-6, dtype=dtype)
        self.proj = nnx.Param(dim ** -0.5 * jax.random.normal(rngs.params(), (dim, dim), dtype))

    def __call__(self, x: jax.Array, tgt_sizes: jax.Array) -> jax.Array:
        """x [N, L, kv_dim] patch features (row-major, right-padded); tgt_sizes int32 [N, 2] =
        (patch rows, patch cols) per slice -> [N, Q, D]."""
        x = self.kv_proj(x) if hasattr(self, "kv_proj") else x
        x = self.ln_kv(x)
        index = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
        cols = tgt_sizes[:, 1:2]
        # Padding rows read a cell past the slice; they are masked out of the keys anyway.
        pos = sincos_2d(index // cols, index % cols, x.shape[-1]).astype(x.dtype)
        key_mask = index < tgt_sizes[:, 0:1] * cols
        out = self.attn(self.ln_q(self.query[...]), x + pos, x, key_mask)
        return self.ln_post(out) @ self.proj[...]


class MiniCPMV(nnx.Module):
    """Run the LM through `language_model` with the kvjax steps, prompts through `embed_multimodal`."""

    def __init__(self, cfg: MiniCPMVConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.llm = CausalLM(cfg.text, dtype=dtype, rngs=rngs)
        self.vpm = SiglipVisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.resampler = Resampler(cfg.query_num, cfg.text.hidden_size, cfg.resampler_heads,
                                   cfg.vision.hidden_size, dtype=dtype, rngs=rngs)

    @property
    def language_model(self) -> CausalLM:
        return self.llm

    @property
    def dtype(self):
        return self.llm.dtype

    def image_features(self, vision_inputs) -> jax.Array:
        """(pixels [N, C, p, p*L], position_ids [N, L], patch_mask [N, L], tgt_sizes [N, 2]) for N
        slices (`kvjax.minicpmv_prompt.vision_inputs`) -> LM-space features [N, query_num, H]."""
        pixels, position_ids, patch_mask, tgt_sizes = vision_inputs
        return self.resampler(self.vpm(pixels, position_ids, patch_mask), tgt_sizes)

    def embed_multimodal(self, tokens, image_mask, vision_inputs) -> jax.Array:
        """tokens int32 [B, T]; image_mask bool [B, T] (True at the query_num positions inside each
        image_bound span, slices in prompt order); vision_inputs as above or None -> [B, T, H]."""
        embeds = self.llm.embed(tokens)
        if vision_inputs is None:
            return embeds
        features = self.image_features(vision_inputs)
        return scatter_features(embeds, features.reshape(-1, features.shape[-1]), image_mask)


def minicpmv_rename(cfg: MiniCPMVConfig):
    """Checkpoint name -> module name (None = not loaded: buffers, dropped layers, tied head)."""
    num_layers = cfg.vision.num_layers

    def rename(name: str) -> str | None:
        if name.endswith("position_ids") or name == "resampler.pos_embed" or name.startswith("vpm.head."):
            return None
        if name.startswith("vpm.encoder.layers."):
            if int(name.split(".")[3]) >= num_layers:
                return None  # drop_vision_last_layer
        if cfg.text.tie_word_embeddings and name == "llm.lm_head.weight":
            return None
        return name

    return rename
