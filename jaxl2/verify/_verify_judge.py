"""From one leaf's measured fit to its `VerifyRow`: the status, and the mistake named in words.

A factor that a common mistake explains is named as that mistake ("λ/m used
instead of λ/2m", "normalized by the batch size"); a leaf penalized against
the mask is named by the default mask's role rules ("a bias", "a norm
scale"); a term of the wrong shape is named decoupled decay where it is one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxl2.core._paths import Leaf
from jaxl2.masks._roles import Role, role_of
from jaxl2.verify._verify_fit import LeafFit
from jaxl2.verify._verify_report import UNTESTABLE, Status, VerifyRow

__all__ = ["Units", "frozen_or_rounding", "judge", "lam_form", "rounding_note"]


class Units(NamedTuple):
  """How factors read as formulas: the intended coefficient is ``half``·λ/m."""

  half: float  # 0.5 for a penalty (λ/2m · Σ‖W‖²), 1.0 for a decay rate (λ/m)
  m: float
  batch_size: int | None
  rtol: float
  verb: str  # "penalized" or "decayed"


def _near(x: float, target: float, rtol: float) -> bool:
  return abs(x - target) <= rtol * abs(target)


_FORMS = ((0.25, "λ/4{d}"), (0.5, "λ/2{d}"), (1.0, "λ/{d}"), (2.0, "2λ/{d}"))

# What dividing by each denominator says about the mistake ("b": the batch size; "": nothing).
_WHY_DENOMINATOR = {
  "m": "",
  "b": " (normalized by the batch size b={b} instead of m)",
  "": " (not divided by m)",
}


def _formula(a: float, d: str) -> str:
  """``a``·λ/``d`` written out: (0.5, "m") -> "λ/2m", (1.0, "") -> "λ"."""
  return dict(_FORMS)[a].format(d=d).removesuffix("/")


def _name_factor(factor: float, units: Units) -> str:
  """Names a factor that a common mistake explains, e.g. 2 ⇒ "λ/m used instead of λ/2m"."""
  intended = _formula(units.half, "m")
  found_over_lam = factor * units.half / units.m  # the coefficient found, per unit λ
  denominators = [("m", units.m)]
  if units.batch_size is not None:
    denominators.append(("b", float(units.batch_size)))
  denominators.append(("", 1.0))
  names = []
  for symbol, d in denominators:
    for a, _ in _FORMS:
      if _near(found_over_lam * d, a, units.rtol) and (symbol, a) != ("m", units.half):
        why = _WHY_DENOMINATOR[symbol].format(b=units.batch_size)
        names.append(f"{_formula(a, symbol)} used instead of {intended}{why}")
  return " or ".join(names)


_KINDS = {
  Role.BIAS: "a bias",
  Role.NORM_SCALE: "a norm scale",
  Role.NORM_OFFSET: "a norm offset",
  Role.NORM_OTHER: "a norm parameter",
  Role.POSITIONAL: "a positional embedding",
  Role.CLASS_TOKEN: "a class token",
}


def _leaf_kind(path: str, shape: tuple[int, ...]) -> str:
  """What the leaf is, by the same role rules as the default mask (`jaxl2.by_role`)."""
  role = role_of(Leaf(path, np.broadcast_to(np.float32(0), shape)))  # a view: no copy
  return _KINDS.get(role, "this leaf")


def _shape_note(fit: LeafFit, misfit: float, units: Units, update: bool) -> str:
  if misfit <= units.rtol:
    return ""
  if update and fit.residual_direction <= units.rtol * fit.measured:
    return "decoupled decay (∝ W, added after `base_tx` rescales), not coupled L2"
  what = "the coupled L2 effect" if update else "(λ/m)·W"
  return f"not proportional to {what} (misfit {misfit:.0%})"


def _scaled_note(factor: float, multiplier: float, units: Units) -> str:
  if factor < 0:
    return f"×{factor:.4g}: opposite sign, pushes weights away from 0"
  named = _name_factor(factor, units) if multiplier == 1.0 else ""
  if named:
    return named
  hint = ""
  if units.batch_size is None and factor > 4:
    hint = "; pass `batch_size=` to test for batch-size normalization"
  return f"×{factor:.4g} the intended strength{hint}"


def judge(
  path: str, shape: tuple[int, ...], multiplier: float, fit: LeafFit, units: Units, update: bool
) -> VerifyRow:
  """Classifies one leaf from its `LeafFit`.

  A term counts as absent when its norm is at most ``rtol`` times that of
  the multiplier-1 term (``unit``). For updates, a measured term that is
  proportional to W when the intended one is not is decoupled weight decay.
  """
  rtol = units.rtol

  def row(status: Status, found: float, factor: float, misfit: float, note: str = "") -> VerifyRow:
    return VerifyRow(path, shape, status, multiplier, found, factor, misfit, note)

  if not fit.finite:
    return row("differs", math.nan, math.nan, math.nan, "non-finite values (NaN or inf)")
  threshold = rtol * fit.unit
  present = fit.measured > threshold
  wanted = multiplier > 0 and fit.intended > threshold
  if not present and not wanted:
    if multiplier > 0 and update:
      return row("unverified", 0.0, 0.0, 0.0, UNTESTABLE)
    return row("ok", 0.0, 0.0, 0.0)
  if not present:
    why = "" if update else " (no gradient term depends on λ: λ ignored, a constant baked in?)"
    return row("missing", 0.0, 0.0, 0.0, f"not {units.verb}{why}; `mask` selects it")
  if not wanted:
    misfit = fit.residual_unit / fit.measured
    note = f"{_leaf_kind(path, shape)} is {units.verb}; `mask` excludes it"
    shape_note = _shape_note(fit, misfit, units, update)
    return row(
      "unexpected", fit.k_unit, fit.k_unit, misfit, note + ("; " + shape_note) * bool(shape_note)
    )
  factor, misfit = fit.k_intended, fit.residual_intended / fit.measured
  found = factor * multiplier
  if misfit > rtol:
    return row("differs", found, factor, misfit, _shape_note(fit, misfit, units, update))
  if _near(factor, 1.0, rtol):
    return row("ok", found, factor, misfit)
  return row("scaled", found, factor, misfit, _scaled_note(factor, multiplier, units))


def lam_form(row: VerifyRow, rate: LeafFit, lam: float, units: Units) -> VerifyRow:
  """Flags a penalty whose gradient at λ and whose rate of change in λ disagree.

  For a penalty f(λ)·Σ‖W‖²/2m the row's factor is f(λ)/λ and the rate's is
  f'(λ); both are 1 only for f(λ) = λ. For f = λᵖ their ratio is p.
  """
  if row.status not in ("ok", "scaled") or row.intended == 0 or not rate.finite:
    return row
  k_rate, k_value = rate.k_intended, row.factor
  if _near(k_rate, k_value, units.rtol) or k_value == 0:
    return row
  power = k_rate / k_value
  form = {2.0: "λ²", 3.0: "λ³", 0.5: "√λ"}.get(round(power * 4) / 4, f"λ^{power:.3g}")
  note = (
    f"penalty gradient is {k_value:.4g}× (λ/m)·W at λ = {lam:g}, but changes with λ at "
    f"{k_rate:.4g}×: λ enters as {form}?"
  )
  status: Status = "differs" if _near(k_value, 1.0, units.rtol) else "scaled"
  return dataclasses.replace(row, status=status, note=note)


def frozen_or_rounding(row: VerifyRow, frozen: bool, measured: float, rounding: str) -> VerifyRow:
  """A frozen leaf (zero update from ``base_tx``) must get no decay; a decay must not round away."""
  if frozen:
    if measured > 0:
      return dataclasses.replace(
        row,
        status="frozen-decayed",
        note="frozen by `base_tx` (zero update), but `tx` still decays it",
      )
    return dataclasses.replace(row, status="ok", note="frozen by `base_tx`: not decayed")
  if rounding and row.status in ("ok", "scaled") and row.found > 0:
    return dataclasses.replace(row, status="rounds-away", note=rounding)
  return row


def rounding_note(dtype: Any, stats: Any) -> str:
  """Why the decay of a bf16/fp16 leaf is lost when the update is applied, or "".

  ``stats`` are the leaf's `jaxl2.verify._verify_fit.rounding_stats` (None for
  other leaves): the fraction of entries whose decay is below half an ulp of
  w, the decay relative to w, half an ulp relative to w, and whether any w ≠ 0.
  """
  if stats is None:
    return ""
  lost, decay, half_ulp, any_nonzero = (float(x) for x in stats)
  if not any_nonzero or lost <= 0.5:
    return ""
  return (
    f"rounds away: the decay per step is {decay:.2g}·|w| (lr·λ/m under "
    f"SGD), below half an ulp of w in {jnp.dtype(dtype).name} ({half_ulp:.2g}·|w|) "
    f"for {lost:.0%} of the entries; keep float32 master weights or a larger lr·λ/m"
  )
