"""What a parameter leaf may hold, and the precision every penalty accumulates in.

Penalties accumulate in float32, or float64 when a selected leaf is 64-bit:
bf16 and fp16 leaves are upcast before the elementwise op, so weights of
magnitude ~1000 in fp16 (whose squares overflow fp16) give a finite,
exact-to-float32 value.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "ARRAY_TYPES",
  "accumulation_dtype",
  "complex_of",
  "conj_upcast",
  "is_inexact",
  "upcast",
]

# What a parameter leaf may be; anything else is a TypeError naming its path.
ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, numbers.Number)

_WIDE = frozenset({jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)})


def is_inexact(value: Any) -> bool:
  """Whether a leaf is floating or complex (Python floats and complex numbers included)."""
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    return isinstance(value, (float, complex)) and not isinstance(value, bool)
  return jnp.issubdtype(dtype, jnp.inexact)


def accumulation_dtype(values: Iterable[Any]) -> jnp.dtype:
  """float64 if any value is float64/complex128 and 64-bit is enabled, else float32.

  Python numbers count as float32 (JAX's weak types), so a stray ``1.0`` leaf
  does not switch a float32 model to float64 under ``jax_enable_x64``. NumPy
  float64 leaves with 64-bit disabled are computed in float32, as JAX computes
  everything then (asking for float64 would only warn and truncate).
  """
  for value in values:
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) in _WIDE:
      return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
  return jnp.dtype(jnp.float32)


def complex_of(acc: jnp.dtype) -> jnp.dtype:
  """The complex dtype whose parts are ``acc``: complex128 for float64, else complex64."""
  return jnp.dtype(jnp.complex128 if acc == jnp.float64 else jnp.complex64)


def upcast(x: Any, acc: jnp.dtype) -> jax.Array:
  """``x`` in the accumulation precision: ``acc``, or its complex counterpart."""
  x = jnp.asarray(x)
  return x.astype(complex_of(acc) if jnp.iscomplexobj(x) else acc)


def conj_upcast(value: jax.Array, acc: jnp.dtype) -> jax.Array:
  """w, or conj(w) for complex w: JAX's gradient of ½|w|²."""
  x = upcast(value, acc)
  return jnp.conj(x) if jnp.iscomplexobj(x) else x
