"""The L2 penalty (λ / 2m) · Σ_j ‖W_j‖², its analytic gradient, and `regularized`.

Accumulation is in float32, or float64 when a selected leaf is 64-bit: bf16
and fp16 leaves are upcast before squaring, so weights of magnitude ~1000 in
fp16 (whose squares overflow fp16) give a finite, exact-to-float32 penalty.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2._checks import check_lam, check_m
from jaxl2._masks import MaskSpec, Selection, resolve
from jaxl2._reduce import squares, weighted_sum

__all__ = [
  "LeafGrad",
  "accumulation_dtype",
  "conj_upcast",
  "grad_tree",
  "l2_from_sq_norm",
  "l2_penalty",
  "l2_penalty_grad",
  "lam_over_m",
  "regularized",
  "sum_of_squares",
  "upcast",
  "weight_sq_norm",
]


_WIDE = frozenset({jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)})


def accumulation_dtype(selection: Selection) -> jnp.dtype:
  """float64 if any selected leaf is float64/complex128 and 64-bit is enabled, else float32.

  Python numbers count as float32 (JAX's weak types), so a stray ``1.0`` leaf
  does not switch a float32 model to float64 under ``jax_enable_x64``. NumPy
  float64 leaves with 64-bit disabled are computed in float32, as JAX computes
  everything then (asking for float64 would only warn and truncate).
  """
  for leaf, _ in selection.selected:
    dtype = getattr(leaf.value, "dtype", None)
    if dtype is not None and jnp.dtype(dtype) in _WIDE:
      return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
  return jnp.dtype(jnp.float32)


def sum_of_squares(selection: Selection, acc: jnp.dtype) -> jax.Array:
  """Σ_j c_j · ‖W_j‖² over the selected leaves, accumulated in ``acc``."""
  selected = selection.selected
  return weighted_sum([leaf.value for leaf, _ in selected], [c for _, c in selected], squares, acc)


def _concrete(value: Any) -> float | None:
  """A concrete scalar as a Python float (exact for any integer up to 2**53), or None."""
  if isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def lam_over_m(lam: Any, m: Any, acc: jnp.dtype, *, half: bool = False) -> jax.Array:
  """λ/m (λ/2m with ``half``) as a 0-d array of dtype ``acc``.

  Concrete values are divided in Python's float64 and rounded once, so an
  integer m of any size and type (a token count of 2·10¹², a NumPy int64 or
  uint64) is exact: never an int32 overflow or a wrap-around. A traced λ or m
  is cast to ``acc`` first.
  """
  lam_f, m_f = _concrete(lam), _concrete(m)
  denominator = 2.0 if half else 1.0
  if lam_f is not None and m_f is not None:
    return jnp.asarray(lam_f / (denominator * m_f), acc)
  lam_a = jnp.asarray(lam_f, acc) if lam_f is not None else jnp.asarray(lam).astype(acc)
  m_a = jnp.asarray(m_f, acc) if m_f is not None else jnp.asarray(m).astype(acc)
  return lam_a / (denominator * m_a)


def l2_from_sq_norm(sq_norm: jax.Array, lam: Any, m: Any) -> jax.Array:
  """(λ / 2m) · sq_norm in the dtype of ``sq_norm``: the one place the formula is written."""
  return lam_over_m(lam, m, sq_norm.dtype, half=True) * sq_norm


def weight_sq_norm(params: Any, *, mask: MaskSpec = None) -> jax.Array:
  r"""Σ_j c_j · ‖W_j‖² over the leaves selected by ``mask``: what L2 penalizes, before λ/2m.

  The quantity to log and plot against λ (a large λ drives it toward 0).

  Args:
    params: any pytree of arrays, as for `jaxl2.l2_penalty`.
    mask: as for `jaxl2.l2_penalty`.

  Returns:
    A 0-d float32 array (float64 if a selected leaf is 64-bit).

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> jaxl2.weight_sq_norm({"w": jnp.full((2, 2), 3.0), "b": jnp.ones(2)})
    Array(36., dtype=float32)
  """
  selection = resolve(params, mask)
  return sum_of_squares(selection, accumulation_dtype(selection))


def l2_penalty(params: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> jax.Array:
  r"""L2 penalty (λ / 2m) · Σ_j c_j ‖W_j‖² over the leaves selected by ``mask``.

  ``c_j`` is leaf j's multiplier from the mask (1 for a plain selection). For
  complex leaves ‖W‖² is Σ|w|². NaN in a selected weight gives NaN.

  Args:
    params: any pytree of arrays: Flax linen params, an NNX module or
      ``nnx.state(model, nnx.Param)``, nested dicts/lists/tuples. ``None``
      entries are skipped.
    lam: λ ≥ 0, the regularization strength. A Python, NumPy or JAX scalar;
      may be traced (`jax.jit`, `jax.vmap` over λ, `jax.grad` with respect to
      λ). Traced values cannot be checked here: a negative traced λ is only
      caught under `jax.experimental.checkify.checkify`.
    m: the number of training inputs (the training set, not the batch), > 0.
      May be traced, with the same caveat.
    mask: which leaves count, and with what multiplier; see `jaxl2.by_role`.
      Default: `jaxl2.by_role()`, the weight matrices of layers (kernels,
      token embeddings) by name, module and type, not biases or norm scales.

  Returns:
    A 0-d float32 array, float64 if a selected leaf is float64/complex128,
    whatever the dtypes of the leaves, ``lam`` and ``m``. Empty params give 0.

  Raises:
    TypeError: ``lam`` or ``m`` not a real scalar; a leaf that is not an
      array; a mask value that is not a bool/number; an integer leaf selected.
    ValueError: ``lam`` < 0, ``m`` ≤ 0, either non-finite or not 0-d; a mask
      that does not fit ``params`` or selects nothing.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    >>> jaxl2.l2_penalty(params, lam=0.5, m=4)
    Array(0.25, dtype=float32)
  """
  check_lam(lam)
  check_m(m)
  return l2_from_sq_norm(weight_sq_norm(params, mask=mask), lam, m)


# Maps one selected leaf W_j (in its own dtype), its anchor W₀_j (None but for
# L2-SP) and its coefficient (λ/m)·c_j to its gradient in the accumulation dtype.
LeafGrad = Callable[[jax.Array, Any, jax.Array], jax.Array]


def upcast(x: Any, acc: jnp.dtype) -> jax.Array:
  """``x`` in the accumulation precision: ``acc``, or its complex counterpart."""
  x = jnp.asarray(x)
  if jnp.iscomplexobj(x):
    return x.astype(jnp.complex128 if acc == jnp.float64 else jnp.complex64)
  return x.astype(acc)


def conj_upcast(value: jax.Array, acc: jnp.dtype) -> jax.Array:
  """w, or conj(w) for complex w: JAX's gradient of ½|w|²."""
  x = upcast(value, acc)
  return jnp.conj(x) if jnp.iscomplexobj(x) else x


def grad_tree(
  selection: Selection,
  scale: jax.Array,
  acc: jnp.dtype,
  leaf_grad: LeafGrad,
  anchors: list[Any] | None = None,
) -> Any:
  """``leaf_grad`` on the selected leaves (cast back to each leaf's dtype), zeros elsewhere.

  Zeros too at the second path of a shared NNX Variable (its gradient is at
  its first path) and None at an Equinox module's non-array fields.
  """
  anchors = anchors if anchors is not None else [None] * len(selection.leaves)
  out = []
  for leaf, ref, multiplier in zip(selection.leaves, anchors, selection.multipliers, strict=True):
    if leaf.not_array:  # An Equinox field such as an activation: None, as `eqx.filter_grad` gives.
      out.append(None)
      continue
    value = jnp.asarray(leaf.value)
    if multiplier == 0.0:
      # Not zeros_like: under jit with sharded (Auto-axis) params it comes back
      # replicated. A `where` on the leaf keeps its layout; XLA still only fills.
      out.append(jnp.where(jnp.zeros_like(value, dtype=bool), value, jnp.zeros((), value.dtype)))
      continue
    coef = scale if multiplier == 1.0 else scale * jnp.asarray(multiplier, acc)
    out.append(leaf_grad(value, ref, coef).astype(value.dtype))
  return jax.tree_util.tree_unflatten(selection.treedef, out)


def l2_penalty_grad(params: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> Any:
  r"""The analytic gradient of `l2_penalty`: (λ/m) · c_j · W_j, zeros elsewhere.

  For complex leaves the result follows JAX's convention for the gradient of
  a real function, (λ/m) · c_j · conj(W_j), so it equals
  ``jax.grad(l2_penalty)`` everywhere. Each leaf keeps its dtype.

  Args:
    params, lam, m, mask: as for `jaxl2.l2_penalty`.

  Returns:
    A pytree with the structure of ``params``.

  Raises:
    As `jaxl2.l2_penalty`.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> jaxl2.l2_penalty_grad({"w": jnp.ones((1, 2)), "b": jnp.ones(2)}, lam=0.5, m=4)
    {'b': Array([0., 0.], dtype=float32), 'w': Array([[0.125, 0.125]], dtype=float32)}
  """
  check_lam(lam)
  check_m(m)
  selection = resolve(params, mask)
  acc = accumulation_dtype(selection)
  scale = lam_over_m(lam, m, acc)
  return grad_tree(selection, scale, acc, lambda w, _, coef: coef * conj_upcast(w, acc))


def regularized(
  loss_fn: Callable[..., Any],
  lam: Any,
  m: Any,
  *,
  mask: MaskSpec = None,
  has_aux: bool = False,
) -> Callable[..., Any]:
  r"""Wraps ``loss_fn(params, *args)`` into ``loss_fn(params, *args) + l2_penalty(params, lam, m)``.

  Args:
    loss_fn: the data loss, ``loss_fn(params, *args, **kwargs) -> scalar``
      (or ``(scalar, aux)`` with ``has_aux=True``). It should be the *mean*
      over the batch, so that the penalty's 1/m keeps both on one scale.
    lam, m, mask: as for `jaxl2.l2_penalty`; checked here when concrete.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the penalty is added to
      ``loss`` and ``aux`` passed through, as `jax.value_and_grad` expects.

  Returns:
    A function with the signature of ``loss_fn``.

  Raises:
    TypeError: ``loss_fn`` is not callable; ``lam``/``m`` as `l2_penalty`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxl2
    >>> def mse(params, x, y):
    ...   return jnp.mean((x @ params["w"] - y) ** 2)
    >>> loss = jaxl2.regularized(mse, lam=0.1, m=100)
    >>> params = {"w": jnp.ones((3, 1))}
    >>> float(loss(params, jnp.zeros((5, 3)), jnp.zeros((5, 1))))  # 0.1/200 * 3
    0.0015000000...
  """
  if not callable(loss_fn):
    raise TypeError(
      f"`loss_fn` must be callable, as in `regularized(loss_fn, lam, m)`; got "
      f"{loss_fn!r} ({type(loss_fn).__name__}). Did you pass the loss value instead of "
      "the function?"
    )
  check_lam(lam)
  check_m(m)

  @functools.wraps(loss_fn)
  def wrapped(params: Any, *args: Any, **kwargs: Any) -> Any:
    out = loss_fn(params, *args, **kwargs)
    penalty = l2_penalty(params, lam, m, mask=mask)
    if has_aux:
      loss, aux = out
      return loss + penalty, aux
    return out + penalty

  return wrapped
