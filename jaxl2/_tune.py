r"""`tune_lam`: descent on log λ with implicit hypergradients, retraining warm between steps.

Each λ is trained with jaxl2's own training step (`jaxl2.make_train_step`, its
general form), then `jaxl2.lam_hypergradient`'s dV/dλ moves log λ by a
safeguarded secant step (`_Search`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxl2._checks import check_count, check_lam
from jaxl2._hypergradient import hypergradient
from jaxl2._implicit import MAXITER, Loss, troubles
from jaxl2._masks import MaskSpec
from jaxl2._training import TrainState, make_train_step

__all__ = ["TuneResult", "TuneStep", "tune_lam"]


class TuneStep(NamedTuple):
  """One λ that `tune_lam` tried, after training at it."""

  lam: float
  val_loss: float
  hypergradient: float
  stationarity: float
  residual: float


class TuneResult(NamedTuple):
  """`tune_lam`: λ* (the λ of the path with the lowest validation loss), its validation
  loss and trained params, every λ tried in order, and whether a step below ``rtol``
  (rather than ``max_iter``) ended the search."""

  lam: float
  val_loss: float
  params: Any
  path: tuple[TuneStep, ...]
  converged: bool


class _Search:
  """The next log λ from g = dV/d log λ: the safeguarded secant step `tune_lam` describes."""

  def __init__(self, max_step: float) -> None:
    self.max_step, self.lo, self.hi = max_step, -math.inf, math.inf
    self.last: tuple[float, float] | None = None

  def step(self, u: float, g: float) -> float:
    if g < 0:  # V falls as λ grows: the minimum is above u
      self.lo, self.hi = (u, self.hi) if u < self.hi else (u, math.inf)
    elif g > 0:  # a bracket the noise of training contradicts is dropped
      self.lo, self.hi = (self.lo, u) if u > self.lo else (-math.inf, u)
    slope = math.nan
    if self.last is not None and self.last[0] != u:
      slope = (g - self.last[1]) / (u - self.last[0])
    self.last = (u, g)
    step = -g / slope if slope > 0 else -math.copysign(self.max_step, g) * (g != 0)
    new = u + min(max(step, -self.max_step), self.max_step)
    if math.isfinite(self.lo + self.hi) and not self.lo < new < self.hi:
      new = (self.lo + self.hi) / 2
    return new - u


def _check_options(lam0: Any, train_steps: Any, max_iter: Any, max_step: Any, rtol: Any) -> None:
  check_lam(lam0, "lam0")
  if not float(lam0) > 0:
    raise ValueError(f"`lam0` must be > 0 (the search is on log λ); got {lam0!r}. Try 1e-3.")
  check_count(train_steps, "train_steps")
  check_count(max_iter, "max_iter")
  for name, value in (("max_step", max_step), ("rtol", rtol)):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")


def _trainer(
  train_loss_fn: Loss, optimizer: Any, lam0: Any, m: Any, mask: MaskSpec, steps: int
) -> tuple[Callable[[Any], TrainState], Callable[[TrainState, float], TrainState]]:
  """The state's ``init``, and ``fit(state, lam)``: ``steps`` steps at λ from ``state``.

  Only the training step's public surface: ``init``, ``set_lam`` and the
  compiled call, which donates the state it is given (keep no reference into it).
  """

  def loss(p: Any, model_state: Any, batch: Any, key: Any) -> tuple[jax.Array, tuple[Any, dict]]:
    return train_loss_fn(p), (model_state, {})

  train = make_train_step(None, loss, optimizer, lam=lam0, m=m, mask=mask)

  def fit(state: TrainState, lam: float) -> TrainState:
    state = train.set_lam(state, lam)
    for _ in range(steps):
      state, _ = train(state, None)
    return state

  return train.init, fit


def _warn_approximate(found: list[tuple[float, str]], tried: int) -> None:
  if found:
    lam, trouble = found[-1]
    warnings.warn(
      f"tune_lam: the hypergradient was approximate at {len(found)} of the {tried} λ "
      f"tried; the last, at λ={lam:g}: {trouble}",
      RuntimeWarning,
      stacklevel=3,
    )


def tune_lam(
  train_loss_fn: Loss,
  val_loss_fn: Loss,
  params: Any,
  lam0: float,
  m: Any,
  *,
  optimizer: optax.GradientTransformation,
  train_steps: int,
  mask: MaskSpec = None,
  max_iter: int = 20,
  max_step: float = 1.0,
  rtol: float = 1e-2,
  tol: float | None = None,
  maxiter: int = MAXITER,
  grad_rtol: float = 1e-2,
) -> TuneResult:
  r"""Finds λ by descent on log λ with implicit hypergradients, retraining warm between steps.

  From ``params``, each iteration trains ``train_steps`` steps of ``optimizer``
  on ``train_loss_fn + l2_penalty`` at the current λ (jaxl2's training step,
  `jaxl2.make_train_step` in its general form, one compiled step per call; the
  params *and* the optimizer state carry over from the previous λ, so each
  retraining starts from the previous W*), then takes
  g = dV/d log λ = λ·`lam_hypergradient`. log λ moves by the safeguarded
  secant step −g/h (h the slope between the last two g; a full ``max_step``
  downhill when no positive slope is known; never more than ``max_step``; the
  midpoint once the minimum is bracketed and a step would leave the bracket).
  It stops when a step would change log λ by less than ``rtol`` (λ by a factor
  within 1 ± rtol), or after ``max_iter`` trainings.

  Args:
    train_loss_fn, val_loss_fn: ``fn(params) -> scalar`` mean losses, as for
      `lam_hypergradient` (full batch).
    params: the starting params (trained or not: the first ``train_steps`` train them).
    lam0: the first λ (> 0: the search is on log λ).
    m, mask: as for `jaxl2.l2_penalty`.
    optimizer: any `optax.GradientTransformation`; ``train_steps`` of it should
      bring the params close to W*(λ) from a nearby λ's W*.
    train_steps: training steps per λ.
    max_iter: the most λ values tried (each one training and one hypergradient).
    max_step: the largest change of log λ in one step (1.0: a factor e).
    rtol: stop when |Δ log λ| < rtol.
    tol, maxiter, grad_rtol: as `lam_hypergradient`.

  Returns:
    A `TuneResult`: λ* (the λ of the path with the lowest validation loss), its
    validation loss, its params, the path and whether it converged.

  Raises:
    ValueError: ``lam0`` not > 0, ``m``/``mask`` invalid, a bad count or step.

  Warns:
    RuntimeWarning: once, for the λ of the path where `lam_hypergradient` would
      have warned (most often: training had not reached W*; raise ``train_steps``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxl2
    >>> x = jax.random.normal(jax.random.key(0), (40, 3)); w = jnp.array([1.0, -0.5, 0.2])
    >>> y = x @ w + jax.random.normal(jax.random.key(1), (40,))
    >>> mse = lambda p, a, b: jnp.mean((a @ p["w"] - b) ** 2)
    >>> result = jaxl2.tune_lam(
    ...   lambda p: mse(p, x[:20], y[:20]), lambda p: mse(p, x[20:], y[20:]),
    ...   {"w": jnp.zeros(3)}, 1.0, 20, optimizer=optax.sgd(0.2), train_steps=100,
    ...   mask=jaxl2.all_floating)
    >>> result.converged, len(result.path) <= 20, result.val_loss <= result.path[0].val_loss
    (True, True, True)
  """
  _check_options(lam0, train_steps, max_iter, max_step, rtol)
  init, fit = _trainer(train_loss_fn, optimizer, lam0, m, mask, train_steps)
  state, search, u = init(params), _Search(float(max_step)), math.log(float(lam0))
  path: list[TuneStep] = []
  best, found, converged = None, [], False
  for _ in range(max_iter):
    lam = math.exp(u)
    state = fit(state, lam)
    hg, used = hypergradient(train_loss_fn, val_loss_fn, state.params, lam, m, mask, tol, maxiter)
    path.append(TuneStep(lam, hg.val_loss, hg.value, hg.stationarity, hg.residual))
    trouble = troubles(hg.residual, used, hg.negative_curvature, hg.stationarity, grad_rtol)
    found += [(lam, t) for t in trouble[:1]]
    if best is None or hg.val_loss < best[0].val_loss:
      # A copy: the next training step donates the state's buffers.
      best = (path[-1], jax.tree_util.tree_map(jnp.copy, state.params))
    step = search.step(u, lam * hg.value)  # dV/d log λ = λ·dV/dλ
    converged = abs(step) < rtol
    if converged:
      break
    u += step
  _warn_approximate(found, len(path))
  return TuneResult(best[0].lam, best[0].val_loss, best[1], tuple(path), converged)
