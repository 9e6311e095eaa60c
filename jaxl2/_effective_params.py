r"""`effective_params`: tr(H_d·(H_d + (λ/m)·C)⁻¹), how many directions the data pin down.

Exact from the dense Hessian for small models; Hutchinson's estimate with
conjugate-gradient solves on Hessian-vector products (`jaxl2._implicit`) otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxl2._checks import check_count
from jaxl2._implicit import (
  MAXITER,
  Flat,
  Loss,
  problem,
  regularized_hvp,
  solve_cg,
  solve_tol,
  troubles,
  warn_troubles,
)
from jaxl2._masks import MaskSpec

__all__ = ["EffectiveParams", "effective_params"]


class EffectiveParams(NamedTuple):
  """`effective_params`: the value, its standard error and probes (0.0 and 0 when exact)."""

  value: float
  stderr: float
  probes: int
  exact: bool


@functools.partial(jax.jit, static_argnames=("train_loss_fn",))
def _exact(train_loss_fn: Loss, params: Any, c: jax.Array, scale: jax.Array) -> jax.Array:
  flat = Flat.of(params)
  w = flat.ravel(params)
  h = jax.hessian(lambda v: train_loss_fn(flat.unravel(v)))(w)
  h = (h + h.T) / 2
  evals, q = jnp.linalg.eigh(h + jnp.diag(scale * c))
  # tr(A⁺·H_d): a direction with A·q = 0 has no data and no penalty, and counts 0.
  keep = jnp.abs(evals) > evals.shape[0] * jnp.finfo(evals.dtype).eps * jnp.max(jnp.abs(evals))
  inverse = jnp.where(keep, 1 / jnp.where(keep, evals, 1.0), 0.0)
  return jnp.sum(inverse * jnp.sum(q * (h @ q), axis=0))


@functools.partial(jax.jit, static_argnames=("train_loss_fn", "probes", "maxiter"))
def _hutchinson(
  train_loss_fn: Loss, params: Any, c: jax.Array, scale: jax.Array, key: jax.Array,
  tol: jax.Array, probes: int, maxiter: int,
) -> dict[str, jax.Array]:  # fmt: skip
  flat = Flat.of(params)
  w = flat.ravel(params)
  _, hessian_data, hessian = regularized_hvp(train_loss_fn, flat, w, c, scale)
  z = jax.random.rademacher(key, (probes, w.shape[0]), flat.acc)

  def probe(zi: jax.Array) -> tuple[jax.Array, ...]:
    # zᵀ·A⁻¹·H_d·z with A·y = H_d·z solved: H_d·z lies in A's range even where A is singular.
    solve = solve_cg(hessian, hessian_data(zi), tol, maxiter)
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
  maxiter: int = MAXITER,
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
  c, scale, acc = problem(params, lam, m, mask, "effective_params")
  if c.shape[0] < exact_below:
    value = float(_exact(train_loss_fn, params, c, scale))
    return EffectiveParams(value=value, stderr=0.0, probes=0, exact=True)
  check_count(probes, "probes", least=2, why=" (a standard error needs two)")
  tol = solve_tol(acc, tol, maxiter)
  out = jax.device_get(
    _hutchinson(
      train_loss_fn, params, c, scale, jax.random.key(seed), jnp.asarray(tol, acc), probes, maxiter
    )
  )
  found = troubles(float(out["residual"]), tol, bool(out["negative_curvature"]))
  warn_troubles("effective_params", lam, found)
  return EffectiveParams(float(out["value"]), float(out["stderr"]), probes, exact=False)
