r"""The autodiff measurements behind `verify_penalty` and `verify_update`, fitted per leaf.

How the measurement avoids float32 cancellation:

* The penalty is not measured as ``∇loss(λ) − ∇loss(0)``: the data gradient
  can be 10⁶ times the penalty's, and in float32 the difference would be
  rounding noise. The gradient is differentiated with respect to λ instead,
  ``∂/∂λ ∇_W loss(W, λ)`` (`jax.jvp` of `jax.grad`). The data term does not
  depend on λ, so it drops out exactly (JAX propagates a symbolic zero
  through it); for a penalty linear in λ what is left is the penalty's
  gradient per unit λ, ``(1/m)·c_j·W_j`` when the code is right.
* The decay in an update is the derivative of the optimizer's update with
  respect to the params along the params themselves. A decay term is linear
  in W, so this directional derivative *is* the decay's effect on the
  update, without the subtraction ``tx(g) − base_tx(g)`` (whose result,
  under Adam, is smaller than float32 can resolve); the intended effect is
  the same derivative of ``base_tx(g + (λ/m)·c·W)``.

Each measurement is one compiled program (the user's function is traced
once, as `jax.grad` would). The fits are NumPy on the few arrays it returns,
or, for params spread over several processes, part of the program: then
only a few numbers per leaf come back (`jaxl2.verify._verify_fit`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.core._hosts import closed_over_global, placed_like, spans_processes, to_host
from jaxl2.masks._mask_builders import all_floating
from jaxl2.penalties._penalties import l2_penalty_grad
from jaxl2.verify._verify_fit import LeafFit, penalty_fits, update_fits
from jaxl2.verify._verify_probe import Probe, ProbeTree, standard_normal

__all__ = ["measure_penalty", "measure_update"]

_NOT_DIFFERENTIABLE = (
  "`loss_fn(params, lam)` must be differentiable in `lam`: `verify_penalty` takes "
  "∂/∂λ of its gradient, so `lam` must enter as a number in arithmetic (no "
  "`if lam > 0`, `float(lam)` or `lam.item()` inside)."
)
_TX_CLOSURE_FIX = (
  "An optax transform that needs arrays must take them from its state or the params, which "
  "are arguments of the compiled update; replicate the array, "
  "`jax.device_put(x, NamedSharding(mesh, P()))`, to let the closure be compiled."
)
_CLOSURE_FIX = (
  "The data term drops out of this check (a loss may close over the global batch), but a "
  "term with λ needs what it reads: an L2-SP anchor, say. Replicate that array for the check, "
  "`jax.device_put(x, NamedSharding(mesh, P()))`: a replicated array can be captured."
)


def _rate_and_value(
  loss_fn: Callable[[Any, Any], Any], tree: ProbeTree, floats: list[jax.Array], lam: jax.Array
) -> tuple[list[jax.Array], list[jax.Array]]:
  """g'(λ) and g'(λ) − (λ/2)·g''(λ) = [g(λ) − g(0)]/λ, for g(λ) = ∇_W loss_fn(W, λ)."""

  def grad_at(lam_: jax.Array) -> list[jax.Array]:
    return jax.grad(lambda w: loss_fn(tree.rebuild(w), lam_))(floats)

  def slope_at(t: jax.Array) -> list[jax.Array]:
    return jax.jvp(grad_at, (t,), (jnp.ones_like(t),))[1]

  # The rate g'(λ) and the curvature g''(λ) in one forward-over-forward pass.
  rate, curvature = jax.jvp(slope_at, (lam,), (jnp.ones_like(lam),))
  return rate, [r - 0.5 * lam * c for r, c in zip(rate, curvature, strict=True)]


def _fit_where_leaves_live(
  program: Callable[..., list[tuple[Any, ...]]],
  args: tuple[Any, ...],
  fits: list[Callable[..., Any]],
  on_devices: bool,
) -> list[Any]:
  """Runs ``program`` (per leaf, the arrays its fit takes) compiled, and ``fits`` each leaf.

  The fits run inside the program when the params span several processes
  (``on_devices``: only their numbers reach the host, the same in every
  process), and on the host otherwise.
  """

  def fitted(*a: Any) -> list[Any]:
    terms = program(*a)
    if not on_devices:
      return terms
    return [fit(*t, xp=jnp) for fit, t in zip(fits, terms, strict=True)]

  out = to_host(jax.jit(fitted)(*args))
  return out if on_devices else [fit(*t, xp=np) for fit, t in zip(fits, out, strict=True)]


def measure_penalty(probe: Probe, lam: Any, m: float) -> tuple[list[LeafFit], list[LeafFit]]:
  """The penalty gradient at λ (per unit λ) and its rate of change in λ, fitted onto c·W/m.

  Both come from λ-derivatives of g(λ) = ∇_W loss_fn(W, λ) (``probe.loss_fn``),
  which have no data term (it drops out as a symbolic zero): the rate g'(λ)
  and the curvature g''(λ) (forward mode twice over `jax.grad`). The penalty
  gradient at λ per unit λ is [g(λ) − g(0)]/λ = g'(λ) − (λ/2)·g''(λ), exact
  for a penalty up to quadratic in λ (λ² included) and free of the
  cancellation of that subtraction.

  Raises:
    TypeError: ``loss_fn`` is not differentiable in ``lam``.
    ValueError: ``loss_fn`` closes over an array that spans several processes.
  """
  wide = any(jnp.finfo(x.dtype).bits == 64 for x in probe.floats)
  lam = jnp.asarray(lam, jnp.float64 if wide else jnp.float32)

  def terms(floats: list[jax.Array], lam: jax.Array) -> list[tuple[Any, ...]]:
    rate, value = _rate_and_value(probe.loss_fn, probe.tree, floats, lam)
    return list(zip(rate, value, floats, strict=True))

  fits = [functools.partial(penalty_fits, c=c, m=m) for c in probe.multipliers]
  on_devices = any(map(spans_processes, probe.floats))
  try:
    with closed_over_global("`loss_fn`", _CLOSURE_FIX):
      out = _fit_where_leaves_live(terms, (probe.floats, lam), fits, on_devices)
  except jax.errors.ConcretizationTypeError as err:
    raise TypeError(_NOT_DIFFERENTIABLE) from err
  return [LeafFit.of(f[0]) for f in out], [LeafFit.of(f[1]) for f in out]


# ---- updates ---------------------------------------------------------------------------


class UpdateMeasure(NamedTuple):
  """The decay measured in one leaf's update.

  Attributes:
    fit: the measured effect fitted onto coupled L2 through ``base_tx``.
    frozen: ``base_tx`` gives the leaf an all-zero update for a non-zero gradient.
    rounding: for a bf16/fp16 leaf, `jaxl2.verify._verify_fit.rounding_stats` of the decay's
      effect; else None.
  """

  fit: LeafFit
  frozen: bool
  rounding: np.ndarray | None


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.abs(x) ** 2)) if x.size else jnp.zeros((), jnp.float32)


def _draw_grads(
  floats: list[jax.Array],
  grads: list[jax.Array] | None,
  noise: tuple[list[jax.Array], list[jax.Array]],
  rate: float,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """(warm-up, compared) gradients: ``grads`` or a fixed draw, and a draw 10× its RMS.

  ``noise`` holds N(0, 1) draws shaped like the leaves. The default draw has
  a standard deviation of max(1, 10⁶ · rate · rms(W)) per leaf, so that a
  decay of that rate is a small perturbation of the gradient and an adaptive
  optimizer responds to it linearly (a wrong rate then reads as a clean
  factor). The larger warm-up step dominates Adam's second-moment estimate,
  so the compared step is far from the first step's scale invariance (where
  Adam ignores small gradient changes).
  """
  if grads is None:
    grads = [
      jnp.maximum(1.0, 1e6 * rate * _rms(w)).astype(w.real.dtype) * n
      for w, n in zip(floats, noise[0], strict=True)
    ]
  warm_up = []
  for g, n in zip(grads, noise[1], strict=True):
    rms = _rms(g)
    warm_up.append(10 * jnp.where(rms > 0, rms, 1).astype(g.real.dtype) * n)
  return warm_up, grads


def _second_update_slope(
  transform: Any,
  tree: ProbeTree,
  floats: list[jax.Array],
  grads: tuple[list[jax.Array], list[jax.Array]],
  decay: Callable[[Any], list[Any]] | None,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """The second update from a fresh state, and its ∂/∂ε at params (1 + ε)·W, at ε = 0.

  The two steps take the gradients ``grads`` (warm-up, compared), each with
  the floating leaves ``decay(params)`` added first when given (coupled L2
  through ``transform``).
  """
  warm_up, compared = grads
  state0 = transform.init(tree.rebuild(floats))

  def second_update(at: list[jax.Array]) -> list[jax.Array]:
    params = tree.rebuild(at)
    extra = decay(params) if decay is not None else [0.0] * len(at)
    g0 = tree.rebuild([g + d for g, d in zip(warm_up, extra, strict=True)])
    g1 = tree.rebuild([g + d for g, d in zip(compared, extra, strict=True)])
    _, state = transform.update(g0, state0, params)
    updates, _ = transform.update(g1, state, params)
    return tree.pick(updates)

  return jax.jvp(second_update, (floats,), (floats,))


def _coupled(tree: ProbeTree, lam: float, m: float, coefs: jax.Array) -> Callable[[Any], list[Any]]:
  """The coupled L2 gradient (λ/m)·c_j·W_j of the floating leaves, c_j = ``coefs[j]``."""

  def decay(params: Any) -> list[Any]:
    unit = tree.pick(l2_penalty_grad(params, lam, m, mask=all_floating))
    return [c.astype(d.real.dtype) * d for c, d in zip(coefs, unit, strict=True)]

  return decay


def _update_slopes(
  tx: Any,
  base_tx: Any,
  tree: ProbeTree,
  multipliers: list[float],
  lam: float,
  m: float,
  floats: list[jax.Array],
  grads: list[jax.Array] | None,
  noise: Any,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """The slopes of ``tx``'s update, and of ``base_tx``'s with coupled L2 of c ∈ {0, c_j, 1}.

  ``base_tx`` runs once, vmapped over three per-leaf multipliers on the
  coupled term (λ/m)·W: 0 (its own dependence on the params), the intended
  ``multipliers``, and 1 (the scale of a decay on every leaf).
  """
  both = _draw_grads(floats, grads, noise, lam / m)
  coefs = jnp.asarray([[0.0] * len(floats), multipliers, [1.0] * len(floats)])
  through_base = jax.vmap(
    lambda c: _second_update_slope(base_tx, tree, floats, both, _coupled(tree, lam, m, c))[1]
  )(coefs)
  user = _second_update_slope(tx, tree, floats, both, None)[1]
  return user, through_base


def _frozen_flags(
  base_tx: Any,
  tree: ProbeTree,
  rate: float,
  floats: list[jax.Array],
  grads: list[jax.Array] | None,
  noise: Any,
) -> list[jax.Array]:
  """Per leaf: ``base_tx`` gives an all-zero update to a non-zero gradient."""
  both = _draw_grads(floats, grads, noise, rate)
  updates = _second_update_slope(base_tx, tree, floats, both, None)[0]
  return [~jnp.any(u != 0) & jnp.any(g != 0) for u, g in zip(updates, both[1], strict=True)]


def measure_update(
  tx: Any, base_tx: Any, probe: Probe, grads: list[jax.Array] | None, lam: float, m: float
) -> list[UpdateMeasure]:
  """Measures the decay's effect in ``tx`` against coupled L2 through ``base_tx``, per leaf.

  ``grads`` are the compared step's gradients at the floating leaves; None draws them.

  Raises:
    ValueError: ``tx`` or ``base_tx`` closes over an array that spans several processes.
  """
  tree, floats = probe.tree, probe.floats
  draws = [standard_normal((1, k), w) for k, w in enumerate(floats)]
  noise = [draws, [np.roll(n, 1) for n in draws]]  # shifted: independent element by element
  noise = [[placed_like(n, w) for n, w in zip(ns, floats, strict=True)] for ns in noise]

  def terms(floats: list[jax.Array], grads: Any, noise: Any) -> list[tuple[Any, ...]]:
    user, base = _update_slopes(tx, base_tx, tree, probe.multipliers, lam, m, floats, grads, noise)
    return list(zip(user, base, floats, strict=True))

  dtypes = [jnp.dtype(getattr(tree.leaves[i], "dtype", np.float32)) for i in tree.index]
  fits = [functools.partial(update_fits, dtype=dtype) for dtype in dtypes]
  on_devices = any(map(spans_processes, floats))
  with closed_over_global("`tx` or `base_tx`", _TX_CLOSURE_FIX):
    measured = _fit_where_leaves_live(terms, (floats, grads, noise), fits, on_devices)
    # Only a leaf on which no decay can act through `base_tx` may be frozen: the
    # second program (the base update's value) runs only when there is one.
    fits = [LeafFit.of(fit) for fit, _ in measured]
    blind = [fit.unit == 0 for fit in fits]  # no decay acts through `base_tx`
    flags = blind
    if any(blind):
      frozen = jax.jit(functools.partial(_frozen_flags, base_tx, tree, lam / m))
      flags = to_host(frozen(floats, grads, noise))
  return [
    UpdateMeasure(fit, bool(blind_i and flag), rounding)
    for fit, (_, rounding), blind_i, flag in zip(fits, measured, blind, flags, strict=True)
  ]
