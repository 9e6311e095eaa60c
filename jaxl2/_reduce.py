"""Weighted sums of per-leaf reductions: Σ_j c_j · Σ_i f(W_j)_i.

Every penalty is such a sum (f = square for L2, abs for L1), so the reduction
strategy lives here, tuned for the two regimes real models have (what was
tried, and the figures: ``bench/NOTES.md``):

* Large leaves (``>= 2**14`` elements) are memory-bound: each gets a reduction
  of its own, which reads it once and never copies it.
* Small leaves are compile-bound: XLA's compile time grows faster than the
  number of separate reductions (~20 s for 2,000 of them). Where 64 or more
  small leaves share a shape, they are summed elementwise, up to 32 to a
  kernel, and the sum reduced once (no copy; equal kernels compile once). The
  other small leaves are flattened and concatenated, a copy of small leaves
  only, and reduced once per dtype and multiplier.

Each kernel is a jitted `jax.custom_jvp` function, so identical kernels are
traced, linearized and transposed once, and the backward pass of L2 is
``2·c_j·ct·W_j``: one multiply per element, which XLA fuses into the update.

Several devices. Leaves laid out differently never share a kernel, or it would
move weights between devices: the plan above is made for each *layout* on its
own (`jaxl2._layouts`: what a layout is, and what that guarantees). Within a
layout, groups are made as on one device, pools only where the layout is
poolable (replicated or on one device), and the other small leaves are reduced
one by one (a local reduction, then a scalar all-reduce).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxl2._dtypes import upcast
from jaxl2._layouts import layouts

__all__ = ["Elementwise", "abs_values", "squares", "weighted_sum"]

Elementwise = Callable[[jax.Array, jnp.dtype], jax.Array]

_LARGE = 1 << 14  # Leaves with at least this many elements are reduced one by one.
_GROUP = 32  # Small leaves of one shape summed elementwise in one kernel, at most.
_MIN_GROUP = 64  # Fewer small leaves of one shape than this are pooled instead.
_POOL_LEAVES = 256  # Leaves per concatenation, at most...
_POOL_ELEMENTS = 1 << 20  # ...and elements per concatenation.


def squares(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  """|x|² elementwise in ``acc`` (real² + imag² for complex ``x``)."""
  if jnp.iscomplexobj(x):
    re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
    return re * re + im * im
  x = x.astype(acc)
  return x * x


def abs_values(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  """|x| elementwise in ``acc`` (the modulus for complex ``x``)."""
  return jnp.abs(upcast(x, acc))


# For real x, f'(x)·dx = factor · slope(x) · dx: a single multiply per element
# in the tangent and in its transpose (the gradient). Other maps use `jax.jvp`.
_SLOPES: dict[Callable[..., Any], tuple[float, Elementwise]] = {
  squares: (2.0, lambda x, acc: x.astype(acc)),
}


class _Plan(NamedTuple):
  """Leaf indices per kernel: a group shares a shape; a pool a dtype and a multiplier."""

  groups: tuple[tuple[int, ...], ...]
  pools: tuple[tuple[int, ...], ...]


def _chunks(indices: list[int], limit: int) -> list[tuple[int, ...]]:
  """``indices`` cut into chunks of at most ``limit``, sizes differing by at most one.

  Chunks of one size and shape compile to one kernel, so there are two at most.
  """
  count = -(-len(indices) // limit)
  base, extra = divmod(len(indices), count)
  bounds = [k * base + min(k, extra) for k in range(count + 1)]
  return [tuple(indices[a:b]) for a, b in itertools.pairwise(bounds)]


def _plan_layout(
  indices: list[int],
  shapes: tuple[tuple[int, ...], ...],
  dtypes: tuple[Any, ...],
  multipliers: tuple[float, ...],
  poolable: bool,
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
  """Groups and pools of the leaves ``indices`` (one layout); unpoolable rare leaves alone."""
  groups: list[tuple[int, ...]] = []
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for i in indices:
    if np.prod(shapes[i], dtype=np.int64) >= _LARGE:
      groups.append((i,))
    else:
      by_shape.setdefault(shapes[i], []).append(i)
  rare: dict[tuple[Any, float], list[int]] = {}
  for same in by_shape.values():
    if len(same) >= _MIN_GROUP:
      groups.extend(_chunks(same, _GROUP))
    elif poolable:
      for i in same:
        rare.setdefault((dtypes[i], multipliers[i]), []).append(i)
    else:
      groups.extend((i,) for i in same)
  pools: list[tuple[int, ...]] = []
  for same in rare.values():
    chunk: list[int] = []
    elements = 0
    for i in sorted(same):
      size = int(np.prod(shapes[i], dtype=np.int64))
      if chunk and (len(chunk) == _POOL_LEAVES or elements + size > _POOL_ELEMENTS):
        pools.append(tuple(chunk))
        chunk, elements = [], 0
      chunk.append(i)
      elements += size
    if chunk:
      pools.append(tuple(chunk))
  return groups, pools


@functools.lru_cache(maxsize=128)
def _plan(
  shapes: tuple[tuple[int, ...], ...],
  dtypes: tuple[Any, ...],
  multipliers: tuple[float, ...],
  layouts: tuple[int, ...],
  poolable: tuple[bool, ...],
) -> _Plan:
  """Which leaves each kernel reduces: the one-device plan, made per layout.

  ``layouts[i]`` numbers leaf i's layout (0, 1, ... in order of appearance);
  ``poolable[k]`` says whether layout k may be concatenated (replicated or on one
  device). One layout, poolable: exactly the plan of one device.
  """
  groups: list[tuple[int, ...]] = []
  pools: list[tuple[int, ...]] = []
  for layout, can_pool in enumerate(poolable):
    indices = [i for i, k in enumerate(layouts) if k == layout]
    more_groups, more_pools = _plan_layout(indices, shapes, dtypes, multipliers, can_pool)
    groups += more_groups
    pools += more_pools
  return _Plan(tuple(groups), tuple(pools))


def _tree_add(terms: Sequence[jax.Array]) -> jax.Array:
  """Pairwise sum (rounding error grows with log2 of the count, not the count)."""
  terms = list(terms)
  while len(terms) > 1:
    pairs = [lax.add(terms[k], terms[k + 1]) for k in range(0, len(terms) - 1, 2)]
    terms = pairs + terms[2 * len(pairs) :]
  return terms[0]


def _total(x: jax.Array) -> jax.Array:
  return lax.reduce_sum(x, tuple(range(x.ndim)))


def _scaled(x: jax.Array, c: float, acc: jnp.dtype) -> jax.Array:
  return x if c == 1.0 else lax.mul(x, np.asarray(c, acc))


def _values(elementwise: Elementwise, acc: jnp.dtype, x: jax.Array) -> jax.Array:
  return elementwise(x, acc).astype(acc)


def _tangents(
  elementwise: Elementwise, acc: jnp.dtype, x: jax.Array, dx: jax.Array
) -> tuple[float, jax.Array]:
  """(factor, t) with factor · t = f'(x)·dx elementwise."""
  slope = _SLOPES.get(elementwise)
  if slope is not None and not jnp.iscomplexobj(x):
    factor, fn = slope
    return factor, lax.mul(fn(x, acc), dx.astype(acc))
  return 1.0, jax.jvp(functools.partial(_values, elementwise, acc), (x,), (dx,))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _part(
  pooled: bool,
  elementwise: Elementwise,
  acc: jnp.dtype,
  multipliers: tuple[float, ...],
  xs: tuple[jax.Array, ...],
) -> jax.Array:
  """Σ_j c_j · Σ f(x_j) over one group (leaves of one shape) or one pool (one multiplier)."""
  if pooled:
    flat = lax.concatenate([lax.reshape(x, (x.size,)) for x in xs], 0)
    return _scaled(_total(_values(elementwise, acc, flat)), multipliers[0], acc)
  terms = [_values(elementwise, acc, x) for x in xs]
  if len(set(multipliers)) == 1:
    return _scaled(_total(_tree_add(terms)), multipliers[0], acc)
  return _total(_tree_add([_scaled(t, c, acc) for c, t in zip(multipliers, terms, strict=True)]))


