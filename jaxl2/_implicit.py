r"""Implicit differentiation at trained params: the machinery behind choosing λ without a grid.

At a trained W*(λ) the regularized objective is stationary, ∇L(W*) + (λ/m)·c⊙W* = 0
(L the mean training loss, c the mask's multipliers, 0 on unpenalized entries).
Differentiating in λ (the implicit function theorem) gives dW*/dλ = −H⁻¹·(c⊙W*/m),
H = ∇²L + (λ/m)·diag(c) the Hessian of ``L + l2_penalty``, and for a validation
loss V

    dV(W*(λ))/dλ = −∇V(W*)ᵀ · H⁻¹ · (c⊙W*) / m.

H is never formed: conjugate gradients run on Hessian-vector products (the
gradient of L linearized once at W*, forward over reverse), so one solve costs
a few dozen gradient-sized passes whatever the number of parameters. The params
are handled as one flat vector in the accumulation dtype (float32, float64 when
a leaf is float64). `jaxl2.lam_hypergradient` and `jaxl2.effective_params` are
built from these pieces; this module also says when their results are unreliable.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2._checks import check_count, check_lam, check_m
from jaxl2._dtypes import accumulation_dtype
from jaxl2._masks import MaskSpec, resolve
from jaxl2._setup import lam_over_m

__all__ = [
  "MAXITER",
  "Flat",
  "Loss",
  "problem",
  "regularized_hvp",
  "solve_cg",
  "solve_tol",
  "troubles",
  "warn_troubles",
]

Loss = Callable[[Any], jax.Array]
MAXITER = 1000  # the default cap on conjugate-gradient iterations


class Flat(NamedTuple):
  """Params as one vector in ``acc``: its treedef, shapes and dtypes (static under jit)."""

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]
  acc: Any

  @classmethod
  def of(cls, params: Any) -> Flat:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dtypes = tuple(jnp.dtype(x.dtype) for x in leaves)
    shapes = tuple(tuple(x.shape) for x in leaves)
    return cls(treedef, shapes, dtypes, accumulation_dtype(leaves))

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


def multipliers(params: Any, mask: MaskSpec, name: str) -> np.ndarray:
  """The mask's multiplier for every entry of the flat params (0 where unpenalized)."""
  selection = resolve(params, mask)
  for leaf in selection.leaves:
    dtype = getattr(leaf.value, "dtype", None)
    # Real floating only, not `is_inexact`: W* is differentiated as one real vector, and a
    # complex leaf would need its real and imaginary parts as two real parameters (`Flat`'s
    # cast to ``acc`` would drop the imaginary part).
    if leaf.not_array or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"`{name}` differentiates with respect to every leaf of `params`, so each must be a "
        f"real floating array; the leaf at {leaf.path!r} is {getattr(dtype, 'name', leaf.value)!r}."
        " Pass only the trainable floating params and close over the rest in the losses."
      )
  sizes = [int(np.size(leaf.value)) for leaf in selection.leaves]
  return np.repeat(np.asarray(selection.multipliers, np.float64), sizes)


class Problem(NamedTuple):
  """The checked arguments of a solve at W*, in the accumulation dtype ``acc``."""

  c: jax.Array  # the mask's multiplier for every entry of the flat params
  scale: jax.Array  # λ/m
  acc: Any


def problem(params: Any, lam: Any, m: Any, mask: MaskSpec, name: str) -> Problem:
  """Checks λ, m and the params (for the function called ``name``) and resolves the mask.

  Not `jaxl2._setup.setup`: every leaf is differentiated here, penalized or not, so
  the accumulation dtype is that of all the leaves, not only of the selected ones.
  """
  check_lam(lam)
  check_m(m)
  c = multipliers(params, mask, name)
  acc = Flat.of(params).acc
  return Problem(jnp.asarray(c, acc), lam_over_m(lam, m, acc), acc)


def solve_tol(acc: Any, tol: float | None, maxiter: Any) -> float:
  """Checks ``maxiter`` and returns ``tol``, by default a few hundred ulps above ``acc``'s floor."""
  check_count(maxiter, "maxiter")
  return float(tol) if tol is not None else 1e-10 if jnp.dtype(acc) == jnp.float64 else 1e-5


def regularized_hvp(
  loss: Loss, flat: Flat, w: jax.Array, c: jax.Array, scale: jax.Array
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
  """∇L at w, v ↦ H_d·v and v ↦ (H_d + scale·diag(c))·v, H_d = ∇²L at w.

  The gradient is linearized once, so each product is one tangent pass.
  """
  data_grad, hessian_data = jax.linearize(jax.grad(lambda v: loss(flat.unravel(v))), w)
  return data_grad, hessian_data, lambda v: hessian_data(v) + scale * c * v


class Solve(NamedTuple):
  """`solve_cg`'s x, its relative residual, iterations and whether it met pᵀAp ≤ 0."""

  x: jax.Array
  residual: jax.Array
  iterations: jax.Array
  negative_curvature: jax.Array


def solve_cg(
  matvec: Callable[[jax.Array], jax.Array], b: jax.Array, tol: Any, maxiter: int
) -> Solve:
  """Conjugate gradients for A·x = b from x = 0 (A symmetric), our own loop so that it can stop.

  Stops at ‖r‖ ≤ tol·‖b‖ (the recursive residual), after ``maxiter`` iterations,
  or at the first direction with pᵀAp ≤ 0, where A is not positive definite and
  CG has no minimum to descend to (x is kept as it was). The residual returned
  is recomputed from x, ‖b − A·x‖ / ‖b‖.
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
  return Solve(x, residual, k, negative)


def troubles(
  residual: float,
  tol: float,
  negative: bool,
  stationarity: float = 0.0,
  grad_rtol: float = math.inf,
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


def warn_troubles(what: str, lam: Any, found: list[str]) -> None:
  """One RuntimeWarning per trouble, attributed to the caller of the public function."""
  for trouble in found:
    warnings.warn(f"{what} at λ={float(lam):g}: {trouble}", RuntimeWarning, stacklevel=3)
