"""Weighted sums of per-leaf reductions: Σ_j c_j · Σ_i f(W_j)_i.

Every penalty is such a sum (f = square for L2, abs for L1), so the reduction
strategy lives here, tuned so that no tree compiles or runs slower than the
per-leaf sum a user would write (what was tried, and the figures:
``bench/NOTES.md``). The plan sorts leaves by size and count:

* Leaves of ``2**14`` elements or more, and of ``2**12`` or more when fewer
  than 64 leaves share their shape, are reduced one by one, each read once
  and never copied: exactly the reductions of the per-leaf sum. For L2 each is
  the leaf contracted with itself (what ``jnp.vdot`` emits, and what XLA
  compiles fastest), and all of them are one traced kernel, so a tree of
  hundreds of large leaves costs no more to compile than the per-leaf sum.
* Smaller leaves are compile-bound: XLA's compile time grows faster than the
  number of separate reductions (~20 s for 2,000 of them). Where 64 or more
  share a shape, they are summed elementwise, 16 to a kernel (32 where 256 or
  more share it), and the sum reduced once (no copy; equal kernels compile
  once). The others are flattened, concatenated (a copy of small leaves only)
  and reduced once per dtype and multiplier, at most 256 to a pool.

Each kernel is a jitted `jax.custom_jvp` function, so identical kernels are
traced, linearized and transposed once, and the backward pass of L2 is
``2·c_j·ct·W_j``: one multiply per element, which XLA fuses into the update.

Several devices. Leaves laid out differently never share a kernel, or it would
move weights between devices: the plan above is made for each *layout* on its
own (`jaxl2.penalties._layouts`: what a layout is, and what that guarantees). Within a
layout, groups are made as on one device, pools only where the layout is
poolable (replicated or on one device), and the other leaves are reduced one
by one (a local reduction, then a scalar all-reduce).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
from jax import lax

from jaxl2.core._dtypes import upcast
from jaxl2.penalties._layouts import layouts

_JAXLIB = tuple(int(n) for n in re.findall(r"\d+", jaxlib.version.__version__)[:3])

__all__ = ["Elementwise", "abs_values", "squares", "weighted_sum"]

Elementwise = Callable[[jax.Array, jnp.dtype], jax.Array]

_LARGE = 1 << 14  # Leaves with at least this many elements are reduced one by one.
# Leaves with at least this many elements are never concatenated: XLA CPU hands
# their reductions to its YNN library kernel (no code to compile); smaller ones
# get an LLVM loop kernel each, dearer than a copy into a pool.
_UNPOOLED = 1 << 12
_MIN_GROUP = 64  # Fewer small leaves of one shape than this are pooled instead.
# Small leaves of one shape summed elementwise in one kernel, at most: 32 where
# 256 or more share the shape, else 16. XLA's LLVM time for a group kernel grows
# with its inputs (~0.1 s at 32, half that at 16; equal kernels compile once):
# at 64 leaves, groups of 32 compile slower than 64 separate reductions.
_GROUP, _SMALL_GROUP, _MANY = 32, 16, 256
_POOL_LEAVES = 256  # Leaves per concatenation (and per kernel of single leaves), at most.


def squares(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  """|x|² elementwise in ``acc`` (real² + imag² for complex ``x``)."""
  # `lax`, not `jnp`: traced once per leaf, and jnp's dispatch costs more than the op.
  if jnp.iscomplexobj(x):
    re = lax.convert_element_type(lax.real(x), acc)
    im = lax.convert_element_type(lax.imag(x), acc)
    return lax.add(lax.mul(re, re), lax.mul(im, im))
  x = lax.convert_element_type(x, acc)
  return lax.mul(x, x)


def abs_values(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  """|x| elementwise in ``acc`` (the modulus for complex ``x``)."""
  return jnp.abs(upcast(x, acc))


# For real x, f'(x)·dx = factor · slope(x) · dx: a single multiply per element
# in the tangent and in its transpose (the gradient). Other maps use `jax.jvp`.
_SLOPES: dict[Callable[..., Any], tuple[float, Elementwise]] = {
  squares: (2.0, lambda x, acc: lax.convert_element_type(x, acc)),
}


# Kernel kinds. Leaves reduced one by one, any shapes: on one device (or
# replicated), and sharded (reduced where each shard lies). A group of one
# shape, summed elementwise then reduced. A pool of one dtype and multiplier,
# concatenated.
_SINGLES, _SHARDED, _GROUPED, _POOLED = "singles", "sharded singles", "group", "pool"


class _Kernel(NamedTuple):
  kind: str
  leaves: tuple[int, ...]


def _size(shape: tuple[int, ...]) -> int:
  return int(np.prod(shape, dtype=np.int64))


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
) -> list[_Kernel]:
  """The kernels of the leaves ``indices`` (one layout)."""
  singles: list[int] = []
  groups: list[tuple[int, ...]] = []
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for i in indices:
    if _size(shapes[i]) >= _LARGE:
      singles.append(i)
    else:
      by_shape.setdefault(shapes[i], []).append(i)
  rare: dict[tuple[Any, float], list[int]] = {}
  for shape, same in by_shape.items():
    if len(same) >= _MIN_GROUP:
      groups.extend(_chunks(same, _GROUP if len(same) >= _MANY else _SMALL_GROUP))
    elif poolable and _size(shape) < _UNPOOLED:
      for i in same:
        rare.setdefault((dtypes[i], multipliers[i]), []).append(i)
    else:
      singles.extend(same)
  pools = [kernel for same in rare.values() for kernel in _chunks(sorted(same), _POOL_LEAVES)]
  alone = _chunks(sorted(singles), _POOL_LEAVES) if singles else []
  return [
    *(_Kernel(_SINGLES if poolable else _SHARDED, kernel) for kernel in alone),
    *(_Kernel(_GROUPED, kernel) for kernel in groups),
    *(_Kernel(_POOLED, kernel) for kernel in pools),
  ]


@functools.lru_cache(maxsize=128)
def _plan(
  shapes: tuple[tuple[int, ...], ...],
  dtypes: tuple[Any, ...],
  multipliers: tuple[float, ...],
  layouts: tuple[int, ...],
  poolable: tuple[bool, ...],
) -> tuple[_Kernel, ...]:
  """Which leaves each kernel reduces: the one-device plan, made per layout.

  ``layouts[i]`` numbers leaf i's layout (0, 1, ... in order of appearance);
  ``poolable[k]`` says whether layout k may be concatenated (replicated or on one
  device). One layout, poolable: exactly the plan of one device.
  """
  return tuple(
    kernel
    for layout, can_pool in enumerate(poolable)
    for kernel in _plan_layout(
      [i for i, k in enumerate(layouts) if k == layout], shapes, dtypes, multipliers, can_pool
    )
  )


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


def _reduced(elementwise: Elementwise, acc: jnp.dtype, x: jax.Array) -> jax.Array:
  """Σ_i f(x)_i for one leaf, wherever its shards lie: a local reduction, then a scalar."""
  return _total(_values(elementwise, acc, x))


def _dot_is_a_reduction() -> bool:
  """Whether XLA compiles a leaf's dot with itself to a sum of squares' multiply and reduction.

  Measured on CPU from jaxlib 0.10.2. Earlier jaxlibs keep it a dot, which
  accumulates in sequence: 1e-4 relative off on a million float32 elements,
  against 1e-7 for the reduction. Other backends were not measured, and a
  TPU's default float32 dot is one bfloat16 pass. Everywhere else the leaf is
  squared and reduced.
  """
  return _JAXLIB >= (0, 10, 2) and jax.default_backend() == "cpu"


def _leaf_total(elementwise: Elementwise, acc: jnp.dtype, x: jax.Array) -> jax.Array:
  """Σ_i f(x)_i for one unsharded leaf; for L2 of a real leaf, the dot of x with itself.

  XLA compiles that dot to the same multiply and reduction as a sum of
  squares, and compiles it faster: a dot carries no reduction body for XLA to
  convert and deduplicate, leaf after leaf (it is what ``jnp.vdot`` emits). Only
  for leaves on one device or replicated: on sharded axes the dot would need
  an output sharding, or gather the leaf.
  """
  if elementwise is squares and not jnp.iscomplexobj(x) and _dot_is_a_reduction():
    x = lax.convert_element_type(x, acc)
    axes = tuple(range(x.ndim))
    return lax.dot_general(x, x, ((axes, axes), ((), ())), preferred_element_type=acc)
  return _reduced(elementwise, acc, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _part(
  kind: str,
  elementwise: Elementwise,
  acc: jnp.dtype,
  multipliers: tuple[float, ...],
  xs: tuple[jax.Array, ...],
) -> jax.Array:
  """Σ_j c_j · Σ f(x_j) over one kernel of the plan (``kind``: `_Kernel`)."""
  if kind in (_SINGLES, _SHARDED):
    total = _leaf_total if kind == _SINGLES else _reduced
    totals = [total(elementwise, acc, x) for x in xs]
    return _tree_add([_scaled(t, c, acc) for c, t in zip(multipliers, totals, strict=True)])
  if kind == _POOLED:
    # Leaves as rows of one, joined along the minor axis: XLA CPU copies such a
    # concatenation with memcpy instead of fusing it into a kernel of its own
    # (it fuses a concatenation of up to 8 operands along a vector: ~30 ms of
    # LLVM per pool).
    flat = lax.concatenate([lax.reshape(x, (1, x.size)) for x in xs], 1)
    return _scaled(_total(_values(elementwise, acc, flat)), multipliers[0], acc)
  terms = [_values(elementwise, acc, x) for x in xs]
  if len(set(multipliers)) == 1:
    return _scaled(_total(_tree_add(terms)), multipliers[0], acc)
  return _total(_tree_add([_scaled(t, c, acc) for c, t in zip(multipliers, terms, strict=True)]))


@_part.defjvp
def _part_jvp(kind, elementwise, acc, multipliers, primals, tangents):
  (xs,), (dxs,) = primals, tangents
  scales, terms = [], []
  for c, x, dx in zip(multipliers, xs, dxs, strict=True):
    factor, t = _tangents(elementwise, acc, x, dx)
    scales.append(c * factor)
    terms.append(t)
  if kind != _GROUPED:
    # Sums per leaf, never over a concatenation: their transpose is a broadcast
    # onto each leaf, so the backward pass copies nothing.
    tangent = _tree_add([_scaled(_total(t), s, acc) for s, t in zip(scales, terms, strict=True)])
  elif len(set(scales)) == 1:
    tangent = _scaled(_total(_tree_add(terms)), scales[0], acc)
  else:
    tangent = _total(_tree_add([_scaled(t, s, acc) for s, t in zip(scales, terms, strict=True)]))
  return _part_jit(kind, elementwise, acc, multipliers, xs), tangent


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
    _part_jit(kind, elementwise, acc, tuple(cs[i] for i in leaves), tuple(xs[i] for i in leaves))
    for kind, leaves in plan
  ]
  return _tree_add(parts)
