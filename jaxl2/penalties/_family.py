"""The penalty family beyond plain L2: L1, elastic net and L2-SP, with analytic gradients.

Each penalty follows `jaxl2.l2_penalty`'s conventions: the same mask resolver
and validation, accumulation in float32 (float64 when a selected leaf of
``params`` is 64-bit) with bf16/fp16 leaves upcast before the elementwise op,
and ``lam``, ``m`` (and ``l1_ratio``) may be traced.

A leaf's mask multiplier c_j multiplies that leaf's whole term: both the L1
and the L2 part of the elastic net, and ‖W_j − W₀_j‖² for L2-SP.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxl2.core._checks import check_real_scalar
from jaxl2.core._dtypes import ARRAY_TYPES, conj_upcast, upcast
from jaxl2.core._paths import Leaf, flatten
from jaxl2.masks._masks import MaskSpec, Selection
from jaxl2.penalties._reduce import abs_values, squares, weighted_sum
from jaxl2.penalties._setup import Setup, grad_tree, l2_from_sq_norm, selected_sum, setup

__all__ = [
  "anchor_values",
  "elastic_net_penalty",
  "elastic_net_penalty_grad",
  "l1_penalty",
  "l1_penalty_grad",
  "l2_sp_penalty",
  "l2_sp_penalty_grad",
]


def _abs_grad(value: jax.Array, acc: jnp.dtype) -> jax.Array:
  """∂|w|/∂w exactly as `jax.grad` of `jnp.abs` computes it, in the accumulation dtype.

  Real w: +1 where w ≥ 0 (so +1 at w = 0 and at -0.0), else -1 (NaN included).
  Complex w: conj(w)/|w|, and 0 at w = 0.
  """
  x = upcast(value, acc)
  if jnp.iscomplexobj(x):
    modulus = jnp.abs(x)
    return jnp.conj(x) / jnp.where(modulus == 0, 1, modulus).astype(x.dtype)
  return jnp.where(x >= 0, 1, -1).astype(acc)


# ---- L1 --------------------------------------------------------------------------


def l1_penalty(params: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> jax.Array:
  r"""L1 penalty (λ / m) · Σ_j c_j Σ_i |W_j,i| over the leaves selected by ``mask``.

  ``c_j`` is leaf j's multiplier from the mask (1 for a plain selection). For
  complex leaves |w| is the modulus. NaN in a selected weight gives NaN.

  Args:
    params: any pytree of arrays, as for `jaxl2.l2_penalty`.
    lam: λ ≥ 0, the regularization strength. May be traced (then only checked
      under `jax.experimental.checkify.checkify`).
    m: the number of training inputs (the training set, not the batch), > 0.
      May be traced.
    mask: which leaves count, and with what multiplier; see `jaxl2.by_role`.
      Default: `jaxl2.by_role()`, the weight matrices of layers (kernels,
      token embeddings) by name, module and type, not biases or norm scales.

  Returns:
    A 0-d float32 array, float64 if a selected leaf is float64/complex128.

  Raises:
    TypeError: ``lam`` or ``m`` not a real scalar; a leaf that is not an
      array; a mask value that is not a bool/number; an integer leaf selected.
    ValueError: ``lam`` < 0, ``m`` ≤ 0, either non-finite or not 0-d; a mask
      that does not fit ``params`` or selects nothing.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.ones(2)}
    >>> jaxl2.l1_penalty(params, lam=0.5, m=4)
    Array(0.375, dtype=float32)
  """
  selection, acc, scale = setup(params, lam, m, mask)
  return scale * selected_sum(selection, abs_values, acc)


def l1_penalty_grad(params: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> Any:
  r"""The analytic gradient of `l1_penalty`: (λ/m) · c_j · sign(W_j), zeros elsewhere.

  |w| has no derivative at w = 0; this helper returns what ``jax.grad`` of
  ``jnp.abs`` returns there, **+1**, so at w = 0 (and at -0.0) the gradient is
  +(λ/m)·c_j, not 0. A NaN weight gets -(λ/m)·c_j, as with ``jax.grad``. For
  complex leaves it is (λ/m)·c_j·conj(w)/|w|, and 0 at w = 0. So it equals
  ``jax.grad(l1_penalty)`` everywhere. Each leaf keeps its dtype.

  Args:
    params, lam, m, mask: as for `jaxl2.l1_penalty`.

  Returns:
    A pytree with the structure of ``params``.

  Raises:
    As `jaxl2.l1_penalty`.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> jaxl2.l1_penalty_grad({"w": jnp.array([[-2.0, 0.0, 3.0]])}, lam=1.0, m=4)
    {'w': Array([[-0.25,  0.25,  0.25]], dtype=float32)}
  """
  selection, acc, scale = setup(params, lam, m, mask)
  return grad_tree(selection, scale, acc, lambda w, _, coef: coef * _abs_grad(w, acc))


# ---- elastic net -------------------------------------------------------------------

_L1_RATIO_RULE = "`l1_ratio` must be a number in [0, 1]; got {}."


def _check_l1_ratio(l1_ratio: Any) -> None:
  """ρ: a real scalar in [0, 1]; when traced, the range rule goes to checkify."""
  check_real_scalar(l1_ratio, "l1_ratio")
  if isinstance(l1_ratio, jax.core.Tracer):
    checkify.debug_check((l1_ratio >= 0) & (l1_ratio <= 1), _L1_RATIO_RULE, l1_ratio)
    return
  value = float(l1_ratio)
  if math.isnan(value) or not 0.0 <= value <= 1.0:
    raise ValueError(
      _L1_RATIO_RULE.format(repr(value))
      + " It is the L1 share: 0 gives `jaxl2.l2_penalty`, 1 gives `jaxl2.l1_penalty`."
    )


def elastic_net_penalty(
  params: Any, lam: Any, m: Any, *, l1_ratio: Any, mask: MaskSpec = None
) -> jax.Array:
  r"""Elastic net (λ / m) · Σ_j c_j [ρ · Σ|W_j| + ((1 − ρ) / 2) · ‖W_j‖²], ρ = ``l1_ratio``.

  ρ = 0 gives `jaxl2.l2_penalty` and ρ = 1 gives `jaxl2.l1_penalty` (to
  rounding). The multiplier ``c_j`` scales both parts of leaf j's term.

  Args:
    params, lam, m, mask: as for `jaxl2.l2_penalty`.
    l1_ratio: ρ ∈ [0, 1], the share of L1. A real scalar; may be traced (then
      its range is only checked under `jax.experimental.checkify.checkify`).

  Returns:
    A 0-d float32 array, float64 if a selected leaf is float64/complex128.

  Raises:
    TypeError: ``l1_ratio``, ``lam`` or ``m`` not a real scalar; leaves and
      mask as for `jaxl2.l2_penalty`.
    ValueError: ``l1_ratio`` outside [0, 1] or NaN; ``lam``, ``m`` and mask as
      for `jaxl2.l2_penalty`.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> params = {"w": jnp.array([[1.0, -2.0]])}
    >>> jaxl2.elastic_net_penalty(params, lam=1.0, m=2, l1_ratio=0.5)  # 0.5·(0.5·3 + 0.25·5)
    Array(1.375, dtype=float32)
  """
  _check_l1_ratio(l1_ratio)
  selection, acc, scale = setup(params, lam, m, mask)
  rho = jnp.asarray(l1_ratio).astype(acc)
  l1, l2 = selected_sum(selection, abs_values, acc), selected_sum(selection, squares, acc)
  return scale * rho * l1 + l2_from_sq_norm((1 - rho) * l2, lam, m)


def elastic_net_penalty_grad(
  params: Any, lam: Any, m: Any, *, l1_ratio: Any, mask: MaskSpec = None
) -> Any:
  r"""The analytic gradient of `elastic_net_penalty`: (λ/m)·c_j·[ρ·sign(W_j) + (1 − ρ)·W_j].

  sign(w) is as in `jaxl2.l1_penalty_grad` (+1 at w = 0, as ``jax.grad``
  gives), and W_j is conjugated for complex leaves, so this equals
  ``jax.grad(elastic_net_penalty)``. Zeros on unselected leaves; each leaf
  keeps its dtype.

  Args:
    params, lam, m, l1_ratio, mask: as for `jaxl2.elastic_net_penalty`.

  Returns:
    A pytree with the structure of ``params``.

  Raises:
    As `jaxl2.elastic_net_penalty`.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> jaxl2.elastic_net_penalty_grad({"w": jnp.array([[-2.0, 4.0]])}, 1.0, 2, l1_ratio=0.5)
    {'w': Array([[-0.75,  1.25]], dtype=float32)}
  """
  _check_l1_ratio(l1_ratio)
  selection, acc, scale = setup(params, lam, m, mask)
  rho = jnp.asarray(l1_ratio).astype(acc)

  def leaf_grad(w: jax.Array, _: Any, coef: jax.Array) -> jax.Array:
    return coef * (rho * _abs_grad(w, acc) + (1 - rho) * conj_upcast(w, acc))

  return grad_tree(selection, scale, acc, leaf_grad)


# ---- L2-SP -------------------------------------------------------------------------

_ANCHOR_FIX = (
  "`anchor` must be the starting (pretrained) weights of the same model, with the "
  "structure and shapes of `params`, e.g. a copy of `params` taken before fine-tuning."
)


def _structure_error(selection: Selection, anchor_leaves: list[Leaf], anchor_def: Any) -> str:
  """Where ``anchor`` first departs from ``params``: a path, or the two containers."""
  params_paths = [leaf.path for leaf in selection.leaves]
  anchor_paths = [leaf.path for leaf in anchor_leaves]
  for i in range(max(len(params_paths), len(anchor_paths))):
    p = repr(params_paths[i]) if i < len(params_paths) else "no further leaf"
    a = repr(anchor_paths[i]) if i < len(anchor_paths) else "no further leaf"
    if p != a:
      where = f"`params` has {p} where `anchor` has {a}"
      return f"`anchor` and `params` differ in structure at leaf {i}: {where}. {_ANCHOR_FIX}"
  return (
    "`anchor` and `params` have the same leaf paths but different containers (for Flax NNX, "
    "pass two modules or two `nnx.state(model, nnx.Param)`, not one of each).\n"
    f"  params: {selection.treedef}\n  anchor: {anchor_def}\n{_ANCHOR_FIX}"
  )


def anchor_values(selection: Selection, anchor: Any) -> list[Any]:
  """The anchor's leaves, paired with ``selection.leaves`` by position after checking."""
  anchor_leaves, anchor_def = flatten(anchor)
  if anchor_def != selection.treedef:
    raise ValueError(_structure_error(selection, anchor_leaves, anchor_def))
  for leaf, ref in zip(selection.leaves, anchor_leaves, strict=True):
    if not isinstance(ref.value, ARRAY_TYPES):
      raise TypeError(
        f"`anchor` leaf at {ref.path!r} is a {type(ref.value).__name__} ({ref.value!r:.60}); "
        f"anchor leaves must be arrays or numbers. {_ANCHOR_FIX}"
      )
    if np.shape(ref.value) != np.shape(leaf.value):
      raise ValueError(
        f"`anchor` leaf at {ref.path!r} has shape {np.shape(ref.value)} but the `params` leaf "
        f"has shape {np.shape(leaf.value)}. {_ANCHOR_FIX}"
      )
    if jnp.iscomplexobj(ref.value) and not jnp.iscomplexobj(leaf.value):
      raise TypeError(
        f"`anchor` leaf at {ref.path!r} is complex but the `params` leaf is real; casting "
        f"would drop the imaginary part. {_ANCHOR_FIX}"
      )
  return [ref.value for ref in anchor_leaves]


