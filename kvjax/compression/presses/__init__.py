"""Heuristic presses: score cached tokens after prefill and keep the top n_kept (kvpress semantics).

    press = kvjax.presses.get_press("snapkv", compression_ratio=0.5, window_size=16)
    logits, cache = kvjax.prefill_and_compress(model, cache, tokens, method=press)  # kv_len shrinks

Key/value-only presses need no observations: `kvjax.compress(kvjax.prefill(...)[1], press)` works too.
"""

from __future__ import annotations

from kvjax.errors import KVJaxError
from kvjax.compression.presses.apply import (apply_press, compress_with_press, forward_observed, kept_tokens,
                                             ratio_free)
from kvjax.compression.presses.base import Press, PressInputs, ScorerPress, compute_n_kept
from kvjax.compression.presses.expected import ExpectedAttentionPress
from kvjax.compression.presses.keynorm import FixSizeL2Press, KnormPress, L2CompressPress
from kvjax.compression.presses.observed import ObservedAttentionPress
from kvjax.compression.presses.positional import RandomPress, StartRecentPress, StreamingLLMPress
from kvjax.compression.presses.window import PyramidKVPress, SnapKVPress, TOVAPress

PRESSES = {
    "knorm": KnormPress,
    "streaming_llm_press": StreamingLLMPress,
    "random": RandomPress,
    "snapkv": SnapKVPress,
    "pyramidkv": PyramidKVPress,
    "tova": TOVAPress,
    "expected_attention": ExpectedAttentionPress,
    "observed_attention": ObservedAttentionPress,
    # seed 004's methods
    "l2_compress": L2CompressPress,
    "fix_size_l2": FixSizeL2Press,
    "streaming_llm": StartRecentPress,
}


def list_presses() -> list[str]:
    """Registry names, for get_press and chat's --press."""
    return sorted(PRESSES)


def get_press(name: str, **kwargs) -> Press:
    """A press by registry name with its hyper-parameters (kvpress field names)."""
    if name not in PRESSES:
        raise KVJaxError(f"unknown press {name!r}; choose one of {', '.join(list_presses())}")
    try:
        return PRESSES[name](**kwargs)
    except TypeError as err:
        raise KVJaxError(f"press {name!r}: {err}") from None


def takes_ratio(name: str) -> bool:
    """Whether the press is budgeted by compression_ratio (seed 004's take their own options)."""
    return isinstance(PRESSES.get(name), type) and issubclass(PRESSES[name], ScorerPress)


def press_with_ratio(name: str, ratio: float | None, options: dict | None = None) -> Press:
    """get_press with a compression_ratio (default 0.5) for the presses budgeted by one; the others
    take only their own options (a ratio given to one is an error)."""
    options = dict(options or {})
    if takes_ratio(name):
        options.setdefault("compression_ratio", 0.5 if ratio is None else ratio)
    elif ratio is not None and name in PRESSES:
        raise KVJaxError(f"press {name!r} is not budgeted by a compression ratio; give its own options instead")
    return get_press(name, **options)


__all__ = [
    "Press", "PressInputs", "ScorerPress", "compute_n_kept", "apply_press", "compress_with_press", "kept_tokens",
    "forward_observed", "ratio_free", "list_presses", "get_press", "PRESSES",
    "takes_ratio", "press_with_ratio",
    *(cls.__name__ for cls in PRESSES.values()),
]
