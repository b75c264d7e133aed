"""Helpers shared by the kernel tests: seeded random data (NumPy, NaN-poisoned padding) and a jit
that compiles quickly. Interpret-mode kernels are big XLA programs, so tests compile each kernel
and reference once per case with LLVM optimisation off: half the compile time, same results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Per-dtype tolerances for kernel vs reference (the kernels accumulate in f32 in another order).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=_FAST_COMPILE, **kwargs)


def normal(rng: np.random.Generator, shape, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def poison_past(x: np.ndarray, length, batch_axis: int, slot_axis: int) -> np.ndarray:
    """x with NaN in every slot at or past length[b]: a kernel that reads padding shows it."""
    x = x.copy()
    for b, n in enumerate(np.asarray(length)):
        index = [slice(None)] * x.ndim
        index[batch_axis], index[slot_axis] = b, slice(int(n), None)
        x[tuple(index)] = np.nan
    return x


def assert_close(actual, expected, dtype) -> None:
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert not np.isnan(actual).any(), "NaN in kernel output"
    tol = TOL[dtype]
    np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol)