def _l2_sp_setup(
  params: Any, anchor: Any, lam: Any, m: Any, mask: MaskSpec
) -> tuple[Setup, list[Any]]:
  """`setup`, plus the checked anchor leaves in the order of ``selection.leaves``."""
  prepared = setup(params, lam, m, mask)
  return prepared, anchor_values(prepared.selection, anchor)


def l2_sp_penalty(
  params: Any, anchor: Any, lam: Any, m: Any, *, mask: MaskSpec = None
) -> jax.Array:
  r"""L2-SP penalty (λ / 2m) · Σ_j c_j ‖W_j − W₀_j‖², toward the starting point W₀ = ``anchor``.

  For fine-tuning: instead of pulling weights toward zero as `jaxl2.l2_penalty`
  does, it keeps them near pretrained weights (Li et al., 2018, "Explicit
  inductive bias for transfer learning"). ``l2_sp_penalty(params, zeros, ...)``
  equals ``l2_penalty(params, ...)`` (to rounding), and
  ``l2_sp_penalty(params, params, ...)`` is exactly 0.

  The mask is resolved on ``params``; anchor leaves are paired with params
  leaves by position once structure and shapes are checked, and cast to the
  accumulation dtype (set by ``params``) before the difference is taken, so
  bf16/fp16 weights lose nothing in W − W₀. The anchor is a constant: its
  gradient is not needed, but may be taken.

  Args:
    params: the weights being trained, any pytree of arrays (as for
      `jaxl2.l2_penalty`).
    anchor: W₀, a pytree with the structure and leaf shapes of ``params``
      (e.g. a copy of the pretrained ``params``). May be traced.
    lam, m, mask: as for `jaxl2.l2_penalty`.

  Returns:
    A 0-d float32 array, float64 if a selected leaf of ``params`` is
    float64/complex128.

  Raises:
    TypeError: an ``anchor`` leaf that is not an array, or complex where the
      ``params`` leaf is real; ``lam``, ``m``, leaves and mask as for
      `jaxl2.l2_penalty`.
    ValueError: ``anchor`` with another structure or leaf shape than
      ``params`` (the message names the first differing path); ``lam``, ``m``
      and mask as for `jaxl2.l2_penalty`.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> params, anchor = {"w": jnp.array([[1.0, 2.0]])}, {"w": jnp.array([[1.0, 0.0]])}
    >>> jaxl2.l2_sp_penalty(params, anchor, lam=1.0, m=2)
    Array(1., dtype=float32)
  """
  (selection, acc, _), anchors = _l2_sp_setup(params, anchor, lam, m, mask)
  diffs, multipliers = [], []
  for leaf, ref, multiplier in zip(selection.leaves, anchors, selection.multipliers, strict=True):
    if multiplier != 0.0:
      diffs.append(upcast(leaf.value, acc) - upcast(ref, acc))
      multipliers.append(multiplier)
  return l2_from_sq_norm(weighted_sum(diffs, multipliers, squares, acc), lam, m)


