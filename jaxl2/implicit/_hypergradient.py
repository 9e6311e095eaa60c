r"""`lam_hypergradient`: dV/dλ at trained params, by implicit differentiation.

dV(W*(λ))/dλ = −∇V(W*)ᵀ·A⁻¹·(c⊙W*)/m with one adjoint solve A·v = ∇V by
preconditioned conjugate gradients on curvature-vector products summed over
the training set (the derivation is in `jaxl2.implicit._implicit`, the curvature in
`jaxl2.implicit._curvature`), read back with the diagnostics that say whether to trust it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxl2.implicit._batches import check_batch_size, n_examples
from jaxl2.implicit._curvature import GaussNewton, evaluation, gauss_newton_gap, value_and_grad
from jaxl2.implicit._implicit import MAXITER, solve_cg, troubles, vdot, warn_troubles
from jaxl2.implicit._lam_setup import (
  Numbers,
  Options,
  check_hosts,
  check_loss_fn,
  check_model,
  inside,
  prepare,
)
from jaxl2.penalties._lam_groups import group_values, is_grouped, state_lam
from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep

__all__ = ["Hypergradient", "hypergradient", "lam_hypergradient"]

_GAP = 1e-4  # how far `GaussNewton`'s output_loss(outputs_fn) may be from loss_fn


class Hypergradient(NamedTuple):
  """What `lam_hypergradient` found at W*, as Python numbers.

  Attributes:
    value: dV(W*(λ))/dλ; for a step with one λ per group, a dict {pattern: dV/dλ_g}.
    val_loss: V(W*), the mean validation loss.
    residual: the solve's relative residual ‖A·v − ∇V‖ / ‖∇V‖, recomputed at the end.
    iterations: conjugate-gradient iterations (one curvature product, one pass
      over the training data, each).
    grad_norm: ‖∇(L + penalty)‖ at W*, 0 at a stationary point; stationarity: grad_norm
      / ‖(λ/m)·c⊙W*‖, relative to the penalty's pull (inf at λ = 0 unless grad_norm = 0).
    negative_curvature: the solve met a direction p with pᵀAp ≤ 0 and stopped there.
    curvature: the curvature the solve used, ``"gauss_newton"`` or ``"hessian"``.
    damping: the damping added to it.
  """

  value: float | dict[str, float]
  val_loss: float
  residual: float
  iterations: int
  grad_norm: float
  stationarity: float
  negative_curvature: bool
  curvature: str = "hessian"
  damping: float = 0.0


_TYPES = (float, float, int, float, float, bool)  # Hypergradient's array fields after value


@functools.partial(jax.jit, static_argnames=("options", "val_loss_fn", "val_batch_size"))
def _program(
  options: Options, val_loss_fn: Callable[..., Any], val_batch_size: int, model: Any,
  train_data: Any, val_data: Any, numbers: Numbers,
) -> tuple[tuple[jax.Array, ...], jax.Array]:  # fmt: skip
  inner = inside(options, numbers, model, train_data)
  params, model_state, static = model
  dtypes = jax.tree_util.tree_map(lambda x: x.dtype, params)
  bs = options.batch_size
  _, data_grad = value_and_grad(inner.model.loss, inner.w, train_data, bs, inner.acc)
  val = evaluation(options.train, val_loss_fn, "hessian", static, model_state, dtypes)
  val_loss, val_grad = value_and_grad(val.loss, inner.w, val_data, val_batch_size, inner.acc)
  # The adjoint solve A·v = ∇V: one solve whatever the number of λ-directions.
  solve = solve_cg(inner.matvec, val_grad, numbers.tol, options.maxiter, inner.precondition)
  cw = jax.tree_util.tree_map(jnp.multiply, inner.c, inner.w)
  pull = jax.tree_util.tree_map(lambda s, x: s * x, inner.scale, cw)
  total = jax.tree_util.tree_map(jnp.add, data_grad, pull)
  grad_norm, pull_norm = jnp.sqrt(vdot(total, total)), jnp.sqrt(vdot(pull, pull))
  stationarity = jnp.where(grad_norm == 0, 0.0, grad_norm / pull_norm)
  # One λ per group: dV/dλ_g = −⟨v, c⊙W* on group g⟩/m, all from the one solve.
  value = -group_values(solve.x, cw, options.groups) * numbers.inv_m
  gap = jnp.zeros((), inner.acc)
  if isinstance(options.curvature, GaussNewton):
    first = jax.tree_util.tree_map(lambda x: x[: min(bs, x.shape[0])], train_data)
    gap = gauss_newton_gap(inner.model, inner.w, first)
  out = (value, val_loss, solve.residual, solve.iterations, grad_norm, stationarity,
         solve.negative_curvature)  # fmt: skip
  return out, gap


def hypergradient(
  train: TrainStep,
  state: TrainState,
  train_data: Any,
  val_data: Any,
  *,
  val_loss_fn: Callable[..., Any] | None,
  val_batch_size: int | None,
  **options: Any,
) -> tuple[Hypergradient, float]:
  """`lam_hypergradient` without its warnings (`jaxl2.tune_lam` gathers them), and the tol used.

  ``options`` are `jaxl2.implicit._lam_setup.prepare`'s.
  """
  setup, numbers, tol = prepare("lam_hypergradient", train, state, train_data, **options)
  val_loss_fn = check_loss_fn(val_loss_fn, train)
  n_val = n_examples(val_data, "val_data")
  if val_batch_size is None:
    val_batch_size = min(setup.batch_size, n_val)
  val_batch_size = check_batch_size(val_batch_size, n_val, "val_batch_size")
  model = (state.params, state.model_state, state.static)
  out, gap = jax.device_get(
    _program(setup, val_loss_fn, val_batch_size, model, train_data, val_data, numbers)
  )
  if float(gap) > _GAP:
    raise ValueError(
      f"`curvature=jaxl2.GaussNewton(outputs_fn, output_loss)` does not match the model's "
      f"loss: output_loss(outputs_fn(...)) differs from `loss_fn` in evaluation mode by "
      f"{float(gap):.3g} (relative) on the first batch. The outputs and their loss must be the "
      "ones `loss_fn` computes."
    )
  value, *rest = out
  value = (
    dict(zip(train.lam, map(float, value), strict=True)) if is_grouped(train.lam) else float(value)
  )
  values = (t(x) for t, x in zip(_TYPES, rest, strict=True))
  curvature = "gauss_newton" if isinstance(setup.curvature, GaussNewton) else setup.curvature
  damping = float(numbers.damping)
  return Hypergradient(value, *values, curvature=curvature, damping=damping), tol


def lam_hypergradient(
  train: TrainStep,
  state: TrainState,
  train_data: Any,
  val_data: Any,
  *,
  batch_size: int | None = None,
  val_batch_size: int | None = None,
  val_loss_fn: Callable[..., Any] | None = None,
  curvature: str | GaussNewton = "auto",
  damping: float | None = None,
  precondition: int | None = None,
  tol: float | None = None,
  maxiter: int = MAXITER,
  grad_rtol: float = 1e-2,
  seed: int = 0,
) -> Hypergradient:
  r"""dV(W*(λ))/dλ = −∇V(W*)ᵀ·A⁻¹·(c⊙W*)/m at trained params W*, by implicit differentiation.

  A = C + (λ/m)·diag(c) + damping·I, with C the curvature of the mean training
  loss L at W* (the Gauss-Newton matrix by default for a loss of outputs, else
  the Hessian ∇²L; see ``curvature``), c the mask's multipliers (0 on
  unpenalized leaves), V the mean validation loss. With C = ∇²L and no damping
  A is the Hessian of ``L + l2_penalty`` and the value is exact at a strict
  minimum; the Gauss-Newton matrix is the same for a model linear in its
  params and an approximation that stays positive semi-definite on networks.

  The model is taken as `jaxl2.make_train_step` takes it: its `TrainStep`
  ``train`` (simple form, general form, NNX or Equinox module; its ``m`` and
  ``mask``) and a `TrainState` ``state`` at W* (its params, model state and
  λ). The data are arguments, in the batches ``train`` steps on (simple form:
  ``(inputs, targets)``; general form: any pytree with a leading example
  axis; NNX arrays, or global `jax.Array` s spanning several processes).
  Every loss, gradient and curvature product is a mean over the *whole* set,
  ``batch_size`` examples at a time (batch b holds examples b, b + k, …; the
  remainder is one more batch), in evaluation mode: ``key=None``, no dropout,
  running statistics. A·v = ∇V is solved by conjugate gradients from v = 0,
  preconditioned by a randomized Nyström approximation of C of rank
  ``precondition`` (`jaxl2.implicit._nystrom`), until the relative residual ≤ ``tol``
  or ``maxiter`` iterations, or until a direction of non-positive curvature
  stops it.

  One λ per group: for a ``train`` built with ``lam={pattern: λ_g, ...}``
  (`jaxl2.make_train_step`), A's penalty part is diag((λ_g/m)·c_j) and the
  value is the vector of partial derivatives, from the same one solve:

      dV/dλ_g = −∇V(W*)ᵀ·A⁻¹·(c⊙W*)_g/m = −⟨v, (c⊙W*)_g⟩/m,

  (c⊙W*)_g being c⊙W* on the leaves of group g and 0 elsewhere (Lorraine,
  Vicol and Duvenaud 2020); returned as a dict {pattern: dV/dλ_g}.

  Compiled once per ``train`` object, option set and data shapes; the
  diagnostics are read back to warn, so call it eagerly, not under `jax.jit`.

  Args:
    train: the `jaxl2.TrainStep` the model trains with.
    state: its `jaxl2.TrainState` at W*, trained at λ = ``state.lam``.
    train_data, val_data: the training and validation sets (pytrees).
    batch_size: examples per batch over ``train_data`` (default: all at once).
    val_batch_size: the same over ``val_data`` (default: ``batch_size``, or all).
    val_loss_fn: the validation loss, in the form of ``train``'s ``loss_fn``;
      default: that ``loss_fn`` itself.
    curvature: ``"auto"`` (``"gauss_newton"`` in the simple form, else
      ``"hessian"``), ``"gauss_newton"``, ``"hessian"``, or a
      `jaxl2.GaussNewton` for the general form.
    damping: δ ≥ 0 added to the curvature's diagonal (δ·I): for a Hessian that
      is indefinite, at the price of a bias. Default: 1% of λ/m (of the
      smallest λ_g/m with one λ per group).
    precondition: rank of the Nyström preconditioner (0: plain CG); None: 64
      where params × training examples ≥ 10⁸, where products are dear enough
      to repay its compile time, else 0.
    tol: CG's relative residual target; default 1e-10 (float64), 1e-5 (float32).
    maxiter: cap on CG iterations.
    grad_rtol: warn when ``stationarity`` (‖∇(L + penalty)‖ / ‖(λ/m)·c⊙W*‖) exceeds it.
    seed: seed of the preconditioner's random test vectors.

  Returns:
    A `Hypergradient` with the value, the validation loss, the solve's
    diagnostics and the curvature used.

  Raises:
    TypeError: ``train``/``state`` not a TrainStep/TrainState; a params leaf that
      is not real floating.
    ValueError: λ, ``m`` or ``mask`` as `jaxl2.l2_penalty`; data whose leaves
      disagree on the example axis; a bad batch size, ``curvature``,
      ``damping`` or ``maxiter``; a `GaussNewton` that does not match ``loss_fn``.

  Warns:
    RuntimeWarning: W* is not stationary, the solve met non-positive curvature,
      or the residual stayed above ``tol``.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), jnp.arange(4.0)
    >>> lam, m = 2.0, 4  # (1/m)·‖y − Xw‖² + (λ/2m)·‖w‖²: w* = (XᵀX + λ/2·I)⁻¹·Xᵀy
    >>> train = jaxl2.make_train_step(lambda p, x: x @ p["w"], lambda o, y: jnp.mean((o - y) ** 2),
    ...   optax.sgd(0.1), lam=lam, m=m, mask=jaxl2.all_floating)
    >>> state = train.init({"w": jnp.linalg.solve(x.T @ x + lam / 2 * jnp.eye(2), x.T @ y)})
    >>> hg = jaxl2.lam_hypergradient(train, state, (x, y), (x, jnp.ones(4)), damping=0.0)
    >>> round(hg.value, 4), hg.curvature  # ∇V·(−½(XᵀX + λ/2·I)⁻¹·w*), XᵀX = 3·I
    (-0.0586, 'gauss_newton')

    ``damping=0.0`` gives the exact derivative; the default, 1% of λ/m, keeps
    the solve well-conditioned on networks and moves this value by 0.3%.

    One λ per coordinate (groups 'w1' and 'w2'), both partials from one solve;
    here w* = Xᵀy₂/4 and dV/dλ_g = −w*_g·(∇V)_g/8 in closed form:

    >>> y2 = jnp.array([0.0, 1.0, 2.0, 0.0])  # w* = (0.5, 0.75)
    >>> two = jaxl2.make_train_step(lambda p, x: x[:, 0] * p["w1"] + x[:, 1] * p["w2"],
    ...   lambda o, y: jnp.mean((o - y) ** 2), optax.sgd(0.1), lam={"w1": 2.0, "w2": 2.0}, m=4,
    ...   mask=jaxl2.all_floating)
    >>> at = two.init({"w1": jnp.array(0.5), "w2": jnp.array(0.75)})
    >>> hg2 = jaxl2.lam_hypergradient(two, at, (x, y2), (x, jnp.ones(4)), damping=0.0)
    >>> {k: round(v, 4) for k, v in hg2.value.items()}  # (3/64, −15/256): opposite ways
    {'w1': 0.0469, 'w2': -0.0586}
  """
  check_model("lam_hypergradient", train, state)
  check_hosts(state, {"train_data": train_data, "val_data": val_data})
  r, used = hypergradient(
    train, state, train_data, val_data, batch_size=batch_size, val_batch_size=val_batch_size,
    val_loss_fn=val_loss_fn, curvature=curvature, damping=damping, tol=tol, maxiter=maxiter,
    precondition=precondition, seed=seed,
  )  # fmt: skip
  found = troubles(
    r.residual, used, r.negative_curvature, r.stationarity, grad_rtol, curvature=r.curvature
  )
  warn_troubles("lam_hypergradient", state_lam(train, state), found)
  return r
