"""Means over a whole data set, one batch at a time, inside one compiled program.

The λ tools need the training loss, its gradient and its curvature products
over the *whole* training set, which may not fit through the model at once.
`mean_over_batches` computes Σ_b (n_b/n)·f(batch_b) with a `jax.lax.scan` over
batches of ``batch_size`` examples and one more call for the n mod batch_size
examples left (a mean of per-batch means weighted by their sizes is the mean
over the set, for any f that is a mean over its batch's examples).

Batch b holds the examples b, b + k, b + 2k, ... (k = n // batch_size batches):
strided, not contiguous, so that data sharded along the example axis over a
mesh (``P("data")``, several hosts) gives every device its share of every
batch, and no batch moves between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_batch_size", "mean_over_batches", "n_examples"]


def n_examples(data: Any, name: str) -> int:
  """The common leading (example) axis of the array leaves of ``data``.

  Raises:
    ValueError: no array leaf, or leaves that disagree on it.
  """
  sizes = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(data) if np.ndim(x)}
  if len(sizes) != 1:
    got = f"leading sizes {sorted(sizes)}" if sizes else "no array with an example axis"
    raise ValueError(
      f"`{name}` must be a pytree of arrays sharing their leading (example) axis, such as "
      f"`(inputs, targets)` or a dict of arrays; got {got}."
    )
  return sizes.pop()


def check_batch_size(batch_size: Any, n: int, name: str = "batch_size") -> int:
  """``batch_size`` checked against a set of ``n`` examples; None means all ``n``."""
  if batch_size is None:
    return n
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
    raise TypeError(f"`{name}` must be an integer or None; got {batch_size!r}.")
  if not 0 < batch_size <= n:
    raise ValueError(
      f"`{name}` must be in [1, {n}] (the data set's size) or None for one batch; got {batch_size}."
    )
  return int(batch_size)


def _split(data: Any, batch_size: int) -> tuple[Any, Any, int, int]:
  """(batches stacked on a leading axis, the remainder or None, k, n)."""
  n = jax.tree_util.tree_leaves(data)[0].shape[0]
  k = n // batch_size

  def stacked(x: jax.Array) -> jax.Array:
    # Row b·k + j goes to batch j: strided batches (module docstring).
    x = x[: k * batch_size].reshape(batch_size, k, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  rest = (
    None if k * batch_size == n else jax.tree_util.tree_map(lambda x: x[k * batch_size :], data)
  )
  return jax.tree_util.tree_map(stacked, data), rest, k, n


def mean_over_batches(f: Callable[[Any], Any], data: Any, batch_size: int, dtype: Any) -> Any:
  """Σ_b (n_b/n)·f(batch_b) over all of ``data``, accumulated in ``dtype``; traceable.

  ``f(batch)`` returns a pytree of arrays; the result has its structure, each
  leaf in ``dtype`` (the accumulation dtype of the params: float32 sums of
  bf16 per-batch values lose nothing).
  """
  batches, rest, k, n = _split(data, batch_size)

  def weighted(batch: Any, weight: float) -> Any:
    return jax.tree_util.tree_map(lambda y: jnp.asarray(y, dtype) * weight, f(batch))

  def body(total: Any, batch: Any) -> tuple[Any, None]:
    return jax.tree_util.tree_map(jnp.add, total, weighted(batch, batch_size / n)), None

  shapes = jax.eval_shape(f, jax.tree_util.tree_map(lambda x: x[0], batches))
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, batches)
  if rest is not None:
    total = jax.tree_util.tree_map(jnp.add, total, weighted(rest, (n - k * batch_size) / n))
  return total
