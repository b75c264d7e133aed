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
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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
    def from_hf(cls, params: dict[str, Any] | None, max_position_embeddings: int) -> RopeConfig:
        params = dict(params or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
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
    """A decoder-only LM of the Llama family (Llama, Qwen2, Qwen3)."""

    family: str = "llama"  # llama | qwen2 | qwen3
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
            family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(
                getattr(hf, "model_type", None))
        if family is None:
            found = archs or [getattr(hf, "model_type", "?")]
            raise KVJaxError(
                f"unsupported architecture {', '.join(map(str, found))}; kvjax's text models support "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(hf, "use_sliding_window", False):
            raise KVJaxError(f"{family} with use_sliding_window=true is not supported; set it to false")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise KVJaxError(f"hidden_act {act!r} is not supported; Llama/Qwen use 'silu'")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        max_pos = int(getattr(hf, "max_position_embeddings", 4096) or 4096)
        rope_params = getattr(hf, "rope_parameters", None)
        if rope_params is None:  # transformers 4.x configs
            rope_params = dict(getattr(hf, "rope_scaling", None) or {})
            rope_params["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
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
            rope=RopeConfig.from_hf(rope_params, max_pos),
            max_position_embeddings=max_pos,
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=getattr(hf, "pad_token_id", None),
        )

    @classmethod
    def tiny(cls, family: str = "llama", **overrides) -> ModelConfig:
        """A few-kilobyte model for tests."""
        base = dict(family=family, vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
        base.update(overrides)
        return cls(**base)
