"""Which implementation of a kernel op runs: the pure-jnp reference, Pallas, or Pallas interpreted.

`KVJAX_KERNELS=reference|pallas|interpret` overrides the default, which is Pallas on GPU and the
reference everywhere else (Pallas' CPU path is the interpreter: correct but slow).
"""

from __future__ import annotations

import os
import warnings

import jax

MODES = ("reference", "pallas", "interpret")
_warned: set[tuple[str, str]] = set()


def kernel_mode(mode: str | None = None) -> str:
    """The mode an op should run in: `mode` if given, else $KVJAX_KERNELS, else by backend."""
    mode = mode or os.environ.get("KVJAX_KERNELS", "").strip().lower() or None
    if mode is None:
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    if mode not in MODES:
        raise ValueError(f"KVJAX_KERNELS / mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def choose_mode(op: str, mode: str | None, reason: str | None) -> str:
    """kernel_mode(mode), except that shapes the Pallas kernel cannot take (`reason`, None if it
    can) run the reference, with a one-time warning: what every dispatcher decides."""
    mode = kernel_mode(mode)
    return fall_back(op, reason) if mode != "reference" and reason else mode


def fall_back(op: str, reason: str) -> str:
    """Warn once per (op, reason) that `op` runs its reference instead of Pallas; returns 'reference'."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"pallas_kernels.{op}: using the jnp reference ({reason})", stacklevel=3)
    return "reference"
