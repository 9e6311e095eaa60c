r"""Implicit differentiation at trained params: the linear algebra behind choosing λ without a grid.

At a trained W*(λ) the regularized objective is stationary, ∇L(W*) + (λ/m)·c⊙W* = 0
(L the mean training loss, c the mask's multipliers, 0 on unpenalized entries).
Differentiating in λ (the implicit function theorem) gives dW*/dλ = −H⁻¹·(c⊙W*/m),
H = ∇²L + (λ/m)·diag(c) the Hessian of ``L + l2_penalty``, and for a validation
loss V

    dV(W*(λ))/dλ = −∇V(W*)ᵀ · H⁻¹ · (c⊙W*) / m.

H is never formed: preconditioned conjugate gradients run on curvature-vector
products (`jaxl2.implicit._curvature`), so one solve costs a few dozen passes over the
data whatever the number of parameters. Vectors are pytrees shaped like the
params, in the accumulation dtype (float32, float64 when a leaf is float64),
so sharded params stay sharded: nothing is concatenated or gathered.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxl2.core._checks import check_count
from jaxl2.masks._masks import MaskSpec, resolve
from jaxl2.penalties._lam_groups import lam_text

__all__ = [
  "MAXITER",
  "Solve",
  "axpy",
  "leaf_multipliers",
  "solve_cg",
  "solve_tol",
  "troubles",
  "vdot",
  "warn_troubles",
]

MAXITER = 1000  # the default cap on conjugate-gradient iterations
Tree = Any
MatVec = Callable[[Tree], Tree]


def vdot(a: Tree, b: Tree) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩."""
  pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  parts = [jnp.vdot(x, y) for x, y in pairs]
  return sum(parts[1:], parts[0])


def axpy(alpha: Any, x: Tree, y: Tree) -> Tree:
  """α·x + y, leaf by leaf."""
  return jax.tree_util.tree_map(lambda a, b: alpha * a + b, x, y)


def leaf_multipliers(params: Any, mask: MaskSpec, name: str) -> list[float]:
  """The mask's multiplier of every leaf of ``params`` (0.0 where unpenalized).

  Raises:
    TypeError: a leaf that is not a real floating array: every leaf is
      differentiated, penalized or not.
  """
  selection = resolve(params, mask)
  for leaf in selection.leaves:
    dtype = getattr(leaf.value, "dtype", None)
    # Real floating only, not `is_inexact`: a complex leaf would need its real and
    # imaginary parts as two real parameters of W*.
    if leaf.not_array or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"`{name}` differentiates with respect to every leaf of the params, so each must be a "
        f"real floating array; the leaf at {leaf.path!r} is {getattr(dtype, 'name', leaf.value)!r}."
        " Keep other arrays out of the params (in the model state, or the model's static part)."
      )
  return [float(c) for c in selection.multipliers]


def solve_tol(acc: Any, tol: float | None, maxiter: Any) -> float:
  """Checks ``maxiter`` and returns ``tol``, by default a few hundred ulps above ``acc``'s floor."""
  check_count(maxiter, "maxiter")
  return float(tol) if tol is not None else 1e-10 if jnp.dtype(acc) == jnp.float64 else 1e-5


class Solve(NamedTuple):
  """`solve_cg`'s x, its relative residual, iterations and whether it met pᵀAp ≤ 0."""

  x: Tree
  residual: jax.Array
  iterations: jax.Array
  negative_curvature: jax.Array


def solve_cg(
  matvec: MatVec, b: Tree, tol: Any, maxiter: int, precondition: MatVec | None = None
) -> Solve:
  """Preconditioned conjugate gradients for A·x = b from x = 0 (A symmetric); our own loop.

  ``precondition``, when given, applies M⁻¹ (symmetric positive definite, M ≈ A;
  `jaxl2.implicit._nystrom`). Stops at ‖r‖ ≤ tol·‖b‖ (the recursive
  residual), after ``maxiter`` iterations, or at the first direction with
  pᵀAp ≤ 0, where A is not positive definite and CG has no minimum to descend
  to (x is kept as it was). The residual returned is recomputed from x,
  ‖b − A·x‖ / ‖b‖.
  """

  if precondition is None:
    precondition = lambda r: r  # noqa: E731

  b_norm = jnp.sqrt(vdot(b, b))

  def cond(s: tuple[Any, ...]) -> jax.Array:
    _, r, _, _, k, negative = s
    return (jnp.sqrt(vdot(r, r)) > tol * b_norm) & (k < maxiter) & ~negative

  def body(s: tuple[Any, ...]) -> tuple[Any, ...]:
    x, r, p, rz, k, _ = s
    ap = matvec(p)
    curvature = vdot(p, ap)
    negative = curvature <= 0
    alpha = jnp.where(negative, 0.0, rz / jnp.where(negative, 1.0, curvature))
    x, r = axpy(alpha, p, x), axpy(-alpha, ap, r)
    z = precondition(r)
    rz_new = vdot(r, z)
    return x, r, axpy(rz_new / jnp.where(rz == 0, 1.0, rz), p, z), rz_new, k + 1, negative

  z = precondition(b)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, b)
  init = (zeros, b, z, vdot(b, z), jnp.int32(0), jnp.bool_(False))
  x, _, _, _, k, negative = jax.lax.while_loop(cond, body, init)
  r = axpy(-1.0, matvec(x), b)
  residual = jnp.sqrt(vdot(r, r)) / jnp.where(b_norm > 0, b_norm, 1.0)
  return Solve(x, residual, k, negative)


def troubles(
  residual: float,
  tol: float,
  negative: bool,
  stationarity: float = 0.0,
  grad_rtol: float = math.inf,
  curvature: str = "hessian",
) -> list[str]:
  """Why a result is unreliable, one sentence each; empty when it is not.

  A float32 solve stopped by its recursive residual can end a little above
  ``tol``: only 10× above it counts.
  """
  out = []
  if not stationarity <= grad_rtol:
    out.append(
      f"the params are not a stationary point of train_loss + l2_penalty (‖∇‖ is "
      f"{stationarity:.3g}× the penalty's gradient ‖(λ/m)·c⊙W‖, above `grad_rtol`="
      f"{grad_rtol:g}) and the hypergradient assumes trained W*(λ). Train longer at this λ."
    )
  if negative:
    fix = (
      ' Use `curvature="gauss_newton"` (positive semi-definite), or a `damping` > 0.'
      if curvature == "hessian"
      else " Raise `damping`."
    )
    out.append(
      f"the curvature ({curvature}) + penalty is not positive definite along the "
      f"conjugate-gradient solve (a direction with pᵀAp ≤ 0): the params are not at a strict "
      f"minimum.{fix}"
    )
  elif not residual <= 10 * tol:
    out.append(
      f"conjugate gradients stopped at relative residual {residual:.3g}, above `tol`={tol:g} "
      "(the system is ill-conditioned). Raise `maxiter`, raise λ, or add `damping`."
    )
  return out


def warn_troubles(what: str, lam: Any, found: list[str]) -> None:
  """One RuntimeWarning per trouble, attributed to the caller of the public function.

  ``lam``: one λ, or a ``{pattern: λ_g}`` table.
  """
  for trouble in found:
    warnings.warn(f"{what} at λ={lam_text(lam)}: {trouble}", RuntimeWarning, stacklevel=3)
