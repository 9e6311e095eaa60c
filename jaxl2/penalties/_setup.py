"""The steps every penalty shares, and the L2 formula, each written once.

A penalty checks λ and m, resolves the mask, picks the accumulation dtype and
computes λ/m (`setup`); sums an elementwise map over the selected leaves
(`selected_sum`); and builds its analytic gradient leaf by leaf (`grad_tree`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxl2.core._checks import check_lam, check_m, concrete
from jaxl2.core._dtypes import accumulation_dtype
from jaxl2.masks._masks import MaskSpec, Selection, resolve
from jaxl2.penalties._reduce import Elementwise, weighted_sum

__all__ = [
  "LeafGrad",
  "Setup",
  "grad_tree",
  "l2_from_sq_norm",
  "lam_over_m",
  "selected_sum",
  "setup",
]


def lam_over_m(lam: Any, m: Any, acc: Any = None, *, half: bool = False) -> Any:
  """λ/m (λ/2m with ``half``): the one place it is computed.

  Concrete values are divided in Python's float64 and rounded once, so an
  integer m of any size and type (a token count of 2·10¹², a NumPy int64 or
  uint64) is exact: never an int32 overflow or a wrap-around. With ``acc`` the
  result is a 0-d array of that dtype, and a traced λ or m is cast to ``acc``
  first; without it, a Python float (λ and m must then be concrete).
  """
  lam_f, m_f = concrete(lam), concrete(m)
  denominator = 2.0 if half else 1.0
  if lam_f is not None and m_f is not None:
    ratio = lam_f / (denominator * m_f)
    return ratio if acc is None else jnp.asarray(ratio, acc)
  if acc is None:
    raise TypeError("`lam_over_m` without `acc` needs concrete `lam` and `m`.")
  lam_a = jnp.asarray(lam_f, acc) if lam_f is not None else jnp.asarray(lam).astype(acc)
  m_a = jnp.asarray(m_f, acc) if m_f is not None else jnp.asarray(m).astype(acc)
  return lam_a / (denominator * m_a)


def l2_from_sq_norm(sq_norm: Any, lam: Any, m: Any) -> Any:
  """(λ / 2m) · sq_norm: the one place the L2 formula is written.

  A JAX array keeps its dtype; a Python or NumPy float gives a Python float
  (computed in float64).
  """
  acc = sq_norm.dtype if isinstance(sq_norm, jax.Array) else None
  return lam_over_m(lam, m, acc, half=True) * sq_norm


class Setup(NamedTuple):
  """What a penalty needs once its arguments are checked."""

  selection: Selection
  acc: jnp.dtype  # the accumulation dtype
  scale: jax.Array  # λ/m in ``acc``


def setup(params: Any, lam: Any, m: Any, mask: MaskSpec) -> Setup:
  """Checks λ and m, resolves the mask, and returns the selection, its dtype and λ/m."""
  check_lam(lam)
  check_m(m)
  selection = resolve(params, mask)
  acc = accumulation_dtype(leaf.value for leaf, _ in selection.selected)
  return Setup(selection, acc, lam_over_m(lam, m, acc))


def selected_sum(selection: Selection, elementwise: Elementwise, acc: jnp.dtype) -> jax.Array:
  """Σ_j c_j · Σ_i elementwise(W_j)_i over the selected leaves, accumulated in ``acc``."""
  selected = selection.selected
  return weighted_sum(
    [leaf.value for leaf, _ in selected], [c for _, c in selected], elementwise, acc
  )


# Maps one selected leaf W_j (in its own dtype), its anchor W₀_j (None but for
# L2-SP) and its coefficient (λ/m)·c_j to its gradient in the accumulation dtype.
LeafGrad = Callable[[jax.Array, Any, jax.Array], jax.Array]


def grad_tree(
  selection: Selection,
  scale: jax.Array,
  acc: jnp.dtype,
  leaf_grad: LeafGrad,
  anchors: list[Any] | None = None,
  *,
  zeros: bool = True,
) -> Any:
  """``leaf_grad`` on the selected leaves (cast back to each leaf's dtype), zeros elsewhere.

  Zeros too at the second path of a shared NNX Variable (its gradient is at
  its first path) and None at an Equinox module's non-array fields. With
  ``zeros=False``, None instead of each zero leaf: for a transform that adds
  the gradient to its updates, nothing to trace, lower or compile there.
  """
  anchors = anchors if anchors is not None else [None] * len(selection.leaves)
  out = []
  for leaf, ref, multiplier in zip(selection.leaves, anchors, selection.multipliers, strict=True):
    if leaf.not_array:  # An Equinox field such as an activation: None, as `eqx.filter_grad` gives.
      out.append(None)
      continue
    value = jnp.asarray(leaf.value)
    if multiplier == 0.0 and not zeros:
      out.append(None)
      continue
    if multiplier == 0.0:
      # Not zeros_like: under jit with sharded (Auto-axis) params it comes back
      # replicated. A `where` on the leaf keeps its layout; XLA still only fills.
      out.append(jnp.where(jnp.zeros_like(value, dtype=bool), value, jnp.zeros((), value.dtype)))
      continue
    coef = scale if multiplier == 1.0 else scale * jnp.asarray(multiplier, acc)
    out.append(leaf_grad(value, ref, coef).astype(value.dtype))
  return jax.tree_util.tree_unflatten(selection.treedef, out)
