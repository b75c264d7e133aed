"""Pieces shared by the vision towers (CLIP, SigLIP): config, LayerNorm, patch embedding and the
pre-LN ViT encoder, with Hugging Face's parameter names (`encoder.layers.3.self_attn.q_proj`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.errors import KVJaxError

# transformers' ACT2FN names -> functions ("gelu" is the exact erf form).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}


def activation(name: str, field: str = "hidden_act"):
    if name not in ACTIVATIONS:
        raise KVJaxError(f"{field} {name!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VisionConfig:
    """A ViT vision tower (CLIP or SigLIP); fields follow transformers' vision configs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
                     "patch_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise KVJaxError(f"vision config field {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise KVJaxError(f"vision hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_heads})")
        activation(self.hidden_act, "vision hidden_act")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at the native image size."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf_config(cls, hf: Any) -> VisionConfig:
        """From a transformers CLIPVisionConfig / SiglipVisionConfig (or a dict of its fields)."""
        get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
        return cls(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                   num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                   image_size=get("image_size"), patch_size=get("patch_size"),
                   num_channels=get("num_channels", 3) or 3,
                   layer_norm_eps=float(get("layer_norm_eps", 1e-5) or 1e-5),
                   hidden_act=get("hidden_act", "quick_gelu"))


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with HF names (weight, bias); statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class PatchEmbedding(nnx.Module):
    """Conv2d(kernel = stride = patch) kept in PyTorch's [D, C, p, p] layout, as a matmul."""

    def __init__(self, cfg: VisionConfig, *, bias: bool, dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        shape = (cfg.hidden_size, cfg.num_channels, p, p)
        self.weight = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, dtype))
        if bias:
            self.bias = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype))
        self.patch_size = p

    def __call__(self, pixels):
        """pixels [N, C, H, W] (H, W multiples of the patch) -> [N, (H/p)(W/p), D], row-major."""
        n, c, h, w = pixels.shape
        p = self.patch_size
        x = pixels.astype(self.weight.dtype).reshape(n, c, h // p, p, w // p, p)
        out = jnp.einsum("ncyixj,dcij->nyxd", x, self.weight[...])
        out = out.reshape(n, (h // p) * (w // p), -1)
        return out + self.bias[...] if hasattr(self, "bias") else out


def _linear(n_in, n_out, *, dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=True, dtype=dtype, param_dtype=dtype, rngs=rngs)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = _linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = _linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = _linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x, key_mask=None):
        """x [N, L, D]; key_mask bool [N, L] (False = padding patch, never attended) or None."""
        n, length, d = x.shape
        heads = self.num_heads

        def split_heads(t):
            return t.reshape(n, length, heads, d // heads)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) * (d // heads) ** -0.5
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, length, d)
        return self.out_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.fc2(activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, key_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    """HF's `encoder.layers.*`. Only the first `num_layers` are built: towers whose features come
    from an earlier layer (LLaVA's -2) skip the rest, and the loader skips their weights."""

    def __init__(self, cfg: VisionConfig, num_layers: int, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, x, key_mask=None) -> list[jax.Array]:
        """-> hidden states [input, after layer 0, after layer 1, ...] (HF's `hidden_states`)."""
        states = [x]
        for layer in self.layers:
            x = layer(x, key_mask)
            states.append(x)
        return states
