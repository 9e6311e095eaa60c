r"""Choosing λ by implicit differentiation: `lam_hypergradient`, `effective_params`, `tune_lam`.

At a trained W*(λ) the regularized objective is stationary, ∇L(W*) + (λ/m)·c⊙W* = 0
(L the mean training loss, c the mask's multipliers, 0 on unpenalized entries).
Differentiating in λ (the implicit function theorem) gives dW*/dλ = −H⁻¹·(c⊙W*/m),
H = ∇²L + (λ/m)·diag(c) the Hessian of ``L + l2_penalty``, and for a validation
loss V

    dV(W*(λ))/dλ = −∇V(W*)ᵀ · H⁻¹ · (c⊙W*) / m.

H is never formed: conjugate gradients run on Hessian-vector products (the
gradient of L linearized once at W*, forward over reverse), so one solve costs
a few dozen gradient-sized passes whatever the number of parameters. The params
are handled as one flat vector in float32 (float64 when a leaf is float64).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxl2._checks import check_lam, check_m
from jaxl2._masks import MaskSpec, resolve
from jaxl2._setup import lam_over_m
from jaxl2._training import TrainState, TrainStep, make_train_step

__all__ = [
  "EffectiveParams",
  "Hypergradient",
  "TuneResult",
  "TuneStep",
  "effective_params",
  "lam_hypergradient",
  "tune_lam",
]

Loss = Callable[[Any], jax.Array]
_MAXITER = 1000


class Hypergradient(NamedTuple):
  """What `lam_hypergradient` found at W*, as Python numbers.

  Attributes:
    value: dV(W*(λ))/dλ. val_loss: V(W*).
    residual: the solve's relative residual ‖H·v − ∇V‖ / ‖∇V‖, recomputed at the end.
    iterations: conjugate-gradient iterations (one Hessian-vector product each).
    grad_norm: ‖∇(L + penalty)‖ at W*, 0 at a stationary point; stationarity: grad_norm
      / ‖(λ/m)·c⊙W*‖, relative to the penalty's pull (inf at λ = 0 unless grad_norm = 0).
    negative_curvature: the solve met a direction p with pᵀHp ≤ 0 and stopped there.
  """

  value: float
  val_loss: float
  residual: float
  iterations: int
  grad_norm: float
  stationarity: float
  negative_curvature: bool


_TYPES = (float, float, float, int, float, float, bool)  # Hypergradient's fields, from arrays


class EffectiveParams(NamedTuple):
  """`effective_params`: the value, its standard error and probes (0.0 and 0 when exact)."""

  value: float
  stderr: float
  probes: int
  exact: bool


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


class _Flat(NamedTuple):
  """Params as one vector in ``acc``: its treedef, shapes and dtypes (static under jit)."""

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]
  acc: Any

  @classmethod
  def of(cls, params: Any) -> _Flat:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dtypes = tuple(jnp.dtype(x.dtype) for x in leaves)
    acc = functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))
    return cls(treedef, tuple(tuple(x.shape) for x in leaves), dtypes, acc)

  def ravel(self, params: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.concatenate([jnp.ravel(x).astype(self.acc) for x in leaves])

  def unravel(self, vector: jax.Array) -> Any:
    sizes = [math.prod(s) for s in self.shapes]
    parts = jnp.split(vector, np.cumsum(sizes)[:-1])
    leaves = [
      p.reshape(s).astype(d) for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)
    ]
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _multipliers(params: Any, mask: MaskSpec, name: str) -> np.ndarray:
  """The mask's multiplier for every entry of the flat params (0 where unpenalized)."""
  selection = resolve(params, mask)
  for leaf in selection.leaves:
    dtype = getattr(leaf.value, "dtype", None)
    if leaf.not_array or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"`{name}` differentiates with respect to every leaf of `params`, so each must be a "
        f"real floating array; the leaf at {leaf.path!r} is {getattr(dtype, 'name', leaf.value)!r}."
        " Pass only the trainable floating params and close over the rest in the losses."
      )
  sizes = [int(np.size(leaf.value)) for leaf in selection.leaves]
  return np.repeat(np.asarray(selection.multipliers, np.float64), sizes)


