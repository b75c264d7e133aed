"""CCM compressors (FastCache): per-layer MLPs that merge every cf cached tokens of a KV head into one.

`LinearDecoupleCompressor` (FastCache's LLaVA compressor) has K and V MLPs for the text span and
separate ones for the image span. `HybridCompressor` (FastCache's MiniCPM compressor) has text MLPs
only; what happens to the image span is explicit in its config's `image_mode`:
  "text_mlp"  the whole cache goes through the text MLPs (image_len is ignored) - how FastCache
              trained and ran its MiniCPM-V compressor;
  "keep"      the image prefix stays uncompressed, the text span is compressed.
`keep_last` (a runtime field, like min_seq_len) keeps the text span's last tokens, e.g. the question,
out of the groups; 0 is FastCache's CCM.
The math lives in `pallas_kernels.ccm_compress`; this module holds the parameters and the step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import parallel
from kvjax.cache import KVCache
from kvjax.errors import KVJaxError
from kvjax.compression.common import ROPE_POSITIONS, check_rope_positions, next_positions, per_row
from pallas_kernels.ccm_compress import CCMWeights, GroupMLP, ccm_compress, ccm_compress_reference

IMAGE_MODES = ("image_mlp", "text_mlp", "keep")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, slots=True)
class CompressorConfig:
    """Shape and behaviour of a CCM compressor; saved beside its weights."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    compression_factor: int = 5
    min_seq_len: int = 2  # a span with fewer groups than this is kept unchanged
    keep_last: int = 0  # the text span's last tokens (the question) kept as they are; 0: FastCache's CCM
    dropout: float = 0.4  # FastCache's rate; active only in training mode
    image_mode: str = "image_mlp"  # see the module docstring
    rope_positions: str = "original"  # the convention the compressor was trained with (DESIGN.md)
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "compression_factor"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise KVJaxError(f"compressor {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("min_seq_len", "keep_last"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise KVJaxError(f"compressor {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise KVJaxError(f"compressor dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in (("image_mode", IMAGE_MODES), ("rope_positions", ROPE_POSITIONS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise KVJaxError(f"compressor {name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @property
    def has_image_mlps(self) -> bool:
        return self.image_mode == "image_mlp"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompressorConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KVJaxError(f"unknown compressor config keys {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def for_model(cls, model_cfg, **fields) -> CompressorConfig:
        """The config of a compressor shaped for `model_cfg` (layers, KV heads, head_dim); None fields
        keep their defaults."""
        return cls(num_layers=model_cfg.num_layers, num_kv_heads=model_cfg.num_kv_heads,
                   head_dim=model_cfg.head_dim, **{k: v for k, v in fields.items() if v is not None})

    def check_against(self, cache_or_model_cfg) -> None:
        """Refuse a compressor built for another model: layers, kv heads and head_dim must match."""
        src = cache_or_model_cfg
        theirs = ((src.num_layers, src.k.shape[2], src.k.shape[4]) if isinstance(src, KVCache)
                  else (src.num_layers, src.num_kv_heads, src.head_dim))
        ours = (self.num_layers, self.num_kv_heads, self.head_dim)
        if ours != theirs:
            what = "KV cache" if isinstance(src, KVCache) else "model"
            raise KVJaxError(
                f"compressor does not fit the {what}: compressor has (layers, kv heads, head_dim) = {ours}, "
                f"the {what} has {theirs}; use a compressor trained or converted for this model")


def _torch_like_uniform(rngs: nnx.Rngs, shape, fan_in: int, dtype):
    """PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound).astype(dtype)


class LayerMLPs(nnx.Module):
    """One Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear MLP per LM layer, stacked on axis 0."""

    def __init__(self, num_layers: int, in_dim: int, head_dim: int, dropout: float, dtype, rngs: nnx.Rngs):
        def linear(fan_in, fan_out):
            return (nnx.Param(_torch_like_uniform(rngs, (num_layers, fan_in, fan_out), fan_in, dtype)),
                    nnx.Param(_torch_like_uniform(rngs, (num_layers, fan_out), fan_in, dtype)))

        self.w1, self.b1 = linear(in_dim, head_dim)
        self.w2, self.b2 = linear(head_dim, head_dim)
        self.w3, self.b3 = linear(head_dim, head_dim)
        # Built in inference mode; .train() turns dropout on.
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

    def weights(self) -> GroupMLP:
        return GroupMLP(*(p[...] for p in (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)))


class CCMCompressor(nnx.Module):
    """K and V MLPs for the text span, and for the image span when cfg.image_mode == 'image_mlp'."""

    def __init__(self, cfg: CompressorConfig, *, rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        rngs = rngs or nnx.Rngs(0)
        dtype = jnp.dtype(cfg.dtype)
        make = functools.partial(LayerMLPs, cfg.num_layers, cfg.compression_factor * cfg.head_dim,
                                 cfg.head_dim, cfg.dropout, dtype, rngs=rngs)
        self.text_k, self.text_v = make(), make()
        if cfg.has_image_mlps:
            self.image_k, self.image_v = make(), make()

    def ccm_weights(self) -> CCMWeights:
        image = (self.image_k.weights(), self.image_v.weights()) if self.cfg.has_image_mlps else (None, None)
        return CCMWeights(self.text_k.weights(), self.text_v.weights(), *image)

    @property
    def is_training(self) -> bool:
        return self.cfg.dropout > 0 and not self.text_k.dropout.deterministic


class LinearDecoupleCompressor(CCMCompressor):
    """FastCache's KVCacheLinearDecoupleCompressor: separate MLPs for the image and the text span."""

    def __init__(self, cfg: CompressorConfig, *, rngs: nnx.Rngs | None = None):
        if cfg.image_mode != "image_mlp":
            raise KVJaxError(f"LinearDecoupleCompressor needs image_mode='image_mlp', got {cfg.image_mode!r}")
        super().__init__(cfg, rngs=rngs)


class HybridCompressor(CCMCompressor):
    """FastCache's KVCacheHybridCompressor: text MLPs only (image_mode 'text_mlp' or 'keep')."""

    def __init__(self, cfg: CompressorConfig, *, rngs: nnx.Rngs | None = None):
        if cfg.image_mode == "image_mlp":
            raise KVJaxError("HybridCompressor has no image MLPs: use image_mode 'text_mlp' or 'keep'")
        super().__init__(cfg, rngs=rngs)


def build_compressor(cfg: CompressorConfig, *, rngs: nnx.Rngs | None = None) -> CCMCompressor:
    """The compressor class that matches cfg.image_mode."""
    cls = LinearDecoupleCompressor if cfg.has_image_mlps else HybridCompressor
    return cls(cfg, rngs=rngs)


def apply_compression(cache: KVCache, compressor: CCMCompressor, image_len, *, rope_positions: str | None = None,
                      mode: str | None = None) -> KVCache:
    """Traceable, differentiable compression (use inside your own jit/grad, e.g. for training).

    image_len int32 [B]: the image prefix of each sequence in the cache. Dropout is applied when
    the compressor is in training mode (then the jnp reference runs, as the kernel has no VJP).
    rope_positions: 'original' keeps `positions`; 'compressed' restarts them at the new kv_len.
    """
    cfg = compressor.cfg
    rope_positions = rope_positions or cfg.rope_positions
    if cfg.image_mode == "text_mlp":
        image_len = jnp.zeros_like(cache.kv_len)
    kwargs = dict(cf=cfg.compression_factor, min_seq_len=cfg.min_seq_len, keep_last=cfg.keep_last)
    if compressor.is_training:
        k, v, new_len = ccm_compress_reference(cache.k, cache.v, cache.kv_len, image_len, compressor.ccm_weights(),
                                               dropout=compressor.text_k.dropout, **kwargs)
    else:
        def kernel(k, v, kv_len, image_len, weights):  # per shard of the KV heads when tensor-parallel
            return ccm_compress(k, v, kv_len, image_len, weights, mode=mode, **kwargs)

        heads, same = parallel.LAYER_HEADS, parallel.REPLICATED
        k, v, new_len = parallel.per_shard(kernel, (cache.k, cache.v, cache.kv_len, image_len, compressor.ccm_weights()),
                                           (heads, heads, same, same, same), out_specs=(heads, heads, same))
    return cache.replace(k=k, v=v, kv_len=new_len, positions=next_positions(cache, new_len, rope_positions))


@functools.partial(jax.jit, static_argnums=(0, 4, 5), donate_argnums=(2,))
def _compress(graphdef, state, cache, image_len, rope_positions, mode):
    return apply_compression(cache, nnx.merge(graphdef, state), image_len, rope_positions=rope_positions, mode=mode)


def compress_ccm(cache: KVCache, compressor: CCMCompressor, image_len=None, *, rope_positions: str | None = None,
                 mode: str | None = None) -> KVCache:
    """The CCM step (reached through `kvjax.compress`): jitted, cache donated; kv_len shrinks,
    positions follow `rope_positions` (default: the compressor's own convention). image_len int32
    [B] (default 0: all text). Dropout never applies here (inference); train with `apply_compression`."""
    compressor.cfg.check_against(cache)
    check_rope_positions(rope_positions)
    if cache.layer_kv_len is not None:
        raise KVJaxError("this cache was pressed with per-layer budgets; CCM compresses a fresh prefill")
    image_len = per_row("image_len", image_len, cache.batch)
    if (mesh := parallel.mesh_of(cache)) is not None:  # the MLPs on every device of a tensor-parallel cache
        parallel.replicate_module(compressor, mesh)
    graphdef, state = nnx.split(compressor)
    if compressor.is_training:  # the inference step runs the MLPs without dropout
        inference = nnx.merge(graphdef, state)
        inference.eval()
        graphdef, state = nnx.split(inference)
    return _compress(graphdef, state, cache, jnp.asarray(image_len), rope_positions, mode)
