"""Weighted sums of per-leaf reductions: Σ_j c_j · Σ_i f(W_j)_i.

Every penalty is such a sum (f = square for L2, abs for L1). Keeping the
reduction strategy in one place lets it be tuned for the two regimes real
models have: a few large leaves (memory-bound) and thousands of small ones
(where per-leaf reductions cost compile time and dispatch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["abs_values", "squares", "weighted_sum"]

Elementwise = Callable[[jax.Array, jnp.dtype], jax.Array]


def squares(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  """|x|² elementwise in ``acc`` (real² + imag² for complex ``x``)."""
  if jnp.iscomplexobj(x):
    re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
    return re * re + im * im
  x = x.astype(acc)
  return x * x


def abs_values(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  """|x| elementwise in ``acc`` (the modulus for complex ``x``)."""
  if jnp.iscomplexobj(x):
    return jnp.abs(x.astype(jnp.complex128 if acc == jnp.float64 else jnp.complex64))
  return jnp.abs(x.astype(acc))


def weighted_sum(
  values: Sequence[Any],
  multipliers: Sequence[float],
  elementwise: Elementwise,
  acc: jnp.dtype,
) -> jax.Array:
  """Σ_j c_j · Σ_i elementwise(values_j)_i, accumulated in ``acc``.

  Args:
    values: the selected leaves (arrays or Python numbers).
    multipliers: their static multipliers c_j (Python floats, > 0).
    elementwise: the per-element map, e.g. `squares`; it must map 0 to 0.
    acc: the accumulation dtype (float32 or float64).

  Returns:
    A 0-d array of dtype ``acc``; 0 when ``values`` is empty.
  """
  total = jnp.zeros((), acc)
  for value, multiplier in zip(values, multipliers, strict=True):
    term = jnp.sum(elementwise(jnp.asarray(value), acc))
    total = total + (term if multiplier == 1.0 else jnp.asarray(multiplier, acc) * term)
  return total
