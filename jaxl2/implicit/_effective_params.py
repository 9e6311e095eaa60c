r"""`effective_params`: tr(C·(C + (λ/m)·diag(c))⁻¹), how many directions the data pin down.

Exact from the dense curvature for small models; Hutchinson's estimate with
preconditioned conjugate-gradient solves on curvature-vector products
(`jaxl2.implicit._implicit`, `jaxl2.implicit._curvature`) otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxl2.core._checks import check_count
from jaxl2.implicit._curvature import GaussNewton
from jaxl2.implicit._implicit import MAXITER, solve_cg, troubles, vdot, warn_troubles
from jaxl2.implicit._lam_setup import Numbers, Options, check_hosts, check_model, inside, prepare
from jaxl2.implicit._sketch import signs_like
from jaxl2.penalties._lam_groups import state_lam
from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep

__all__ = ["EffectiveParams", "effective_params"]


class EffectiveParams(NamedTuple):
  """`effective_params`: the value, its standard error, probes (0.0 and 0 when exact), whether
  it is exact, and the curvature used (``"gauss_newton"`` or ``"hessian"``)."""

  value: float
  stderr: float
  probes: int
  exact: bool
  curvature: str = "hessian"


def _replicated(model: Any) -> Any:
  """``model``'s leaves sharded over a mesh, replicated on it: the exact trace builds the
  dense curvature of a small model (< ``exact_below`` params), where a copy per device is
  free, and jax before 0.10 fails to partition its columns over a sharded leaf."""

  def replicate(x: Any) -> Any:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated:
      return jax.device_put(x, NamedSharding(sharding.mesh, P()))
    return x

  return jax.tree_util.tree_map(replicate, model)


@functools.partial(jax.jit, static_argnames=("options",))
def _exact(options: Options, model: Any, train_data: Any, numbers: Numbers) -> jax.Array:
  inner = inside(options._replace(rank=0), numbers, model, train_data)
  flat, unravel = ravel_pytree(inner.w)
  # The penalty's diagonal, (λ/m)·c per entry (λ_g/m of the entry's group with groups).
  penalty = jax.tree_util.tree_map(
    lambda ci, si, x: si * ci * jnp.ones_like(x), inner.c, inner.scale, inner.w
  )
  penalty = ravel_pytree(penalty)[0]
  # n products, 64 at a time: the columns of the dense curvature.
  columns = jax.lax.map(
    lambda e: ravel_pytree(inner.product(unravel(e)))[0],
    jnp.eye(flat.shape[0], dtype=flat.dtype),
    batch_size=min(64, flat.shape[0]),
  )
  h = (columns + columns.T) / 2
  evals, q = jnp.linalg.eigh(h + jnp.diag(penalty + numbers.damping))
  # tr(A⁺·C): a direction with A·q = 0 has no data and no penalty, and counts 0.
  keep = jnp.abs(evals) > evals.shape[0] * jnp.finfo(evals.dtype).eps * jnp.max(jnp.abs(evals))
  inverse = jnp.where(keep, 1 / jnp.where(keep, evals, 1.0), 0.0)
  return jnp.sum(inverse * jnp.sum(q * (h @ q), axis=0))


@functools.partial(jax.jit, static_argnames=("options", "probes"))
def _hutchinson(
  options: Options, probes: int, model: Any, train_data: Any, numbers: Numbers
) -> dict[str, jax.Array]:
  inner = inside(options, numbers, model, train_data)
  # Other signs than the preconditioner's: seed + 1.
  z = signs_like(inner.w, probes, numbers.seed + jnp.uint32(1))

  def probe(v: Any) -> tuple[jax.Array, ...]:
    # zᵀ·A⁻¹·C·z with A·y = C·z solved: C·z lies in A's range even where A is singular.
    solve = solve_cg(
      inner.matvec, inner.product(v), numbers.tol, options.maxiter, inner.precondition
    )
    return vdot(v, solve.x), solve.residual, solve.negative_curvature

  # In chunks of 16 probes: vectorized products, memory bounded by 16 copies of the params.
  samples, residuals, negative = jax.lax.map(probe, z, batch_size=min(probes, 16))
  return {
    "value": jnp.mean(samples),
    "stderr": jnp.std(samples, ddof=1) / jnp.sqrt(probes),
    "residual": jnp.max(residuals),
    "negative_curvature": jnp.any(negative),
  }


def effective_params(
  train: TrainStep,
  state: TrainState,
  train_data: Any,
  *,
  batch_size: int | None = None,
  curvature: str | GaussNewton = "auto",
  damping: float | None = None,
  exact_below: int = 2000,
  probes: int = 64,
  seed: int = 0,
  precondition: int | None = None,
  tol: float | None = None,
  maxiter: int = MAXITER,
) -> EffectiveParams:
  r"""The effective number of parameters tr(C·(C + (λ/m)·diag(c) + δ·I)⁻¹) at ``state``.

  C is the curvature of the mean training loss (the Gauss-Newton matrix by
  default for a loss of outputs, else the Hessian H_d; see
  `jaxl2.lam_hypergradient`), c the mask's multipliers, δ = ``damping``. Each
  direction counts h/(h + (λ/m)·c) for its curvature h: 1 when the data pin it
  down, 0 when the penalty dominates; an unpenalized direction with data
  counts 1, one with neither counts 0. For ridge regression with design X
  (singular values d_i) it is Σ d_i²/(d_i² + λ/2), plus 1 for an unpenalized
  intercept (d_i then those of the centered design). It falls as λ grows: a
  simpler model. With one λ per group (a ``train`` built with ``lam={pattern:
  λ_g}``) the penalty's diagonal holds λ_g/m·c_j on the entries of group g.

  The model and data are taken as `jaxl2.lam_hypergradient` takes them (a
  `TrainStep`, its `TrainState`, the training set as an argument, summed over
  in evaluation mode ``batch_size`` examples at a time). With fewer than
  ``exact_below`` parameters it is exact: the dense C (n curvature products),
  A = C + (λ/m)·diag(c) + δ·I eigendecomposed, tr(A⁺·C). Otherwise it is
  Hutchinson's estimate mean(zᵀ·A⁻¹·C·z) over ``probes`` Rademacher vectors z,
  each A·y = C·z solved by preconditioned conjugate gradients, with the
  standard error std/√probes (unbiased; the solves need A positive definite,
  which the Gauss-Newton matrix gives). With the Hessian of a non-convex model
  away from a clean minimum a direction can count below 0 or above 1, and so
  can the total.

  Args:
    train, state, train_data, batch_size, curvature, damping: as for
      `jaxl2.lam_hypergradient`.
    exact_below: use the dense curvature below this many parameters (its cost
      is n curvature products, n² memory and an n³ eigendecomposition).
    probes: Rademacher probes for the estimate (≥ 2).
    seed: seed of the probes (and of the preconditioner's).
    precondition, tol, maxiter: the solves' preconditioner probes, relative
      residual and cap, as `lam_hypergradient`.

  Returns:
    An `EffectiveParams`: value, stderr, probes, exact and the curvature used.

  Raises:
    TypeError, ValueError: as `jaxl2.lam_hypergradient`; ``probes`` < 2.

  Warns:
    RuntimeWarning: (estimate) a solve met non-positive curvature or stayed above ``tol``.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # d² = 3, 3
    >>> train = jaxl2.make_train_step(lambda p, x: x @ p["w"], lambda o, y: jnp.mean((o - y) ** 2),
    ...   optax.sgd(0.1), lam=6.0, m=4, mask=jaxl2.all_floating)
    >>> state = train.init({"w": jnp.zeros(2)})
    >>> result = jaxl2.effective_params(train, state, (x, jnp.arange(4.0)))
    >>> round(result.value, 5), result.exact  # 2 · 3/(3 + 6/2)
    (1.0, True)
  """
  check_model("effective_params", train, state)
  check_hosts(state, {"train_data": train_data})
  options, numbers, tol = prepare(
    "effective_params", train, state, train_data, batch_size=batch_size, curvature=curvature,
    damping=damping, tol=tol, maxiter=maxiter, precondition=precondition, seed=seed,
  )  # fmt: skip
  name = "gauss_newton" if isinstance(options.curvature, GaussNewton) else options.curvature
  model = (state.params, state.model_state, state.static)
  size = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  if size < exact_below:
    value = float(_exact(options, _replicated(model), train_data, numbers))
    return EffectiveParams(value=value, stderr=0.0, probes=0, exact=True, curvature=name)
  check_count(probes, "probes", least=2, why=" (a standard error needs two)")
  out = jax.device_get(_hutchinson(options, probes, model, train_data, numbers))
  found = troubles(float(out["residual"]), tol, bool(out["negative_curvature"]), curvature=name)
  warn_troubles("effective_params", state_lam(train, state), found)
  return EffectiveParams(float(out["value"]), float(out["stderr"]), probes, False, name)
