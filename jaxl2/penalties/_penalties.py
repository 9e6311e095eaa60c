"""The L2 penalty (λ / 2m) · Σ_j ‖W_j‖², its analytic gradient, and `regularized`.

Accumulation is in float32, or float64 when a selected leaf is 64-bit, with
bf16/fp16 leaves upcast before squaring (`jaxl2.core._dtypes`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jaxl2.core._checks import check_callable, check_m
from jaxl2.core._dtypes import accumulation_dtype, conj_upcast
from jaxl2.masks._masks import MaskSpec, resolve
from jaxl2.penalties._lam_groups import (
  check_lam_or_groups,
  group_penalty,
  group_penalty_grad,
  is_grouped,
)
from jaxl2.penalties._reduce import squares
from jaxl2.penalties._setup import grad_tree, l2_from_sq_norm, selected_sum, setup

__all__ = ["l2_decay", "l2_penalty", "l2_penalty_grad", "regularized", "weight_sq_norm"]


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
  acc = accumulation_dtype(leaf.value for leaf, _ in selection.selected)
  return selected_sum(selection, squares, acc)


def l2_penalty(params: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> jax.Array:
  r"""L2 penalty (λ / 2m) · Σ_j c_j ‖W_j‖² over the leaves selected by ``mask``.

  ``c_j`` is leaf j's multiplier from the mask (1 for a plain selection). For
  complex leaves ‖W‖² is Σ|w|². NaN in a selected weight gives NaN.

  One λ per group: ``lam={pattern: λ_g, ...}`` gives Σ_g (λ_g / 2m) · Σ_{j ∈ g}
  c_j ‖W_j‖², group g the selected leaves whose path the pattern fully
  matches (`re.fullmatch`, the first matching pattern wins, as
  `jaxl2.by_regex`); the mask still selects the leaves and gives c_j.

  Args:
    params: any pytree of arrays: Flax linen params, an NNX module or
      ``nnx.state(model, nnx.Param)``, nested dicts/lists/tuples. ``None``
      entries are skipped.
    lam: λ ≥ 0, the regularization strength. A Python, NumPy or JAX scalar;
      may be traced (`jax.jit`, `jax.vmap` over λ, `jax.grad` with respect to
      λ). Traced values cannot be checked here: a negative traced λ is only
      caught under `jax.experimental.checkify.checkify`. Or a ``{pattern:
      λ_g}`` dict, one λ per group (each λ_g as λ). Every selected leaf must
      match a pattern and every pattern take a leaf. Patterns are tried in
      the dict's order: a dict passed through `jax.jit` as an argument comes
      back with sorted keys, so where patterns overlap, close over it.
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
      that does not fit ``params`` or selects nothing; a selected leaf that no
      pattern of a ``lam`` dict matches, or a pattern that gets no leaf.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    >>> jaxl2.l2_penalty(params, lam=0.5, m=4)
    Array(0.25, dtype=float32)

    One λ per group (here each group one kernel): (1/8)·4 + (2/8)·2.

    >>> layers = {"dense1": {"kernel": jnp.ones((2, 2))}, "dense2": {"kernel": jnp.ones((2, 1))}}
    >>> jaxl2.l2_penalty(layers, lam={"dense1/.*": 1.0, "dense2/.*": 2.0}, m=4)
    Array(1., dtype=float32)
  """
  if is_grouped(lam):
    return group_penalty(params, lam, m, mask)
  selection, acc, _ = setup(params, lam, m, mask)
  return l2_from_sq_norm(selected_sum(selection, squares, acc), lam, m)


def l2_penalty_grad(params: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> Any:
  r"""The analytic gradient of `l2_penalty`: (λ/m) · c_j · W_j, zeros elsewhere.

  For complex leaves the result follows JAX's convention for the gradient of
  a real function, (λ/m) · c_j · conj(W_j), so it equals
  ``jax.grad(l2_penalty)`` everywhere. Each leaf keeps its dtype. With
  ``lam={pattern: λ_g}`` a leaf of group g gets (λ_g/m) · c_j · W_j.

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
    >>> jaxl2.l2_penalty_grad({"a": jnp.ones(1), "b": jnp.ones(1)}, {"a": 4.0, "b": 8.0}, 4,
    ...   mask=jaxl2.all_floating)
    {'a': Array([1.], dtype=float32), 'b': Array([2.], dtype=float32)}
  """
  if is_grouped(lam):
    return group_penalty_grad(params, lam, m, mask)
  selection, acc, scale = setup(params, lam, m, mask)
  return grad_tree(selection, scale, acc, lambda w, _, coef: coef * conj_upcast(w, acc))


def l2_decay(params: Any, lam: Any, m: Any, *, mask: MaskSpec = None) -> Any:
  """`l2_penalty_grad` with None in place of its zero leaves: what `jaxl2.add_l2_grad` adds.

  Unselected leaves get no array at all, so a transform adding this to its
  updates traces, lowers and compiles nothing for them (a tree of zeros would
  cost a fill and an add per leaf until XLA simplified them away).
  """
  selection, acc, scale = setup(params, lam, m, mask)
  return grad_tree(
    selection, scale, acc, lambda w, _, coef: coef * conj_upcast(w, acc), zeros=False
  )


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
    lam, m, mask: as for `jaxl2.l2_penalty` (``lam`` one λ or a ``{pattern:
      λ_g}`` dict); checked here when concrete.
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
  check_callable(loss_fn, "loss_fn", usage="loss_fn(params, *args)")
  check_lam_or_groups(lam)
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
