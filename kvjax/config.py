"""Model configuration: frozen, hashable dataclasses built from a Hugging Face config.

Configs are static jit arguments, so every field is a plain scalar or tuple.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvjax.errors import KVJaxError

# HF `architectures[0]` -> our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPTNeoXForCausalLM": "gpt_neox",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
NORMS = ("rms", "layer")  # RMSNorm (Llama, Qwen) | LayerNorm with bias (GPT-NeoX)
# transformers' ACT2FN names GPT-NeoX checkpoints use (gelu_fast is gelu_new's formula).
GPT_NEOX_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RopeConfig:
    """RoPE frequencies; the scaled variants follow transformers' `modeling_rope_utils`."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0  # linear, llama3, yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3, yarn (0 = max_position_embeddings)
    attention_factor: float | None = None  # yarn: scale on cos/sin (None = derived from factor)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise KVJaxError(
                f"unsupported rope_type {self.rope_type!r}; kvjax supports {', '.join(ROPE_TYPES)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise KVJaxError(f"rope theta and factor must be > 0, got {self.theta} and {self.factor}")

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, max_position_embeddings: int, *,
                partial_rotary: bool = False) -> RopeConfig:
        """partial_rotary: the family rotates only part of each head (the caller reads
        partial_rotary_factor into ModelConfig.rotary_dim); otherwise a factor != 1 is refused."""
        params = dict(params or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if not partial_rotary and float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise KVJaxError(
                "partial_rotary_factor != 1 is not supported: transformers' Llama/Qwen models "
                "rotate the whole head; remove it from config.json"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in fields and v is not None}
        kwargs["rope_type"] = rope_type
        kwargs["theta"] = float(params.get("rope_theta", 10000.0))
        if not kwargs.get("original_max_position_embeddings"):
            kwargs["original_max_position_embeddings"] = max_position_embeddings
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """A decoder-only LM: the Llama family (Llama, Qwen2, Qwen3) or GPT-NeoX (Pythia)."""

    family: str = "llama"  # llama | qwen2 | qwen3 | gpt_neox
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2; Llama's `attention_bias` (also o_proj)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    rotary_dim: int = 0  # GPT-NeoX's rotary_pct: RoPE rotates the first rotary_dim dims of a head (0 = all)
    use_parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x)) (else sequential)
    norm: str = "rms"  # one of NORMS
    layer_norm_eps: float = 1e-5  # norm "layer"
    hidden_act: str = "silu"  # Llama/Qwen: silu (gated MLP); GPT-NeoX: one of GPT_NEOX_ACTIVATIONS
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise KVJaxError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise KVJaxError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.family not in SUPPORTED_ARCHITECTURES.values():
            raise KVJaxError(f"unknown model family {self.family!r}")
        is_neox = self.family == "gpt_neox"
        if self.norm not in NORMS:
            raise KVJaxError(f"config field norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.norm != ("layer" if is_neox else "rms"):
            raise KVJaxError(f"config field norm={self.norm!r} is not implemented for {self.family}; "
                             f"use norm={'layer' if is_neox else 'rms'!r}")
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise KVJaxError(f"config field rotary_dim must be even and in [0, head_dim={self.head_dim}] "
                             f"(0 = whole head), got {self.rotary_dim}; fix rotary_pct / partial_rotary_factor")
        if not is_neox and self.rotary_dim not in (0, self.head_dim):
            raise KVJaxError(f"config field rotary_dim={self.rotary_dim}: {self.family} rotates the whole "
                             "head; set rotary_dim=0")
        if self.use_parallel_residual and not is_neox:
            raise KVJaxError(f"config field use_parallel_residual=True is not implemented for {self.family}; "
                             "set it to False")
        acts = GPT_NEOX_ACTIVATIONS if is_neox else ("silu",)
        if self.hidden_act not in acts:
            raise KVJaxError(f"config field hidden_act {self.hidden_act!r} is not supported for {self.family}; "
                             f"choose one of {', '.join(acts)}")
        if is_neox and (self.num_kv_heads != self.num_heads or self.qk_norm
                        or self.num_heads * self.head_dim != self.hidden_size):
            raise KVJaxError("gpt_neox has one KV head per query head, head_dim = hidden_size / num_heads and "
                             f"no qk_norm; got num_kv_heads={self.num_kv_heads}, num_heads={self.num_heads}, "
                             f"head_dim={self.head_dim}, qk_norm={self.qk_norm}")

    @property
    def rope_dim(self) -> int:
        """Dims of each head that RoPE rotates (the leading ones; the rest pass through)."""
        return self.rotary_dim or self.head_dim

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, hf: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` (or anything with the same attributes)."""
        archs = list(getattr(hf, "architectures", None) or [])
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt_neox": "gpt_neox"}.get(
                getattr(hf, "model_type", None))
        if family is None:
            found = archs or [getattr(hf, "model_type", "?")]
            raise KVJaxError(
                f"unsupported architecture {', '.join(map(str, found))}; kvjax's text models support "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf, "use_sliding_window", False):
            raise KVJaxError(f"{family} with use_sliding_window=true is not supported; set it to false")
        if family == "gpt_neox":
            return cls._from_hf_gpt_neox(hf)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        max_pos = int(getattr(hf, "max_position_embeddings", 4096) or 4096)
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            family=family,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.rms_norm_eps),
            rope=RopeConfig.from_hf(_rope_params(hf), max_pos),
            max_position_embeddings=max_pos,
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            hidden_act=getattr(hf, "hidden_act", "silu"),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            **_special_tokens(hf),
        )

    @classmethod
    def _from_hf_gpt_neox(cls, hf: Any) -> ModelConfig:
        """transformers' GPTNeoXConfig (4.x: rotary_pct / rotary_emb_base; 5.x: rope_parameters)."""
        num_heads = hf.num_attention_heads
        head_dim = hf.hidden_size // num_heads
        max_pos = int(getattr(hf, "max_position_embeddings", 2048) or 2048)
        params = _rope_params(hf, theta_name="rotary_emb_base")
        params.setdefault("partial_rotary_factor", getattr(hf, "rotary_pct", 1.0))
        rotary_dim = int(head_dim * float(params["partial_rotary_factor"]))
        if rotary_dim < 2:
            raise KVJaxError(f"rotary_pct / partial_rotary_factor {params['partial_rotary_factor']} rotates "
                             f"{rotary_dim} of {head_dim} head dims; it must rotate at least 2")
        attention_bias = bool(getattr(hf, "attention_bias", True))
        return cls(
            family="gpt_neox",
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=head_dim,
            rope=RopeConfig.from_hf(params, max_pos, partial_rotary=True),
            max_position_embeddings=max_pos,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=True,
            rotary_dim=0 if rotary_dim == head_dim else rotary_dim,
            use_parallel_residual=bool(getattr(hf, "use_parallel_residual", True)),
            norm="layer",
            layer_norm_eps=float(getattr(hf, "layer_norm_eps", 1e-5)),
            hidden_act=getattr(hf, "hidden_act", "gelu"),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            **_special_tokens(hf),
        )

    @classmethod
    def tiny(cls, family: str = "llama", **overrides) -> ModelConfig:
        """A few-kilobyte model for tests."""
        base = dict(family=family, vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
        if family == "gpt_neox":
            base.update(num_kv_heads=4, qkv_bias=True, o_bias=True, mlp_bias=True, rotary_dim=4,
                        use_parallel_residual=True, norm="layer", hidden_act="gelu")
        base.update(overrides)
        return cls(**base)


def _rope_params(hf: Any, theta_name: str = "rope_theta") -> dict[str, Any]:
    """transformers 5's rope_parameters, or 4.x's rope_scaling plus the theta attribute."""
    params = getattr(hf, "rope_parameters", None)
    if params is not None:
        return dict(params)
    params = dict(getattr(hf, "rope_scaling", None) or {})
    params["rope_theta"] = getattr(hf, theta_name, 10000.0)
    return params


def _special_tokens(hf: Any) -> dict[str, Any]:
    eos = getattr(hf, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    return dict(bos_token_id=getattr(hf, "bos_token_id", None), eos_token_ids=tuple(int(e) for e in eos_ids),
                pad_token_id=getattr(hf, "pad_token_id", None))
