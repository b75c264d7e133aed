"""GPT-NeoX (EleutherAI Pythia; transformers' GPTNeoXForCausalLM) as a Flax NNX module.

Attribute names follow Hugging Face's parameter names (`gpt_neox.layers.3.attention.query_key_value`,
`embed_out`), so loading is a name map (`gpt_neox_rename` drops the non-parameter buffers old
checkpoints carry). The interface is `kvjax.models.llama.CausalLM`'s, so the steps, presses and
compressors run on it unchanged. What sets the family apart, each a ModelConfig flag:
- fused QKV, head-interleaved as transformers views it: output row h*3*D + i*D + d is
  (q, k, v)[i] of head h, dim d;
- partial rotary (`rotary_dim`, from rotary_pct): RoPE rotates the first rotary_dim dims of each
  head (rotate-half within them), the rest pass through; keys are cached after RoPE;
- LayerNorm with bias, a 2-matrix MLP with `hidden_act`, biases on every projection;
- `use_parallel_residual`: x + attn(ln1(x)) + mlp(ln2(x)); else x += attn(ln1(x)); x += mlp(ln2(x)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.models.attention import cached_attention, store_kv
from kvjax.models.layers import apply_rope, rope_frequencies, run_layers
from kvjax.models.llama import _linear
from kvjax.models.vit import LayerNorm, activation

# Buffers transformers 4.x checkpoints saved next to the parameters (the causal mask and its fill
# value; fill_module already skips rotary_emb.inv_freq): not parameters, skipped on load.
_BUFFERS = (".attention.bias", ".attention.masked_bias")


def gpt_neox_rename(cfg: ModelConfig):
    """Checkpoint name -> module name (None = skip) for `kvjax.loading.fill_module`.

    transformers 5 calls the head `lm_head` in memory and saves it as `embed_out`; accept both.
    Tied checkpoints may still carry the head: the embedding is the head."""

    def rename(name: str) -> str | None:
        if name.endswith(_BUFFERS):
            return None
        if name.startswith("lm_head."):
            name = "embed_out." + name[len("lm_head."):]
        if cfg.tie_word_embeddings and name.startswith("embed_out."):
            return None
        return name

    return rename


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.query_key_value = _linear(hidden, 3 * hidden, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.dense = _linear(hidden, hidden, bias=cfg.o_bias, dtype=dtype, rngs=rngs)

    def _heads(self, h, positions):
        """h [B, T, H] -> q, k, v [B, T, Hq, D]; q and k rotated to positions [B, T] if given."""
        cfg = self.cfg
        qkv = self.query_key_value(h).reshape(h.shape[0], h.shape[1], cfg.num_heads, 3, cfg.head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        if positions is not None:
            inv_freq, scale = rope_frequencies(cfg.rope, cfg.rope_dim)  # partial: rope_dim < head_dim
            q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
        return q, k, v

    def project(self, h, kind: str = "q", positions=None):
        """h [B, T, H] -> queries (kind 'q') or keys (kind 'k') [B, T, H, D], rotated to
        `positions` int32 [B, T] if given (pre-RoPE otherwise). Presses call this."""
        return self._heads(h, positions)[("q", "k").index(kind)]

    def __call__(self, x, positions, cache_k, cache_v, layer: int, write_slots, visible_len):
        """x [B, T, H]; positions, write_slots, visible_len int32 [B, T]; cache_* [L, B, H, S, D].
        Writes this chunk's K/V at `write_slots` (slot S = dropped, for padding), then attends."""
        batch, num_new, _ = x.shape
        q, k, v = self._heads(x, positions)
        rows = jnp.arange(batch)[:, None]
        cache_k = store_kv(cache_k, layer, rows, write_slots, k)
        cache_v = store_kv(cache_v, layer, rows, write_slots, v)
        out = cached_attention(q, cache_k, cache_v, visible_len, layer)
        return self.dense(out.reshape(batch, num_new, -1)), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        hidden, inner = cfg.hidden_size, cfg.intermediate_size
        self.dense_h_to_4h = _linear(hidden, inner, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.dense_4h_to_h = _linear(inner, hidden, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        # gelu_fast is gelu_new's tanh formula written differently (transformers' FastGELUActivation).
        self.act = {"gelu_fast": "gelu_new"}.get(cfg.hidden_act, cfg.hidden_act)

    def __call__(self, x):
        return self.dense_4h_to_h(activation(self.act)(self.dense_h_to_4h(x)))


class Layer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, cache_k, cache_v, layer, write_slots, visible_len, tap=None):
        h = self.input_layernorm(x)
        if tap is not None:  # trace-time hook: presses read the attention input (kvjax presses)
            tap(layer, self.attention, h)
        attn, cache_k, cache_v = self.attention(h, positions, cache_k, cache_v, layer, write_slots, visible_len)
        if self.use_parallel_residual:  # transformers' summation order
            x = self.mlp(self.post_attention_layernorm(x)) + attn + x
        else:
            x = attn + x
            x = self.mlp(self.post_attention_layernorm(x)) + x
        return x, cache_k, cache_v


class GPTNeoXModel(nnx.Module):
    """HF's `gpt_neox.*`: embeddings, layers, final LayerNorm."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_in = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)


class GPTNeoXForCausalLM(nnx.Module):
    """GPT-NeoX LM reading and writing a dense KV cache; the interface of llama.CausalLM."""

    HEAD_NAME = "embed_out.weight"  # what a tied checkpoint may still carry (loading.text skips it)

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gpt_neox = GPTNeoXModel(cfg, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.embed_out = _linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    @property
    def dtype(self):
        """The parameter (and KV cache) dtype."""
        return self.gpt_neox.embed_in.embedding.get_value().dtype

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> embeddings [B, T, H]."""
        return self.gpt_neox.embed_in(tokens)

    def __call__(self, embeds, positions, cache_k, cache_v, write_slots, visible_len, tap=None):
        """embeds [B, T, H] -> final hidden states [B, T, H] and the updated cache arrays.
        write_slots, visible_len: int32 [B, T], or [L, B, T] when layers hold different lengths.
        tap(layer, attention, h [B, T, H]) is called with each layer's attention input if given."""
        x, cache_k, cache_v = run_layers(self.gpt_neox.layers, embeds, positions, cache_k, cache_v, write_slots,
                                         visible_len, tap)
        return self.gpt_neox.final_layer_norm(x), cache_k, cache_v

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> float32 logits [..., V]."""
        if self.cfg.tie_word_embeddings:
            return self.gpt_neox.embed_in.attend(hidden).astype(jnp.float32)
        return self.embed_out(hidden).astype(jnp.float32)