def l2_sp_penalty_grad(params: Any, anchor: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> Any:
  r"""The analytic gradient of `l2_sp_penalty`: (λ/m) · c_j · (W_j − W₀_j), zeros elsewhere.

  Conjugated for complex leaves (JAX's convention), so it equals
  ``jax.grad(l2_sp_penalty)`` with respect to ``params``. Each leaf keeps its
  dtype; the difference is taken in the accumulation dtype first.

  Args:
    params, anchor, lam, m, mask: as for `jaxl2.l2_sp_penalty`.

  Returns:
    A pytree with the structure of ``params``.

  Raises:
    As `jaxl2.l2_sp_penalty`.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> params, anchor = {"w": jnp.array([[1.0, 2.0]])}, {"w": jnp.array([[1.0, 0.0]])}
    >>> jaxl2.l2_sp_penalty_grad(params, anchor, lam=1.0, m=2)
    {'w': Array([[0., 1.]], dtype=float32)}
  """
  (selection, acc, scale), anchors = _l2_sp_setup(params, anchor, lam, m, mask)

  def leaf_grad(w: jax.Array, w0: Any, coef: jax.Array) -> jax.Array:
    return coef * (conj_upcast(w, acc) - conj_upcast(w0, acc))

  return grad_tree(selection, scale, acc, leaf_grad, anchors)