@_part.defjvp
def _part_jvp(pooled, elementwise, acc, multipliers, primals, tangents):
  (xs,), (dxs,) = primals, tangents
  scales, terms = [], []
  for c, x, dx in zip(multipliers, xs, dxs, strict=True):
    factor, t = _tangents(elementwise, acc, x, dx)
    scales.append(c * factor)
    terms.append(t)
  if pooled:
    # Sums per leaf, not over a concatenation: their transpose is a broadcast
    # onto each leaf, so the backward pass copies nothing.
    tangent = _tree_add([_scaled(_total(t), s, acc) for s, t in zip(scales, terms, strict=True)])
  elif len(set(scales)) == 1:
    tangent = _scaled(_total(_tree_add(terms)), scales[0], acc)
  else:
    tangent = _total(_tree_add([_scaled(t, s, acc) for s, t in zip(scales, terms, strict=True)]))
  return _part(pooled, elementwise, acc, multipliers, xs), tangent


_part_jit = jax.jit(_part, static_argnums=(0, 1, 2, 3))


def weighted_sum(
  values: Sequence[Any],
  multipliers: Sequence[float],
  elementwise: Elementwise,
  acc: jnp.dtype,
) -> jax.Array:
  """Σ_j c_j · Σ_i elementwise(values_j)_i, accumulated in ``acc``.

  Differentiable to any order (forward and reverse mode) and batchable; the
  gradient with respect to ``values_j`` is c_j · f'(values_j) elementwise.

  Args:
    values: the selected leaves (arrays or Python numbers).
    multipliers: their static multipliers c_j (Python floats, > 0).
    elementwise: the per-element map, e.g. `squares`; it must map 0 to 0.
    acc: the accumulation dtype (float32 or float64).

  Returns:
    A 0-d array of dtype ``acc``; 0 when ``values`` is empty.

  Raises:
    ValueError: ``values`` and ``multipliers`` differ in length.

  Example:
    >>> weighted_sum([jnp.ones((2, 2)), 3.0], [1.0, 0.5], squares, jnp.float32)
    Array(8.5, dtype=float32)
  """
  xs = tuple(v if isinstance(v, jax.Array) else jnp.asarray(v) for v in values)
  cs = tuple(float(c) for c in multipliers)
  if len(xs) != len(cs):
    raise ValueError(
      f"`weighted_sum` takes one multiplier per value; got {len(xs)} values and "
      f"{len(cs)} multipliers."
    )
  acc = jnp.dtype(acc)
  if not xs:
    return jnp.zeros((), acc)
  shapes = tuple(tuple(x.shape) for x in xs)
  plan = _plan(shapes, tuple(x.dtype for x in xs), cs, *layouts(xs))
  parts = [
    _part_jit(pooled, elementwise, acc, tuple(cs[i] for i in kernel), tuple(xs[i] for i in kernel))
    for pooled, kernels in ((False, plan.groups), (True, plan.pools))
    for kernel in kernels
  ]
  return _tree_add(parts)
