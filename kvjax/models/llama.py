"""Llama-family decoder LMs (Llama, Qwen2, Qwen3) as Flax NNX modules.

Attribute names follow Hugging Face's parameter names (`model.layers.3.self_attn.q_proj`), so
loading is a name map. Differences between the families are config flags (q/k/v bias, q/k norm,
tied embeddings), never inferred from one another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.models.attention import cached_attention, store_kv
from kvjax.models.layers import RMSNorm, apply_rope, rope_frequencies, run_layers


def _linear(n_in, n_out, *, bias, dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        hidden, head_dim = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(hidden, cfg.num_heads * head_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = _linear(hidden, cfg.num_kv_heads * head_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(hidden, cfg.num_kv_heads * head_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = _linear(cfg.num_heads * head_dim, hidden, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=cfg.rms_norm_eps, param_dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=cfg.rms_norm_eps, param_dtype=dtype)

    def project(self, h, kind: str = "q", positions=None):
        """h [B, T, H] -> queries [B, T, Hq, D] (kind 'q') or keys [B, T, Hkv, D] (kind 'k'),
        rotated to `positions` int32 [B, T] if given (pre-RoPE otherwise). Presses call this."""
        cfg = self.cfg
        heads = cfg.num_heads if kind == "q" else cfg.num_kv_heads
        x = getattr(self, f"{kind}_proj")(h).reshape(h.shape[0], h.shape[1], heads, cfg.head_dim)
        if cfg.qk_norm:
            x = getattr(self, f"{kind}_norm")(x)
        if positions is not None:
            x = apply_rope(x, positions, *rope_frequencies(cfg.rope, cfg.rope_dim))
        return x

    def __call__(self, x, positions, cache_k, cache_v, layer: int, write_slots, visible_len):
        """x [B, T, H]; positions, write_slots, visible_len int32 [B, T]; cache_* [L, B, Hkv, S, D].

        Writes this chunk's K/V at `write_slots` (slot S = dropped, for padding), then attends.
        """
        cfg = self.cfg
        batch, num_new, _ = x.shape
        q, k = self.project(x, "q", positions), self.project(x, "k", positions)
        v = self.v_proj(x).reshape(batch, num_new, cfg.num_kv_heads, cfg.head_dim)
        rows = jnp.arange(batch)[:, None]
        cache_k = store_kv(cache_k, layer, rows, write_slots, k)  # quantizes an int8 cache; pages a PagedKV
        cache_v = store_kv(cache_v, layer, rows, write_slots, v)
        out = cached_attention(q, cache_k, cache_v, visible_len, layer)
        return self.o_proj(out.reshape(batch, num_new, -1)), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(hidden, inner, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = _linear(hidden, inner, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = _linear(inner, hidden, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=dtype)

    def __call__(self, x, positions, cache_k, cache_v, layer, write_slots, visible_len, tap=None):
        h = self.input_layernorm(x)
        if tap is not None:  # trace-time hook: presses read the attention input (kvjax.presses)
            tap(layer, self.self_attn, h)
        attn, cache_k, cache_v = self.self_attn(h, positions, cache_k, cache_v, layer, write_slots, visible_len)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache_k, cache_v


class Backbone(nnx.Module):
    """HF's `model.*`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=dtype)


class CausalLM(nnx.Module):
    """Decoder LM reading and writing a dense KV cache. See `kvjax.steps` for the jitted steps."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = Backbone(cfg, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    @property
    def dtype(self):
        """The parameter (and KV cache) dtype."""
        return self.model.embed_tokens.embedding.get_value().dtype

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> embeddings [B, T, H] (VLMs replace some rows before `__call__`)."""
        return self.model.embed_tokens(tokens)

    def __call__(self, embeds, positions, cache_k, cache_v, write_slots, visible_len, tap=None):
        """embeds [B, T, H] -> final hidden states [B, T, H] and the updated cache arrays.
        write_slots, visible_len: int32 [B, T], or [L, B, T] when layers hold different lengths.
        tap(layer, self_attn, h [B, T, H]) is called with each layer's attention input if given."""
        x, cache_k, cache_v = run_layers(self.model.layers, embeds, positions, cache_k, cache_v, write_slots,
                                         visible_len, tap)
        return self.model.norm(x), cache_k, cache_v

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> float32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
