"""The one place that knows which Pallas API this jax has (0.10.2 on CI, 0.11.x on the GPU machines).

Checked against both: `pl.dot` is gone from `jax.experimental.pallas` in 0.11, so kernels use the
Triton module's `dot`, `load`, `store` and `debug_barrier`, which are the same in both. From 0.11 the
Triton backend warns at lowering time that it is deprecated; `quiet_triton_deprecation` filters that
one message (called by each `*_pallas` entry point, never at import).
"""

from __future__ import annotations

import warnings

from jax import lax
from jax.experimental.pallas import triton as _triton

CompilerParams = _triton.CompilerParams
load = _triton.load
store = _triton.store

_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


def quiet_triton_deprecation() -> None:
    """Ignore jax 0.11+'s Triton-backend deprecation warning (the kernels still run on H100/H200).

    A filter rather than a `catch_warnings` block: the warning fires when an enclosing jit lowers,
    after the kernel's own Python has returned."""
    warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)


def dot(a, b, *, trans_b: bool = False):
    """a [M, K] @ b [K, N] (or b [N, K] with trans_b) accumulated in float32; Triton needs M, N, K >= 16.

    float32 operands ask for full precision so the GPU does not silently use TF32."""
    precision = lax.Precision.HIGHEST if a.dtype.itemsize == 4 else None
    return _triton.dot(a, b, trans_b=trans_b, precision=precision)


def barrier(interpret: bool) -> None:
    """Make every thread of the program finish its loads before any stores (a CTA barrier on GPU).

    Needed where a program overwrites slots it has just read from (in-place compaction). The
    interpreter runs a program's ops in order, so there it is a no-op."""
    if not interpret:
        _triton.debug_barrier()


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def largest_power_of_2_dividing(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (block sizes must be powers of two on Triton)."""
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block
