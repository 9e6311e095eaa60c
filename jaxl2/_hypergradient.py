r"""`lam_hypergradient`: dV/dλ at trained params, by implicit differentiation.

dV(W*(λ))/dλ = −∇V(W*)ᵀ·H⁻¹·(c⊙W*)/m with one adjoint solve H·v = ∇V by
conjugate gradients on Hessian-vector products (the derivation is in
`jaxl2._implicit`), read back with the diagnostics that say whether to trust it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
from jaxl2._setup import lam_over_m

__all__ = ["Hypergradient", "hypergradient", "lam_hypergradient"]


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


@functools.partial(jax.jit, static_argnames=("train_loss_fn", "val_loss_fn", "maxiter"))
def _program(
  train_loss_fn: Loss, val_loss_fn: Loss, params: Any, c: jax.Array, scale: jax.Array,
  inv_m: jax.Array, tol: jax.Array, maxiter: int,
) -> tuple[jax.Array, ...]:  # fmt: skip
  flat = Flat.of(params)
  w = flat.ravel(params)
  data_grad, _, hessian = regularized_hvp(train_loss_fn, flat, w, c, scale)
  val_loss, val_grad = jax.value_and_grad(lambda v: val_loss_fn(flat.unravel(v)))(w)
  # The adjoint solve H·v = ∇V: one solve whatever the number of λ-directions.
  solve = solve_cg(hessian, val_grad, tol, maxiter)
  pull = scale * c * w
  grad_norm = jnp.linalg.norm(data_grad + pull)
  pull_norm = jnp.linalg.norm(pull)
  stationarity = jnp.where(grad_norm == 0, 0.0, grad_norm / pull_norm)
  value = -jnp.vdot(solve.x, c * w) * inv_m
  return (value, val_loss, solve.residual, solve.iterations, grad_norm, stationarity,
          solve.negative_curvature)  # fmt: skip


def hypergradient(
  train_loss_fn: Loss, val_loss_fn: Loss, params: Any, lam: Any, m: Any, mask: MaskSpec,
  tol: float | None, maxiter: int,
) -> tuple[Hypergradient, float]:  # fmt: skip
  """`lam_hypergradient` without its warnings (`jaxl2.tune_lam` gathers them), and the tol used."""
  c, scale, acc = problem(params, lam, m, mask, "lam_hypergradient")
  tol = solve_tol(acc, tol, maxiter)
  out = _program(
    train_loss_fn, val_loss_fn, params, c, scale, lam_over_m(1.0, m, acc),
    jnp.asarray(tol, acc), maxiter,
  )  # fmt: skip
  return Hypergradient(*(t(x) for t, x in zip(_TYPES, jax.device_get(out), strict=True))), tol


def lam_hypergradient(
  train_loss_fn: Loss,
  val_loss_fn: Loss,
  params: Any,
  lam: Any,
  m: Any,
  *,
  mask: MaskSpec = None,
  tol: float | None = None,
  maxiter: int = MAXITER,
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
  r, tol = hypergradient(train_loss_fn, val_loss_fn, params, lam, m, mask, tol, maxiter)
  found = troubles(r.residual, tol, r.negative_curvature, r.stationarity, grad_rtol)
  warn_troubles("lam_hypergradient", lam, found)
  return r
