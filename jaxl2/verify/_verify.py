r"""Autodiff checks of users' own regularization code: `verify_penalty`, `verify_update`.

The classic L2 bugs live in training code, not in a library: the bias or a
LayerNorm scale decayed by accident, a mask that matches nothing, λ/m where
λ/2m was meant, a penalty normalized by the batch size instead of m, weight
decay placed after Adam when coupled L2 was intended. Each one changes the
gradient (or the update) a leaf receives from the penalty, so each one shows
up, leaf by leaf, when that gradient is measured with autodiff and compared
with the intended (λ/m) · c_j · W_j.

The parts, in the order a check runs: `jaxl2.verify._verify_probe` (the point the
check runs at), `jaxl2.verify._verify_measure` (the autodiff measurement, fitted
per leaf by `jaxl2.verify._verify_fit`), `jaxl2.verify._verify_judge` (each leaf's status
and diagnosis), `jaxl2.verify._verify_report` (the rows, the verdict, the table).

Both checks are called with concrete values, outside `jax.jit`: the
measurement is one compiled program, and the verdict is plain Python on the
few numbers it returns, so no Python ``if`` ever sees a traced value.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxl2.core._checks import (
  check_call_signature,
  check_callable,
  check_lam,
  check_m,
  check_optimizer,
  concrete,
)
from jaxl2.masks._masks import MaskSpec
from jaxl2.verify._verify_fit import LeafFit
from jaxl2.verify._verify_judge import Units, frozen_or_rounding, judge, lam_form, rounding_note
from jaxl2.verify._verify_measure import measure_penalty, measure_update
from jaxl2.verify._verify_probe import Probe, pick_grads, probe_point
from jaxl2.verify._verify_report import VerifyReport, VerifyRow

__all__ = ["verify_penalty", "verify_update"]

# Why nothing can be verified at λ = 0, per check.
_RERUN = "run the check at the λ you train with (> 0)"
_LAM_ZERO = {
  "verify_penalty": "λ = 0: the penalty and its gradient vanish, so their strength cannot be "
  f"checked; {_RERUN}",
  "verify_update": f"λ = 0: there is no decay to observe; {_RERUN}",
}
# The note of a row that would read "ok" (or "unverified" for another reason) at λ = 0.
_LAM_ZERO_ROW = "λ = 0: nothing to verify"
_LOSS_FN_FIX = (
  "Pass your regularized loss as a function of the params and λ only, closing over the data: "
  "`lambda params, lam: my_loss(params, x, y, lam)`."
)


def _check_options(lam: Any, m: Any, rtol: Any, batch_size: Any) -> None:
  check_lam(lam)
  check_m(m)
  if concrete(lam) is None or concrete(m) is None:
    raise TypeError(
      "`lam` and `m` must be concrete: the verify functions run eagerly, not under `jax.jit`."
    )
  if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < 1:
    raise ValueError(f"`rtol` must be a number in (0, 1), e.g. 1e-3; got {rtol!r}.")
  if batch_size is not None and (
    isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0
  ):
    raise ValueError(
      f"`batch_size` must be a positive integer (the batch the loss is averaged over) or None; "
      f"got {batch_size!r}."
    )


def _report(
  check: str,
  probe: Probe,
  fits: list[LeafFit],
  units: Units,
  lam: Any,
  adjust: Callable[[int, VerifyRow], VerifyRow],
) -> VerifyReport:
  """One row per floating leaf, judged from its fit, then ``adjust``-ed (k-th such leaf)."""
  rows = []
  for k, (i, fit) in enumerate(zip(probe.tree.index, fits, strict=True)):
    leaf, multiplier = probe.selection.leaves[i], probe.selection.multipliers[i]
    row = judge(
      leaf.path, tuple(np.shape(leaf.value)), multiplier, fit, units, check == "verify_update"
    )
    rows.append(adjust(k, row))
  unverified = _LAM_ZERO[check] if float(lam) == 0.0 else ""
  if unverified:
    # A row must not read "ok" where the verdict says nothing was verified; a row
    # that found a wrong term (a per-unit-λ rate off its mask) keeps saying so.
    rows = [
      dataclasses.replace(row, status="unverified", note=_LAM_ZERO_ROW)
      if row.status in ("ok", "unverified")
      else row
      for row in rows
    ]
  return VerifyReport(
    check, tuple(rows), float(lam), units.m, units.rtol, units.batch_size, unverified
  )


def verify_penalty(
  loss_fn: Callable[[Any, Any], Any],
  params: Any,
  lam: float,
  m: float,
  *,
  mask: MaskSpec = None,
  batch_size: int | None = None,
  rtol: float = 1e-3,
) -> VerifyReport:
  r"""Checks with autodiff that a regularized loss penalizes exactly the intended leaves.

  The intended penalty is (λ / 2m) · Σ_j c_j ‖W_j‖², whose gradient is
  (λ/m) · c_j · W_j. The penalty gradient in ``loss_fn`` is measured per
  unit λ as

      ∂/∂λ ∇_W loss_fn(W, λ)     (a `jax.jvp` of `jax.grad`),

  which for a penalty linear in λ equals [∇loss_fn(W, λ) − ∇loss_fn(W, 0)] / λ
  exactly, but without subtracting the data gradient (which drops out as a
  symbolic zero), so float32 is as precise as float64 here. Each floating
  leaf is compared with (1/m) · c_j · W_j and reported as ``ok``,
  ``missing``, ``unexpected``, ``scaled`` (factor found) or ``differs``.

  Assumptions: the penalty is linear in λ (a term ``lam * f(params)``), and
  the data loss does not use λ. Leaves that are all zeros (a freshly
  initialized bias) are replaced by a fixed random draw first, as the
  gradient of L2 at W = 0 is 0 whatever the code; bf16/fp16 leaves are
  checked in float32. Call it outside `jax.jit`, with concrete values;
  ``loss_fn`` is traced once (as `jax.grad` would), in one compiled program,
  and the verdict is Python on the numbers that program returns.

  On params spread over several processes (a pod), call it in every
  process: the per-leaf fits are made inside the program, where the leaves
  are, and every process gets the same report from the same few numbers.
  ``loss_fn`` may close over the global batch: the data term drops out of
  the program, so nothing of it is captured.

  Args:
    loss_fn: the user's regularized loss, ``loss_fn(params, lam) -> scalar``,
      a closure over the data (e.g. ``lambda p, lam: mse(p, x, y) +
      my_penalty(p, lam)``). ``lam`` arrives as a traced scalar.
    params: the params ``loss_fn`` takes; any pytree `jaxl2.l2_penalty` accepts.
    lam: λ ≥ 0 to check at.
    m: the number of training inputs, > 0.
    mask: the intended selection, as for `jaxl2.l2_penalty` (default: `jaxl2.by_role()`).
      A mask that selects nothing raises, as everywhere in jaxl2; a mask in
      the *user's* code that matches nothing shows as every leaf ``missing``.
    batch_size: the batch size the loss averages over, if known: a factor of
      m / batch_size is then named "normalized by the batch size".
    rtol: relative tolerance: a leaf is ``ok`` when its factor is within
      ``rtol`` of 1 and its misfit below ``rtol``; a term below ``rtol``
      times (1/m)·‖W‖ counts as absent. float32 measurements are good to
      ~1e-6.

  Returns:
    A `VerifyReport`: ``str()`` is the table, ``.ok`` a bool.

  Raises:
    TypeError: ``loss_fn`` not callable, or not differentiable in ``lam``;
      ``lam`` or ``m`` not a real scalar.
    ValueError: ``lam`` < 0, ``m`` ≤ 0, a bad ``rtol`` or ``batch_size``;
      an intended ``mask`` that selects nothing; leaves placed on different
      devices (one on this process's devices only, next to leaves that span
      processes); a ``loss_fn`` whose λ-terms need an array it closes over
      that spans several processes.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    >>> def loss(params, lam):  # the bias is penalized too, and the ½ is missing
    ...   return lam / 100 * sum(jnp.sum(p**2) for p in params.values())
    >>> report = jaxl2.verify_penalty(loss, params, lam=0.1, m=100)
    >>> report.ok
    False
    >>> print(report)
    verify_penalty: the penalty gradient in `loss_fn` vs (λ/m)·c·W; λ=0.1, m=100, rtol=0.001
    path  shape  intended  found  status      note
    ---------------------------------------------------------------------------------
    b     2             -      2  unexpected  a bias is penalized; `mask` excludes it
    w     3x2           1      2  scaled      λ/m used instead of λ/2m
    ---------------------------------------------------------------------------------
    FAILED: 2 of 2 leaves wrong (1 unexpected, 1 scaled).
  """
  check_callable(loss_fn, "loss_fn", usage="loss_fn(params, lam)")
  check_call_signature(loss_fn, "loss_fn", usage="loss_fn(params, lam)", n_args=2, fix=_LOSS_FN_FIX)
  _check_options(lam, m, rtol, batch_size)
  probe = probe_point(params, mask, loss_fn)
  fits, rates = measure_penalty(probe, lam, float(m))
  units = Units(0.5, float(m), batch_size, float(rtol), "penalized")
  return _report(
    "verify_penalty",
    probe,
    fits,
    units,
    lam,
    lambda k, row: lam_form(row, rates[k], float(lam), units),
  )


def verify_update(
  tx: Any,
  base_tx: Any,
  params: Any,
  lam: float,
  m: float,
  *,
  mask: MaskSpec = None,
  grads: Any = None,
  batch_size: int | None = None,
  rtol: float = 1e-3,
) -> VerifyReport:
  r"""Checks with autodiff that an optax chain applies coupled L2 on top of ``base_tx``.

  ``tx`` claims to be ``base_tx`` on the loss plus (λ/2m)·Σ_j c_j ‖W_j‖²,
  i.e. ``base_tx`` fed ``grads + (λ/m)·c·W``: for example
  ``optax.chain(optax.add_decayed_weights(jaxl2.to_weight_decay(lam, m), mask),
  optax.sgd(lr))`` on ``base_tx = optax.sgd(lr)``, or
  ``optax.chain(jaxl2.add_l2_grad(lam, m), optax.adam(lr))`` on
  ``optax.adam(lr)``. The decay's effect on the update is the derivative of
  the update along the params (`jax.jvp`, at ε = 0),

      measured = ∂_ε tx.update(g, s, (1+ε)W) − ∂_ε base_tx.update(g, s, (1+ε)W)
      intended = ∂_ε base_tx.update(g + (λ/m)·c·(1+ε)W, s, (1+ε)W) − (the same without decay)

  A decay term is linear in W, so for plain SGD this is ``tx(g) −
  base_tx(g)`` itself, computed without the cancellation of that difference
  (under Adam, smaller than float32 resolves); for an adaptive optimizer it
  is the small-decay limit of it. Each leaf is compared as in
  `jaxl2.verify_penalty`.

  The update compared is the second from a fresh state, after a warm-up
  step on a random gradient 10× larger: from a fresh state Adam divides each
  gradient by its own size, so a coupled penalty has almost no effect there
  to compare. Under Adam a decoupled decay (`optax.adamw`, or
  `optax.add_decayed_weights` placed after the rescaling) is not
  proportional to coupled L2: it is reported as ``differs``, with the note
  "decoupled decay". Under plain SGD the two are equal, as they should be.
  A ``base_tx`` that ignores the gradient's size (sign-based, like Lion)
  cannot tell: such leaves are ``ok`` with the note "untestable". Zero
  leaves are redrawn at random, as in `jaxl2.verify_penalty`. Call it
  outside `jax.jit`, with concrete values; ``tx`` and ``base_tx`` are traced
  once, in one compiled program. On several processes, as
  `jaxl2.verify_penalty`; a transform that closes over an array spread over
  the processes cannot be compiled (hold it in the transform's state, as
  `jaxl2.l2_sp_grad` holds its anchor).

  Args:
    tx: the user's `optax.GradientTransformation` (its ``update`` gets params).
    base_tx: the same optimizer without any decay.
    params: the params the optimizer updates.
    lam: λ ≥ 0 that ``tx`` should implement.
    m: the number of training inputs, > 0.
    mask: the intended selection, as for `jaxl2.l2_penalty`.
    grads: the gradients of the compared step (structure of ``params``):
      arrays placed as the params, or NumPy (the same in every process).
      Default: a fixed normal draw per leaf, with a standard deviation of
      max(1, 10⁶·(λ/m)·rms(W)) so that the decay is a small perturbation of
      it and a wrong rate under Adam reads as a clean factor.
    batch_size: as for `jaxl2.verify_penalty`.
    rtol: relative tolerance on the factor and on proportionality.

  Returns:
    A `VerifyReport`.

  Raises:
    TypeError: ``tx`` or ``base_tx`` without ``init``/``update``; ``lam``
      or ``m`` not a real scalar.
    ValueError: as `jaxl2.verify_penalty`; ``grads`` not shaped like
      ``params``, or placed on other devices; ``tx`` or ``base_tx`` closes
      over an array that spans several processes.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    >>> wd = jaxl2.to_weight_decay(0.1, 100)
    >>> tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(0.1))  # no mask: decays b
    >>> report = jaxl2.verify_update(tx, optax.sgd(0.1), params, lam=0.1, m=100)
    >>> [(row.path, row.status) for row in report.rows]
    [('b', 'unexpected'), ('w', 'ok')]
    >>> report.verdict
    'FAILED: 1 of 2 leaves wrong (1 unexpected).'
  """
  check_optimizer(tx, "tx")
  check_optimizer(base_tx, "base_tx")
  _check_options(lam, m, rtol, batch_size)
  probe = probe_point(params, mask)
  if grads is not None:
    grads = pick_grads(probe, grads)
  measured = measure_update(tx, base_tx, probe, grads, float(lam), float(m))
  units = Units(1.0, float(m), batch_size, float(rtol), "decayed")

  def frozen_or_rounded(k: int, row: VerifyRow) -> VerifyRow:
    leaf, found = probe.tree.leaves[probe.tree.index[k]], measured[k]
    rounding = rounding_note(getattr(leaf, "dtype", None), found.rounding)
    return frozen_or_rounding(row, found.frozen, found.fit.measured, rounding)

  fits = [found.fit for found in measured]
  return _report("verify_update", probe, fits, units, lam, frozen_or_rounded)