def _default_tol(acc: Any, tol: float | None) -> float:
  # A relative residual a few hundred ulps above each precision's floor.
  return float(tol) if tol is not None else 1e-10 if jnp.dtype(acc) == jnp.float64 else 1e-5


class _Solve(NamedTuple):
  x: jax.Array
  residual: jax.Array
  iterations: jax.Array
  negative_curvature: jax.Array


def _cg(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, tol: Any, maxiter: int) -> _Solve:
  """Conjugate gradients for A·x = b from x = 0 (A symmetric), our own loop so that it can stop.

  Stops at ‖r‖ ≤ tol·‖b‖ (the recursive residual), after ``maxiter`` iterations,
  or at the first direction with pᵀAp ≤ 0, where A is not positive definite and
  CG has no minimum to descend to (x is kept as it was).
  """
  b_norm = jnp.linalg.norm(b)

  def cond(s: tuple[jax.Array, ...]) -> jax.Array:
    _, _, _, rs, k, negative = s
    return (jnp.sqrt(rs) > tol * b_norm) & (k < maxiter) & ~negative

  def body(s: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    x, r, p, rs, k, _ = s
    ap = matvec(p)
    curvature = jnp.vdot(p, ap)
    negative = curvature <= 0
    alpha = jnp.where(negative, 0.0, rs / jnp.where(negative, 1.0, curvature))
    x, r = x + alpha * p, r - alpha * ap
    rs_new = jnp.vdot(r, r)
    return x, r, r + (rs_new / rs) * p, rs_new, k + 1, negative

  init = (jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.int32(0), jnp.bool_(False))
  x, _, _, _, k, negative = jax.lax.while_loop(cond, body, init)
  residual = jnp.linalg.norm(b - matvec(x)) / jnp.where(b_norm > 0, b_norm, 1.0)
  return _Solve(x, residual, k, negative)


def _linearized_grad(loss: Loss, flat: _Flat, w: jax.Array) -> tuple[jax.Array, Callable]:
  """∇L at w and v ↦ ∇²L·v, linearized once so each product is one tangent pass."""
  return jax.linearize(jax.grad(lambda v: loss(flat.unravel(v))), w)


@functools.partial(jax.jit, static_argnames=("train_loss_fn", "val_loss_fn", "maxiter"))
def _hyper_program(
  train_loss_fn: Loss, val_loss_fn: Loss, params: Any, c: jax.Array, scale: jax.Array,
  inv_m: jax.Array, tol: jax.Array, maxiter: int,
) -> tuple[jax.Array, ...]:  # fmt: skip
  flat = _Flat.of(params)
  w = flat.ravel(params)
  data_grad, hessian_data = _linearized_grad(train_loss_fn, flat, w)
  val_loss, val_grad = jax.value_and_grad(lambda v: val_loss_fn(flat.unravel(v)))(w)
  # The adjoint solve H·v = ∇V: one solve whatever the number of λ-directions.
  solve = _cg(lambda v: hessian_data(v) + scale * c * v, val_grad, tol, maxiter)
  pull = scale * c * w
  grad_norm = jnp.linalg.norm(data_grad + pull)
  pull_norm = jnp.linalg.norm(pull)
  stationarity = jnp.where(grad_norm == 0, 0.0, grad_norm / pull_norm)
  value = -jnp.vdot(solve.x, c * w) * inv_m
  return (value, val_loss, solve.residual, solve.iterations, grad_norm, stationarity,
          solve.negative_curvature)  # fmt: skip


def _hypergradient(
  train_loss_fn: Loss, val_loss_fn: Loss, params: Any, lam: Any, m: Any, mask: MaskSpec,
  tol: float | None, maxiter: int,
) -> tuple[Hypergradient, float]:  # fmt: skip
  """`lam_hypergradient` without its warnings (`tune_lam` gathers them), and the tol used."""
  check_lam(lam)
  check_m(m)
  _check_count(maxiter, "maxiter")
  c = _multipliers(params, mask, "lam_hypergradient")
  acc = _Flat.of(params).acc
  tol = _default_tol(acc, tol)
  out = _hyper_program(
    train_loss_fn, val_loss_fn, params, jnp.asarray(c, acc), lam_over_m(lam, m, acc),
    lam_over_m(1.0, m, acc), jnp.asarray(tol, acc), maxiter,
  )  # fmt: skip
  return Hypergradient(*(t(x) for t, x in zip(_TYPES, jax.device_get(out), strict=True))), tol


def _check_count(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


def _troubles(residual: float, tol: float, negative: bool, stationarity: float = 0.0,
              grad_rtol: float = math.inf) -> list[str]:  # fmt: skip
  """Why a result is unreliable. A float32 solve stopped by its recursive residual can
  end a little above ``tol``: only 10× above it counts."""
  out = []
  if not stationarity <= grad_rtol:
    out.append(
      f"the params are not a stationary point of train_loss + l2_penalty (‖∇‖ is "
      f"{stationarity:.3g}× the penalty's gradient ‖(λ/m)·c⊙W‖, above `grad_rtol`="
      f"{grad_rtol:g}) and the hypergradient assumes trained W*(λ). Train longer at this λ."
    )
  if negative:
    out.append(
      "H = ∇²(train_loss + l2_penalty) is not positive definite along the conjugate-gradient "
      "solve (a direction with pᵀHp ≤ 0): the params are not at a strict minimum. Train to a "
      "minimum, or raise λ."
    )
  elif not residual <= 10 * tol:
    out.append(
      f"conjugate gradients stopped at relative residual {residual:.3g}, above `tol`={tol:g} "
      "(H is ill-conditioned). Raise `maxiter`, or raise λ."
    )
  return out


def _warn(what: str, lam: Any, troubles: list[str]) -> None:
  for trouble in troubles:
    warnings.warn(f"{what} at λ={float(lam):g}: {trouble}", RuntimeWarning, stacklevel=3)


def lam_hypergradient(
  train_loss_fn: Loss,
  val_loss_fn: Loss,
  params: Any,
  lam: Any,
  m: Any,
  *,
  mask: MaskSpec = None,
  tol: float | None = None,
  maxiter: int = _MAXITER,
  grad_rtol: float = 1e-2,
) -> Hypergradient:
  r"""dV(W*(λ))/dλ = −∇V(W*)ᵀ·H⁻¹·(c⊙W*)/m at trained params W*, by implicit differentiation.

  H = ∇²(L + (λ/2m)·Σ c‖W‖²) at W*, L = ``train_loss_fn``, V = ``val_loss_fn``,
  c the mask's multipliers (0 on unpenalized leaves). H·v = ∇V is solved by
  conjugate gradients (jaxl2's own loop, on Hessian-vector products, from
  v = 0) until the relative residual ≤ ``tol`` or ``maxiter`` iterations, or
  until a direction of non-positive curvature stops it. The program is compiled
  once per pair of loss function objects and params structure (define the
  losses once: a fresh ``lambda`` per call compiles per call); the diagnostics
  are read back to warn, so call it eagerly, not under `jax.jit`.

  Args:
    train_loss_fn: ``train_loss_fn(params) -> scalar``, the *mean* data loss
      over the whole training set (no penalty: it is added here).
    val_loss_fn: ``val_loss_fn(params) -> scalar``, the validation loss.
    params: W*, trained at this λ; a pytree of real floating arrays.
    lam, m, mask: as for `jaxl2.l2_penalty` (λ ≥ 0, m the training-set size).
    tol: CG's relative residual target; default 1e-10 (float64), 1e-5 (float32).
    maxiter: cap on CG iterations (Hessian-vector products).
    grad_rtol: warn when ``stationarity`` (‖∇(L + penalty)‖ / ‖(λ/m)·c⊙W*‖) exceeds it.

  Returns:
    A `Hypergradient` with the value, the validation loss and the solve's diagnostics.

  Raises:
    TypeError: a leaf that is not a real floating array.
    ValueError: ``lam``/``m``/``mask`` as `jaxl2.l2_penalty`; ``maxiter`` < 1.

  Warns:
    RuntimeWarning: W* is not stationary, the solve met non-positive curvature,
      or the residual stayed above ``tol``.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), jnp.arange(4.0)
    >>> lam, m = 2.0, 4  # (1/m)·‖y − Xw‖² + (λ/2m)·‖w‖²: w* = (XᵀX + λ/2·I)⁻¹·Xᵀy
    >>> w = jnp.linalg.solve(x.T @ x + lam / 2 * jnp.eye(2), x.T @ y)
    >>> hg = jaxl2.lam_hypergradient(
    ...   lambda p: jnp.mean((x @ p["w"] - y) ** 2), lambda p: jnp.mean((x @ p["w"] - 1.0) ** 2),
    ...   {"w": w}, lam, m, mask=jaxl2.all_floating)
    >>> round(hg.value, 4), hg.iterations  # ∇V·dw*/dλ = ∇V·(−½(XᵀX + λ/2·I)⁻¹·w*), XᵀX = 3·I
    (-0.0586, 1)
  """
  result, tol = _hypergradient(train_loss_fn, val_loss_fn, params, lam, m, mask, tol, maxiter)
  r = result
  _warn(
    "lam_hypergradient",
    lam,
    _troubles(r.residual, tol, r.negative_curvature, r.stationarity, grad_rtol),
  )
  return result


@functools.partial(jax.jit, static_argnames=("train_loss_fn",))
def _effective_exact(train_loss_fn: Loss, params: Any, c: jax.Array, scale: jax.Array) -> jax.Array:
  flat = _Flat.of(params)
  w = flat.ravel(params)
  h = jax.hessian(lambda v: train_loss_fn(flat.unravel(v)))(w)
  h = (h + h.T) / 2
  evals, q = jnp.linalg.eigh(h + jnp.diag(scale * c))
  # tr(A⁺·H_d): a direction with A·q = 0 has no data and no penalty, and counts 0.
  keep = jnp.abs(evals) > evals.shape[0] * jnp.finfo(evals.dtype).eps * jnp.max(jnp.abs(evals))
  inverse = jnp.where(keep, 1 / jnp.where(keep, evals, 1.0), 0.0)
  return jnp.sum(inverse * jnp.sum(q * (h @ q), axis=0))


@functools.partial(jax.jit, static_argnames=("train_loss_fn", "probes", "maxiter"))
def _effective_hutchinson(
  train_loss_fn: Loss, params: Any, c: jax.Array, scale: jax.Array, key: jax.Array,
  tol: jax.Array, probes: int, maxiter: int,
) -> dict[str, jax.Array]:  # fmt: skip
  flat = _Flat.of(params)
  w = flat.ravel(params)
  _, hessian_data = _linearized_grad(train_loss_fn, flat, w)
  z = jax.random.rademacher(key, (probes, w.shape[0]), flat.acc)

  def probe(zi: jax.Array) -> tuple[jax.Array, ...]:
    # zᵀ·A⁻¹·H_d·z with A·y = H_d·z solved: H_d·z lies in A's range even where A is singular.
    solve = _cg(lambda v: hessian_data(v) + scale * c * v, hessian_data(zi), tol, maxiter)
    return jnp.vdot(zi, solve.x), solve.residual, solve.negative_curvature

  # In chunks of 16 probes: vectorized products, memory bounded by 16 copies of the params.
  samples, residuals, negative = jax.lax.map(probe, z, batch_size=min(probes, 16))
  return {
    "value": jnp.mean(samples),
    "stderr": jnp.std(samples, ddof=1) / jnp.sqrt(probes),
    "residual": jnp.max(residuals),
    "negative_curvature": jnp.any(negative),
  }


def effective_params(
  train_loss_fn: Loss,
  params: Any,
  lam: Any,
  m: Any,
  *,
  mask: MaskSpec = None,
  exact_below: int = 2000,
  probes: int = 64,
  seed: int = 0,
  tol: float | None = None,
  maxiter: int = _MAXITER,
) -> EffectiveParams:
  r"""The effective number of parameters tr(H_d·(H_d + (λ/m)·C)⁻¹) at ``params``.

  H_d is the Hessian of the mean data loss ``train_loss_fn`` and C = diag(c) the
  mask's multipliers. Each direction counts h/(h + (λ/m)·c) for its curvature h:
  1 when the data pin it down, 0 when the penalty dominates; an unpenalized
  direction with data counts 1, one with neither counts 0. For ridge regression
  with design X (singular values d_i) it is Σ d_i²/(d_i² + λ/2), plus 1 for an
  unpenalized intercept (d_i then those of the centered design). It falls as λ
  grows: a simpler model.

  With fewer than ``exact_below`` parameters it is exact: the dense Hessian, A =
  H_d + (λ/m)·C eigendecomposed, tr(A⁺·H_d). Otherwise it is Hutchinson's estimate
  mean(zᵀ·A⁻¹·H_d·z) over ``probes`` Rademacher vectors z, each A·y = H_d·z solved
  by conjugate gradients as in `jaxl2.lam_hypergradient`, with the standard error
  std/√probes (the estimate is unbiased; the CG solves need A positive definite).
  Where H_d has negative eigenvalues (a non-convex model away from a clean
  minimum) a direction can count below 0 or above 1, and so can the total.

  Args:
    train_loss_fn: ``train_loss_fn(params) -> scalar``, the mean training loss.
    params: where to measure, usually W* trained at this λ; real floating arrays.
    lam, m, mask: as for `jaxl2.l2_penalty`.
    exact_below: use the dense Hessian below this many parameters (its cost is
      n Hessian-vector products, n² memory and an n³ eigendecomposition).
    probes: Rademacher probes for the estimate (≥ 2).
    seed: seed of the probes.
    tol, maxiter: the CG solves' relative residual and cap, as `lam_hypergradient`.

  Returns:
    An `EffectiveParams`: value, stderr, probes and exact.

  Raises:
    TypeError: a leaf that is not a real floating array.
    ValueError: ``lam``/``m``/``mask`` as `jaxl2.l2_penalty`; ``probes`` < 2.

  Warns:
    RuntimeWarning: (estimate) a solve met non-positive curvature or stayed above ``tol``.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # d² = 3, 3
    >>> train = lambda p: jnp.mean((x @ p["w"] - jnp.arange(4.0)) ** 2)
    >>> result = jaxl2.effective_params(train, {"w": jnp.zeros(2)}, 6.0, 4, mask=jaxl2.all_floating)
    >>> round(result.value, 5), result.exact  # 2 · 3/(3 + 6/2)
    (1.0, True)
  """
  check_lam(lam)
  check_m(m)
  c = _multipliers(params, mask, "effective_params")
  flat = _Flat.of(params)
  acc, n = flat.acc, c.shape[0]
  c, scale = jnp.asarray(c, acc), lam_over_m(lam, m, acc)
  if n < exact_below:
    value = float(_effective_exact(train_loss_fn, params, c, scale))
    return EffectiveParams(value=value, stderr=0.0, probes=0, exact=True)
  if isinstance(probes, bool) or not isinstance(probes, int) or probes < 2:
    raise ValueError(
      f"`probes` must be an integer >= 2 (a standard error needs two); got {probes!r}."
    )
  _check_count(maxiter, "maxiter")
  tol = _default_tol(acc, tol)
  out = jax.device_get(
    _effective_hutchinson(
      train_loss_fn, params, c, scale, jax.random.key(seed), jnp.asarray(tol, acc), probes, maxiter
    )
  )
  _warn(
    "effective_params", lam, _troubles(float(out["residual"]), tol, bool(out["negative_curvature"]))
  )
  return EffectiveParams(float(out["value"]), float(out["stderr"]), probes, exact=False)


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
  maxiter: int = _MAXITER,
  grad_rtol: float = 1e-2,
) -> TuneResult:
  r"""Finds λ by descent on log λ with implicit hypergradients, retraining warm between steps.

  From ``params``, each iteration trains ``train_steps`` steps of ``optimizer``
  on ``train_loss_fn + l2_penalty`` at the current λ (jaxl2's training step,
  `jaxl2.make_train_step` in its general form, run in one compiled
  `jax.lax.scan`; the params *and* the optimizer state carry over from the
  previous λ, so each retraining starts from the previous W*), then takes
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
  _check_tune_options(lam0, train_steps, max_iter, max_step, rtol)
  train, fit = _trainer(train_loss_fn, optimizer, lam0, m, mask, train_steps)
  state, search, u = train.init(params), _Search(float(max_step)), math.log(float(lam0))
  path: list[TuneStep] = []
  best, troubles, converged = None, [], False
  for _ in range(max_iter):
    lam = math.exp(u)
    state = fit(train.set_lam(state, lam))
    hg, used = _hypergradient(train_loss_fn, val_loss_fn, state.params, lam, m, mask, tol, maxiter)
    path.append(TuneStep(lam, hg.val_loss, hg.value, hg.stationarity, hg.residual))
    found = _troubles(hg.residual, used, hg.negative_curvature, hg.stationarity, grad_rtol)
    troubles += [(lam, t) for t in found[:1]]
    if best is None or hg.val_loss < best[0].val_loss:
      best = (path[-1], state.params)
    step = search.step(u, lam * hg.value)  # dV/d log λ = λ·dV/dλ
    converged = abs(step) < rtol
    if converged:
      break
    u += step
  if troubles:
    warnings.warn(
      f"tune_lam: the hypergradient was approximate at {len(troubles)} of the {len(path)} λ "
      f"tried; the last, at λ={troubles[-1][0]:g}: {troubles[-1][1]}",
      RuntimeWarning,
      stacklevel=2,
    )
  return TuneResult(best[0].lam, best[0].val_loss, best[1], tuple(path), converged)


def _check_tune_options(
  lam0: Any, train_steps: Any, max_iter: Any, max_step: Any, rtol: Any
) -> None:
  check_lam(lam0, "lam0")
  if not float(lam0) > 0:
    raise ValueError(f"`lam0` must be > 0 (the search is on log λ); got {lam0!r}. Try 1e-3.")
  _check_count(train_steps, "train_steps")
  _check_count(max_iter, "max_iter")
  for name, value in (("max_step", max_step), ("rtol", rtol)):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")


def _trainer(
  train_loss_fn: Loss, optimizer: Any, lam0: Any, m: Any, mask: MaskSpec, steps: int
) -> tuple[TrainStep, Callable[[TrainState], TrainState]]:
  """jaxl2's training step in its general form, and ``steps`` of it as one compiled scan."""

  def loss(p: Any, model_state: Any, batch: Any, key: Any) -> tuple[jax.Array, tuple[Any, dict]]:
    return train_loss_fn(p), (model_state, {})

  train = make_train_step(None, loss, optimizer, lam=lam0, m=m, mask=mask)

  @jax.jit
  def fit(state: TrainState) -> TrainState:
    return jax.lax.scan(lambda s, _: (train.step_fn(s, None)[0], None), state, length=steps)[0]

  return train, fit
