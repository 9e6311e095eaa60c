"""The optimizer side: coupled L2 as optax transforms, and λ in other frameworks' units.

A penalty lives in the loss; weight decay lives in the update. For plain SGD
the two coincide when the decay rate is λ/m (`to_weight_decay`). For adaptive
optimizers they do not: `optax.chain(add_l2_grad(λ, m), optax.adam(lr))` is
Adam on the L2-regularized loss (coupled, like torch's ``Adam(weight_decay)``),
while `optax.adamw` decays the weights after Adam's rescaling (decoupled). The
first shrinks weights with large gradient history less; the second shrinks all
weights at the same rate. They follow different trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxl2.core._checks import check_lam, check_m
from jaxl2.masks._masks import MaskSpec, resolve
from jaxl2.penalties._family import anchor_values, l2_sp_penalty_grad
from jaxl2.penalties._penalties import l2_decay
from jaxl2.penalties._setup import lam_over_m

__all__ = [
  "AddL2GradState",
  "L2SPGradState",
  "add_l2_grad",
  "l2_sp_grad",
  "to_keras_l2",
  "to_sklearn_C",
  "to_sklearn_alpha",
  "to_weight_decay",
]

Schedule = Callable[[jax.Array], Any]


class AddL2GradState(NamedTuple):
  """State of `add_l2_grad`: the updates applied so far, for a λ schedule.

  ``count`` advances by one per update when λ is a schedule (it is the
  schedule's argument). With a constant λ nothing reads it, and it stays 0:
  advancing it would cost a kernel of its own in every compiled step (~10 ms
  of XLA compile time on CPU, 16% of a small model's update).
  """

  count: jax.Array


class L2SPGradState(NamedTuple):
  """State of `l2_sp_grad`: the updates applied so far, and the anchor W₀.

  The anchor lives in the state, not in the transform's closure, so that a
  compiled update takes it as an argument: a closure over an array is baked
  into the program as a constant, and one that spans several processes (a
  pretrained model sharded over a pod) cannot be compiled at all. ``count``
  advances only when λ is a schedule, as in `jaxl2.AddL2GradState`.
  """

  count: jax.Array
  anchor: Any


_NEEDS_PARAMS = (
  "`{name}` needs the current parameters: call `update(updates, state, params)`, as for "
  "`optax.add_decayed_weights`."
)


def _check_lam_or_schedule(lam: Any) -> None:
  if callable(lam):
    check_lam(lam(jnp.zeros([], jnp.int32)), "lam(0)")
  else:
    check_lam(lam)


def _coupled(
  name: str,
  lam: float | Schedule,
  grad_fn: Callable[[Any, Any, Any], Any],
  init_fn: Callable[[Any], Any],
) -> optax.GradientTransformation:
  """Adds the decay ``grad_fn(params, state, λ_t)``; λ_t is ``lam`` or ``lam(state.count)``.

  ``init_fn(params)`` makes the state, a NamedTuple whose ``count`` field
  counts the updates applied.

  On complex leaves JAX's gradient of the penalty is (λ/m)·conj(W), but an
  optax update must point along W to shrink it (optax takes the conjugate of
  JAX's gradient for complex parameters, as `optax.add_decayed_weights` adds
  wd·W): the decay added is (λ/m)·W, so SGD drives |W| toward 0.
  """

  def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    if params is None:
      raise ValueError(_NEEDS_PARAMS.format(name=name))
    lam_t = lam(state.count) if callable(lam) else lam
    decay = grad_fn(params, state, lam_t)  # None where nothing is added (unselected leaves)

    def add(u: Any, d: Any) -> Any:
      if d is None:
        return u
      return u + (jnp.conj(d) if jnp.iscomplexobj(d) else d).astype(u.dtype)

    updates = jax.tree_util.tree_map(add, updates, decay, is_leaf=lambda x: x is None)
    if not callable(lam):
      return updates, state  # the count drives a schedule only (see AddL2GradState)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _anchor_leaf(anchor: Any, param: Any) -> jax.Array:
  """An anchor leaf as a JAX array: a `jax.Array` as it is, a host value where its parameter is."""
  if isinstance(anchor, jax.Array) or not isinstance(param, jax.Array):
    return jnp.asarray(anchor)
  if isinstance(param, jax.core.Tracer):  # `init` under jit (a sweep): placed by the program
    return jnp.asarray(anchor)
  return jax.device_put(anchor, param.sharding)


def add_l2_grad(
  lam: float | Schedule, m: float, *, mask: MaskSpec = None
) -> optax.GradientTransformation:
  r"""Adds the L2 penalty's gradient (λ/m) · c_j · W_j to the updates (coupled L2).

  ``optax.chain(add_l2_grad(lam, m), tx)`` follows the same trajectory as
  ``tx`` on ``jaxl2.regularized(loss, lam, m)``, for any ``tx``: the decay
  enters before ``tx`` rescales the gradient. The selection comes from the
  same mask resolver as `jaxl2.l2_penalty`.

  Args:
    lam: λ ≥ 0, or an optax schedule ``count -> λ`` (evaluated at the number
      of updates applied so far, starting at 0).
    m: the number of training inputs, > 0.
    mask: which leaves, with what multiplier; as for `jaxl2.l2_penalty`.

  Returns:
    An `optax.GradientTransformation`; its ``update`` needs ``params``.

  Raises:
    ValueError: λ (or ``lam(0)``) negative or non-finite, ``m`` ≤ 0, at
      construction; a bad mask at ``init``; ``update`` without ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> tx = optax.chain(jaxl2.add_l2_grad(0.1, 10), optax.sgd(1.0))
    >>> params = {"w": jnp.ones((1, 2))}
    >>> updates, _ = tx.update({"w": jnp.zeros((1, 2))}, tx.init(params), params)
    >>> updates["w"]  # -lr · (λ/m) · W
    Array([[-0.01, -0.01]], dtype=float32)
  """
  _check_lam_or_schedule(lam)
  check_m(m)

  def init_fn(params: Any) -> AddL2GradState:
    resolve(params, mask)  # resolve the mask now: a bad mask fails at init, not at step 1
    return AddL2GradState(count=jnp.zeros([], jnp.int32))

  return _coupled(
    "add_l2_grad",
    lam,
    lambda params, state, lam_t: l2_decay(params, lam_t, m, mask=mask),
    init_fn,
  )


def l2_sp_grad(
  anchor: Any, lam: float | Schedule, m: float, *, mask: MaskSpec = None
) -> optax.GradientTransformation:
  r"""Adds the L2-SP penalty's gradient (λ/m) · c_j · (W_j − W₀_j) to the updates.

  ``optax.chain(l2_sp_grad(anchor, lam, m), tx)`` follows the same trajectory
  as ``tx`` on ``loss + jaxl2.l2_sp_penalty(params, anchor, lam, m)``: weights
  are pulled toward the pretrained ``anchor`` instead of toward zero.

  Args:
    anchor: the pretrained weights W₀, a pytree with the structure and leaf
      shapes of the params.
    lam, m, mask: as for `jaxl2.add_l2_grad`.

  Returns:
    An `optax.GradientTransformation`; its ``update`` needs ``params``. Its
    state, `jaxl2.L2SPGradState`, holds the anchor: a compiled update takes
    it as an argument, so it may be sharded like the params, over several
    processes too. ``init`` puts a host (NumPy) anchor leaf where its
    parameter is.

  Raises:
    ValueError: as `jaxl2.add_l2_grad`; an ``anchor`` that does not match
      the params (at ``init``).

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> anchor = {"w": jnp.ones((1, 2))}
    >>> tx = optax.chain(jaxl2.l2_sp_grad(anchor, 0.1, 10), optax.sgd(1.0))
    >>> params = {"w": jnp.full((1, 2), 3.0)}
    >>> updates, _ = tx.update({"w": jnp.zeros((1, 2))}, tx.init(params), params)
    >>> updates["w"]  # -lr · (λ/m) · (W − W₀)
    Array([[-0.02, -0.02]], dtype=float32)
  """
  _check_lam_or_schedule(lam)
  check_m(m)

  def init_fn(params: Any) -> L2SPGradState:
    selection = resolve(params, mask)
    anchor_values(selection, anchor)  # a mismatched anchor fails at init, not at step 1
    placed = jax.tree_util.tree_map(_anchor_leaf, anchor, params)
    return L2SPGradState(count=jnp.zeros([], jnp.int32), anchor=placed)

  return _coupled(
    "l2_sp_grad",
    lam,
    lambda params, state, lam_t: l2_sp_penalty_grad(params, state.anchor, lam_t, m, mask=mask),
    init_fn,
  )


# ---- λ in other frameworks' units ---------------------------------------------


def to_weight_decay(lam: float, m: float) -> float:
  r"""λ/m: the weight-decay rate equal to the L2 penalty under plain SGD.

  Targets torch ``SGD(params, lr, weight_decay=to_weight_decay(lam, m))``
  (which adds ``weight_decay · w`` to the gradient) and
  ``optax.chain(optax.add_decayed_weights(to_weight_decay(lam, m), mask), optax.sgd(lr))``.
  Both equal SGD on ``loss + (λ/2m)·Σ‖W‖²``. Under Adam the same rate in
  torch ``Adam(weight_decay=…)`` is still coupled L2, but in ``AdamW`` /
  `optax.adamw` it is decoupled decay, which is *not* this penalty.

  Example:
    >>> to_weight_decay(0.5, 1000)
    0.0005
  """
  check_lam(lam)
  check_m(m)
  return lam_over_m(lam, m)


def to_keras_l2(lam: float, m: float) -> float:
  r"""λ/2m: Keras ``regularizers.L2(l2=…)``, which adds ``l2 · Σ w²`` (no ½ there).

  Keras adds the term to the batch-mean loss, so ``l2 = λ/2m`` gives
  ``mean loss + (λ/2m)·Σ‖W‖²``. The same factor is the multiplier of
  ``tf.nn.l2_loss(w) = Σ w²/2`` when written as ``(λ/m) · tf.nn.l2_loss(w)``.

  Example:
    >>> to_keras_l2(0.5, 1000)
    0.00025
  """
  check_lam(lam)
  check_m(m)
  return lam_over_m(lam, m, half=True)


def to_sklearn_alpha(lam: float) -> float:
  r"""λ/2: scikit-learn ``Ridge(alpha=…)``, which minimizes ``‖y − Xw‖² + α‖w‖²``.

  Dividing by m shows that objective equals m · [mean((y − ŷ)²) + (λ/2m)‖w‖²]
  with α = λ/2, so both have the same optimum (Ridge leaves the intercept
  unpenalized; use a mask that does too).

  Example:
    >>> to_sklearn_alpha(0.5)
    0.25
  """
  check_lam(lam)
  return float(lam) / 2.0


def to_sklearn_C(lam: float) -> float:
  r"""1/λ: scikit-learn ``LogisticRegression(C=…)``, which minimizes ``C·Σ logloss + ½‖w‖²``.

  Multiplying that by λ/m gives mean log-loss + (λ/2m)‖w‖², so both have the
  same optimum (the intercept is unpenalized in both). λ = 0 gives ``inf``:
  use ``LogisticRegression(penalty=None)`` there.

  Example:
    >>> to_sklearn_C(0.5)
    2.0
  """
  check_lam(lam)
  return math.inf if float(lam) == 0.0 else 1.0 / float(lam)
