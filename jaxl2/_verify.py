r"""Autodiff checks of users' own regularization code: `verify_penalty`, `verify_update`.

The classic L2 bugs live in training code, not in a library: the bias or a
LayerNorm scale decayed by accident, a mask that matches nothing, λ/m where
λ/2m was meant, a penalty normalized by the batch size instead of m, weight
decay placed after Adam when coupled L2 was intended. Each one changes the
gradient (or the update) a leaf receives from the penalty, so each one shows
up, leaf by leaf, when that gradient is measured with autodiff and compared
with the intended (λ/m) · c_j · W_j.

How the measurement avoids float32 cancellation:

* `verify_penalty` does not subtract ``∇loss(λ) − ∇loss(0)``: the data
  gradient can be 10⁶ times the penalty's, and in float32 the difference
  would be rounding noise. It differentiates the gradient with respect to λ
  instead, ``∂/∂λ ∇_W loss(W, λ)`` (one `jax.jvp` of `jax.grad`). The data
  term does not depend on λ, so it drops out exactly (JAX propagates a
  symbolic zero through it); for a penalty linear in λ what is left is the
  penalty's gradient per unit λ, ``(1/m)·c_j·W_j`` when the code is right.
* `verify_update` differentiates the optimizer's update with respect to the
  params along the params themselves. A decay term is linear in W, so this
  directional derivative *is* the decay's effect on the update, without the
  subtraction ``tx(g) − base_tx(g)`` (whose result, under Adam, is smaller
  than float32 can resolve); the intended effect is the same derivative of
  ``base_tx(g + (λ/m)·c·W)``.

Both are called with concrete values, outside `jax.jit`: the measurement is
one compiled program (the user's function is traced once, as `jax.grad`
would), and the verdict is plain Python on the few numbers it returns, so no
Python ``if`` ever sees a traced value.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2._checks import check_lam, check_m, check_optimizer
from jaxl2._dtypes import is_inexact
from jaxl2._masks import MaskSpec, Selection, all_floating, resolve
from jaxl2._paths import Leaf, flatten
from jaxl2._penalties import l2_penalty_grad
from jaxl2._roles import Role, role_of
from jaxl2._table import html_table, text_table

__all__ = ["VerifyReport", "VerifyRow", "verify_penalty", "verify_update"]

Status = Literal[
  "ok", "missing", "unexpected", "scaled", "differs", "unverified", "frozen-decayed", "rounds-away"
]

_HALF_PRECISION = frozenset({jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})


# ---- the report ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifyRow:
  """One leaf of a `VerifyReport`.

  Multipliers are in units of the intended per-leaf term (λ/m)·W: a kernel
  the mask selects has ``intended == 1.0``; a bias it leaves out has 0.0.

  Attributes:
    path: the parameter's path (``params/Dense_0/bias``), as in `jaxl2.describe`.
    shape: the leaf's shape.
    status: ``"ok"``; ``"missing"`` (intended but not penalized);
      ``"unexpected"`` (penalized but not intended); ``"scaled"`` (penalized
      with the wrong strength, see ``factor``; also a penalty of the wrong
      form in λ, such as λ²); ``"differs"`` (not proportional to the
      intended term at all); ``"unverified"`` (the decay cannot be observed
      through ``base_tx``, e.g. a sign-based optimizer); ``"frozen-decayed"``
      (``base_tx`` leaves the leaf frozen, a zero update, but ``tx`` decays
      it); ``"rounds-away"`` (the decay per step is below half an ulp of the
      leaf's bf16/fp16 weights, so applying the update loses it).
    intended: the multiplier c_j that the intended ``mask`` gives the leaf.
    found: the multiplier measured in the user's code: the least-squares
      fit of the measured term onto the term of multiplier 1 ((λ/m)·W for a
      penalty; its effect through ``base_tx`` for an update); 0.0 when
      nothing is measured.
    factor: ``found / intended`` for intended leaves, ``found`` for others.
    misfit: ‖measured − fit‖ / ‖measured‖: 0 when proportional.
    note: the diagnosis in words ("λ/m used instead of λ/2m"), or "".
  """

  path: str
  shape: tuple[int, ...]
  status: Status
  intended: float
  found: float
  factor: float
  misfit: float
  note: str = ""


@dataclasses.dataclass(frozen=True)
class VerifyReport:
  """What `verify_penalty` and `verify_update` return.

  ``str(report)`` is a table with one row per floating leaf and a one-line
  verdict; ``report.ok`` is True when every row is ``"ok"``.

  Attributes:
    check: ``"verify_penalty"`` or ``"verify_update"``.
    rows: one `VerifyRow` per floating leaf, in pytree order (integer and
      key leaves cannot be penalized and are left out).
    lam, m: as given.
    rtol: the relative tolerance the rows were judged with.
    batch_size: as given, or ``None``.
    unverified: why nothing could be verified (λ = 0), or "".
  """

  check: str
  rows: tuple[VerifyRow, ...]
  lam: float
  m: float
  rtol: float
  batch_size: int | None = None
  unverified: str = ""

  @property
  def ok(self) -> bool:
    """True when the check could run and every leaf gets exactly what the intended mask says."""
    return not self.unverified and all(row.status == "ok" for row in self.rows)

  @property
  def failures(self) -> tuple[VerifyRow, ...]:
    """The rows whose status is not ``"ok"``."""
    return tuple(row for row in self.rows if row.status != "ok")

  @property
  def verdict(self) -> str:
    """One line: OK, or what is wrong."""
    penalty = self.check == "verify_penalty"
    intended = [row for row in self.rows if row.intended > 0]
    if self.unverified:
      return f"UNVERIFIED: {self.unverified}"
    if self.ok:
      what = "penalized with (λ/m)·c·W" if penalty else "decayed as coupled L2 through `base_tx`"
      return (
        f"OK: {len(intended)} of {len(self.rows)} leaves {what}, as intended; "
        "the others are left alone."
      )
    if all(row.status == "unverified" for row in self.failures):
      return (
        f"UNVERIFIED: {len(self.failures)} of {len(self.rows)} leaves: {_UNTESTABLE}; "
        "nothing wrong was found, but nothing was verified there either."
      )
    failures = self.failures
    if (
      intended
      and all(row.status == "missing" for row in failures)
      and len(failures) == len(intended)
    ):
      cause = "`loss_fn` ignores its `lam`" if penalty else "`tx` adds no decay"
      verb = "penalized" if penalty else "decayed"
      return f"FAILED: no leaf is {verb}: a mask that matches nothing? (or {cause})"
    counts: dict[str, int] = {}
    for row in failures:
      counts[row.status] = counts.get(row.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"FAILED: {len(failures)} of {len(self.rows)} leaves wrong ({summary})."

  def raise_if_failed(self) -> None:
    """Raises ValueError with the table unless `ok`.

    Raises:
      ValueError: some leaf is not penalized as intended, or nothing could be
        verified (λ = 0); the message is ``str(self)``, ending with the verdict.
    """
    if not self.ok:
      raise ValueError(str(self))

  def _cells(self) -> tuple[str, tuple[str, ...], list[tuple[str, ...]]]:
    what = (
      "the penalty gradient in `loss_fn` vs (λ/m)·c·W"
      if self.check == "verify_penalty"
      else "the decay in `tx` vs (λ/m)·c·W through `base_tx`"
    )
    title = f"{self.check}: {what}; λ={self.lam:g}, m={self.m:g}, rtol={self.rtol:g}"
    header = ("path", "shape", "intended", "found", "status", "note")
    body = [
      (
        row.path,
        "x".join(map(str, row.shape)) if row.shape else "()",
        f"{row.intended:.4g}" if row.intended else "-",
        f"{row.found:.4g}" if row.found else "-",
        row.status,
        row.note,
      )
      for row in self.rows
    ]
    return title, header, body

  def __str__(self) -> str:
    title, header, body = self._cells()
    return text_table(header, body, right={2, 3}, title=[title], footer=[self.verdict])

  def _repr_html_(self) -> str:
    """The report as an HTML table, for Jupyter and Colab."""
    title, header, body = self._cells()
    return html_table(header, body, title=[title], footer=[self.verdict])


# ---- probing --------------------------------------------------------------------


class _Tree(NamedTuple):
  """The params split into floating leaves (which the check varies) and the rest."""

  leaves: list[Any]
  treedef: jax.tree_util.PyTreeDef
  index: list[int]  # positions of the floating leaves in ``leaves``

  def rebuild(self, floats: Sequence[Any]) -> Any:
    full = list(self.leaves)
    for i, value in zip(self.index, floats, strict=True):
      full[i] = value
    return jax.tree_util.tree_unflatten(self.treedef, full)

  def pick(self, tree: Any) -> list[Any]:
    """The floating leaves of ``tree``, a pytree with the structure of the params."""
    leaves = self.treedef.flatten_up_to(tree)
    return [leaves[i] for i in self.index]


def _standard_normal(seed: tuple[int, int], like: Any) -> np.ndarray:
  """A fixed N(0, 1) draw shaped like ``like``, with NumPy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  dtype = np.dtype(like.dtype)
  if np.issubdtype(dtype, np.complexfloating):
    re, im = rng.standard_normal((2, *like.shape), dtype=np.finfo(dtype).dtype) / np.sqrt(2)
    return (re + 1j * im).astype(dtype)
  return rng.standard_normal(like.shape, dtype=dtype)


def _probe(params: Any) -> tuple[_Tree, list[Any]]:
  """The params' structure and the floating leaves the check runs at.

  bf16/fp16 leaves are upcast to float32. At W = 0 the gradient of any L2
  penalty is 0, so a freshly initialized (zero) bias would look unpenalized
  whatever the code does: leaves that are all zeros are replaced by a fixed
  N(0, 1) draw.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  index = [i for i, value in enumerate(leaves) if is_inexact(value)]
  probe = []
  for k, i in enumerate(index):
    value = jnp.asarray(leaves[i])
    if value.dtype in _HALF_PRECISION:
      value = np.asarray(value).astype(np.float32)
    if value.size and not np.any(np.asarray(value)):
      value = _standard_normal((0, k), value)
    probe.append(value)
  return _Tree(leaves, treedef, index), probe


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.abs(x) ** 2)) if x.size else jnp.zeros((), jnp.float32)


# ---- judging one leaf -----------------------------------------------------------


class _Stats(NamedTuple):
  """Norms and least-squares fits of one leaf's measured term s (Python floats).

  ``k_*`` is the k in s ≈ k·r and ``residual_*`` is ‖s − k·r‖, for r the
  intended term, the multiplier-1 term (``unit``) and the direction W.
  """

  finite: bool
  measured: float
  intended: float
  unit: float
  k_intended: float
  residual_intended: float
  k_unit: float
  residual_unit: float
  residual_direction: float


def _flat(x: Any) -> np.ndarray:
  """A leaf as a flat real NumPy array (complex as interleaved real and imaginary parts)."""
  x = np.ascontiguousarray(jax.device_get(x)).ravel()
  return x.view(x.real.dtype) if np.iscomplexobj(x) else x


def _dot(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.dot(a, b))  # BLAS: float32 sums over millions of elements good to ~1e-7


def _fit(s: np.ndarray, r: np.ndarray) -> tuple[float, float]:
  """k in s ≈ k·r (least squares) and the residual ‖s − k·r‖."""
  rr = _dot(r, r)
  k = _dot(r, s) / rr if rr > 0 else 0.0
  residual = s - np.asarray(k, s.dtype) * r
  return k, math.sqrt(_dot(residual, residual))


def _leaf_stats(measured: Any, intended: Any, unit: Any, direction: Any) -> _Stats:
  """`_Stats` of one leaf, with NumPy on the host (no compilation, BLAS sums)."""
  s, t, u, d = (_flat(x) for x in (measured, intended, unit, direction))
  finite = bool(np.all(np.isfinite(s)) and np.all(np.isfinite(t)))
  if not finite:
    return _Stats(False, *([math.nan] * 8))
  norms = [math.sqrt(_dot(x, x)) for x in (s, t, u)]
  return _Stats(True, *norms, *_fit(s, t), *_fit(s, u), _fit(s, d)[1])


def _near(x: float, target: float, rtol: float) -> bool:
  return abs(x - target) <= rtol * abs(target)


class _Units(NamedTuple):
  """How factors read as formulas: the intended coefficient is ``half``·λ/m."""

  half: float  # 0.5 for a penalty (λ/2m · Σ‖W‖²), 1.0 for a decay rate (λ/m)
  m: float
  batch_size: int | None
  rtol: float
  verb: str  # "penalized" or "decayed"


_FORMS = ((0.25, "λ/4{d}"), (0.5, "λ/2{d}"), (1.0, "λ/{d}"), (2.0, "2λ/{d}"))


def _formula(a: float, d: str) -> str:
  """``a``·λ/``d`` written out: (0.5, "m") -> "λ/2m", (1.0, "") -> "λ"."""
  return dict(_FORMS)[a].format(d=d).removesuffix("/")


def _name_factor(factor: float, units: _Units) -> str:
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
        why = {
          "m": "",
          "b": f" (normalized by the batch size b={units.batch_size} instead of m)",
          "": " (not divided by m)",
        }[symbol]
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


def _judge(
  path: str, shape: tuple[int, ...], multiplier: float, st: _Stats, units: _Units, update: bool
) -> VerifyRow:
  """Classifies one leaf from its `_Stats`.

  A term counts as absent when its norm is at most ``rtol`` times that of
  the multiplier-1 term (``unit``). For updates, a measured term that is
  proportional to W when the intended one is not is decoupled weight decay.
  """
  rtol = units.rtol

  def row(status: Status, found: float, factor: float, misfit: float, note: str = "") -> VerifyRow:
    return VerifyRow(path, shape, status, multiplier, found, factor, misfit, note)

  if not st.finite:
    return row("differs", math.nan, math.nan, math.nan, "non-finite values (NaN or inf)")
  threshold = rtol * st.unit
  present = st.measured > threshold
  wanted = multiplier > 0 and st.intended > threshold
  if not present and not wanted:
    if multiplier > 0 and update:
      return row("unverified", 0.0, 0.0, 0.0, _UNTESTABLE)
    return row("ok", 0.0, 0.0, 0.0)
  if not present:
    why = "" if update else " (no gradient term depends on λ: λ ignored, a constant baked in?)"
    return row("missing", 0.0, 0.0, 0.0, f"not {units.verb}{why}; `mask` selects it")
  if not wanted:
    misfit = st.residual_unit / st.measured
    note = f"{_leaf_kind(path, shape)} is {units.verb}; `mask` excludes it"
    shape_note = _shape_note(st, misfit, units, update)
    return row(
      "unexpected", st.k_unit, st.k_unit, misfit, note + ("; " + shape_note) * bool(shape_note)
    )
  factor, misfit = st.k_intended, st.residual_intended / st.measured
  found = factor * multiplier
  if misfit > rtol:
    return row("differs", found, factor, misfit, _shape_note(st, misfit, units, update))
  if _near(factor, 1.0, rtol):
    return row("ok", found, factor, misfit)
  return row("scaled", found, factor, misfit, _scaled_note(factor, multiplier, units))


_UNTESTABLE = "untestable: `base_tx` does not respond to this change of the gradient"


def _lam_form(row: VerifyRow, rate: _Stats, lam: float, units: _Units) -> VerifyRow:
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


def _frozen_or_rounding(row: VerifyRow, frozen: bool, measured: float, rounding: str) -> VerifyRow:
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


def _rounding_note(leaf: Any, effect: np.ndarray, w: np.ndarray) -> str:
  """Why the decay of a bf16/fp16 leaf is lost when the update is applied, or ""."""
  dtype = jnp.dtype(getattr(leaf, "dtype", np.float32))
  if dtype not in _HALF_PRECISION:
    return ""
  w = np.abs(np.asarray(w, np.float64).ravel())
  effect = np.abs(np.asarray(effect, np.float64).ravel())
  nonzero = w > 0
  if not np.any(nonzero):
    return ""
  w, effect = w[nonzero], effect[nonzero]
  # ulp of a normal number: 2^(exponent − mantissa bits) in the leaf's own dtype.
  half_ulp = 0.5 * np.exp2(np.floor(np.log2(w)) - jnp.finfo(dtype).nmant)
  lost = float(np.mean(effect < half_ulp))
  if lost <= 0.5:
    return ""
  return (
    f"rounds away: the decay per step is {float(np.median(effect / w)):.2g}·|w| (lr·λ/m under "
    f"SGD), below half an ulp of w in {dtype.name} ({float(np.median(half_ulp / w)):.2g}·|w|) "
    f"for {lost:.0%} of the entries; keep float32 master weights or a larger lr·λ/m"
  )


def _shape_note(st: _Stats, misfit: float, units: _Units, update: bool) -> str:
  if misfit <= units.rtol:
    return ""
  if update and st.residual_direction <= units.rtol * st.measured:
    return "decoupled decay (∝ W, added after `base_tx` rescales), not coupled L2"
  what = "the coupled L2 effect" if update else "(λ/m)·W"
  return f"not proportional to {what} (misfit {misfit:.0%})"


def _scaled_note(factor: float, multiplier: float, units: _Units) -> str:
  if factor < 0:
    return f"×{factor:.4g}: opposite sign, pushes weights away from 0"
  named = _name_factor(factor, units) if multiplier == 1.0 else ""
  if named:
    return named
  hint = ""
  if units.batch_size is None and factor > 4:
    hint = "; pass `batch_size=` to test for batch-size normalization"
  return f"×{factor:.4g} the intended strength{hint}"


# ---- measuring ------------------------------------------------------------------


def _penalty_stats(
  loss_fn: Callable[[Any, Any], Any],
  tree: _Tree,
  probe: list[Any],
  multipliers: list[float],
  lam: Any,
  m: float,
) -> tuple[list[_Stats], list[_Stats]]:
  """The penalty gradient at λ (per unit λ) and its rate of change in λ, against c·W/m.

  Both come from λ-derivatives of ∇_W loss_fn(W, λ), which have no data term
  (it drops out as a symbolic zero): the rate g'(λ) and the curvature g''(λ)
  (forward mode twice over `jax.grad`). The penalty gradient at λ per unit λ
  is [g(λ) − g(0)]/λ = g'(λ) − (λ/2)·g''(λ), exact for a penalty up to
  quadratic in λ (λ² included) and free of the cancellation of that subtraction.
  """
  wide = any(jnp.finfo(x.dtype).bits == 64 for x in probe)
  lam = jnp.asarray(lam, jnp.float64 if wide else jnp.float32)

  @jax.jit
  def run(probe: list[jax.Array], lam: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    def grad_at(lam_: jax.Array) -> list[jax.Array]:
      return jax.grad(lambda w: loss_fn(tree.rebuild(w), lam_))(probe)

    def slope_at(t: jax.Array) -> list[jax.Array]:
      return jax.jvp(grad_at, (t,), (jnp.ones_like(t),))[1]

    # The rate f'(λ) and the curvature f''(λ) in one forward-over-forward pass.
    rate, curvature = jax.jvp(slope_at, (lam,), (jnp.ones_like(lam),))
    return rate, [r - 0.5 * lam * c for r, c in zip(rate, curvature, strict=True)]

  try:
    rate, value = jax.device_get(run(probe, lam))
  except jax.errors.ConcretizationTypeError as err:
    raise TypeError(
      "`loss_fn(params, lam)` must be differentiable in `lam`: `verify_penalty` takes "
      "∂/∂λ of its gradient, so `lam` must enter as a number in arithmetic (no "
      "`if lam > 0`, `float(lam)` or `lam.item()` inside)."
    ) from err
  value_stats, rate_stats = [], []
  for s, v, w, c in zip(rate, value, jax.device_get(probe), multipliers, strict=True):
    unit = np.conj(w) / np.asarray(m, w.real.dtype)  # JAX's gradient convention for complex
    intended = np.asarray(c, unit.real.dtype) * unit
    value_stats.append(_leaf_stats(v, intended, unit, w))
    rate_stats.append(_leaf_stats(s, intended, unit, w))
  return value_stats, rate_stats


def _second_update_slope(
  transform: Any,
  tree: _Tree,
  probe: list[jax.Array],
  grads: tuple[list[jax.Array], list[jax.Array]],
  decay: Callable[[Any], list[Any]] | None,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """The second update from a fresh state, and its ∂/∂ε at params (1 + ε)·W, at ε = 0.

  The two steps take the gradients ``grads`` (warm-up, compared), each with
  the floating leaves ``decay(params)`` added first when given (coupled L2
  through ``transform``).
  """
  warm_up, compared = grads
  state0 = transform.init(tree.rebuild(probe))

  def second_update(floats: list[jax.Array]) -> list[jax.Array]:
    params = tree.rebuild(floats)
    extra = decay(params) if decay is not None else [0.0] * len(floats)
    g0 = tree.rebuild([g + d for g, d in zip(warm_up, extra, strict=True)])
    g1 = tree.rebuild([g + d for g, d in zip(compared, extra, strict=True)])
    _, state = transform.update(g0, state0, params)
    updates, _ = transform.update(g1, state, params)
    return tree.pick(updates)

  return jax.jvp(second_update, (probe,), (probe,))


def _draw_grads(
  probe: list[jax.Array],
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
      for w, n in zip(probe, noise[0], strict=True)
    ]
  warm_up = []
  for g, n in zip(grads, noise[1], strict=True):
    rms = _rms(g)
    warm_up.append(10 * jnp.where(rms > 0, rms, 1).astype(g.real.dtype) * n)
  return warm_up, grads


def _update_stats(
  tx: Any,
  base_tx: Any,
  tree: _Tree,
  probe: list[Any],
  grads: list[jax.Array] | None,
  multipliers: list[float],
  lam: float,
  m: float,
) -> list[tuple[_Stats, bool, str]]:
  """Measures the decay's effect in ``tx`` against coupled L2 through ``base_tx``.

  ``base_tx`` runs once, vmapped over three per-leaf multipliers on the
  coupled term (λ/m)·W: 0 (its own dependence on the params), the intended
  ``multipliers``, and 1 (the scale of a decay on every leaf). Per leaf:
  the stats, whether ``base_tx`` freezes it (an all-zero update for a
  non-zero gradient), and why its decay rounds away in bf16/fp16 ("" if not).
  """

  @jax.jit
  def run(
    probe: list[jax.Array], grads: list[jax.Array] | None, noise: Any
  ) -> tuple[list[jax.Array], ...]:
    both = _draw_grads(probe, grads, noise, lam / m)

    def coupled(coefs: jax.Array) -> Callable[[Any], list[Any]]:
      def decay(params: Any) -> list[Any]:
        unit = tree.pick(l2_penalty_grad(params, lam, m, mask=all_floating))
        return [c.astype(d.real.dtype) * d for c, d in zip(coefs, unit, strict=True)]

      return decay

    coefs = jnp.asarray([[0.0] * len(probe), multipliers, [1.0] * len(probe)])
    through_base = jax.vmap(
      lambda c: _second_update_slope(base_tx, tree, probe, both, coupled(c))[1]
    )(coefs)
    user = _second_update_slope(tx, tree, probe, both, None)[1]
    return user, through_base

  @jax.jit
  def frozen_flags(probe: list[jax.Array], grads: list[jax.Array] | None, noise: Any) -> Any:
    # Frozen: `base_tx` gives an all-zero update to a non-zero gradient.
    both = _draw_grads(probe, grads, noise, lam / m)
    updates = _second_update_slope(base_tx, tree, probe, both, None)[0]
    return [~jnp.any(u != 0) & jnp.any(g != 0) for u, g in zip(updates, both[1], strict=True)]

  draws = [_standard_normal((1, k), w) for k, w in enumerate(probe)]
  noise = (draws, [np.roll(n, 1) for n in draws])  # shifted: independent element by element
  user, through_base = jax.device_get(run(probe, grads, noise))
  # Only a leaf on which no decay can act through `base_tx` may be frozen: the
  # second program (the base update's value) runs only when there is one.
  blind = [not np.any(b[2] - b[0]) for b in through_base]
  flags = jax.device_get(frozen_flags(probe, grads, noise)) if any(blind) else blind
  out = []
  for i, (u, b, w) in enumerate(zip(user, through_base, jax.device_get(probe), strict=True)):
    frozen = bool(blind[i] and flags[i])
    effect = u - b[0]
    leaf = tree.leaves[tree.index[i]]
    out.append(
      (_leaf_stats(effect, b[1] - b[0], b[2] - b[0], w), frozen, _rounding_note(leaf, effect, w))
    )
  return out


# ---- validation -----------------------------------------------------------------


def _check_options(lam: Any, m: Any, rtol: Any, batch_size: Any) -> None:
  check_lam(lam)
  check_m(m)
  if isinstance(lam, jax.core.Tracer) or isinstance(m, jax.core.Tracer):
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
  selection: Selection,
  tree: _Tree,
  stats: list[_Stats],
  units: _Units,
  lam: Any,
  adjust: Callable[[int, VerifyRow], VerifyRow],
) -> VerifyReport:
  """One row per floating leaf, judged from its stats, then ``adjust``-ed (k-th such leaf)."""
  rows = []
  for k, (i, st) in enumerate(zip(tree.index, stats, strict=True)):
    leaf, multiplier = selection.leaves[i], selection.multipliers[i]
    shape = tuple(np.shape(leaf.value))
    row = _judge(leaf.path, shape, multiplier, st, units, check == "verify_update")
    rows.append(adjust(k, row))
  unverified = ""
  if float(lam) == 0.0:
    unverified = (
      "λ = 0: the penalty and its gradient vanish, so their strength cannot be checked; "
      "run the check at the λ you train with (> 0)"
      if check == "verify_penalty"
      else "λ = 0: there is no decay to observe; run the check at the λ you train with (> 0)"
    )
  return VerifyReport(
    check, tuple(rows), float(lam), units.m, units.rtol, units.batch_size, unverified
  )


# ---- public API -------------------------------------------------------------------


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
      an intended ``mask`` that selects nothing.

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
  if not callable(loss_fn):
    raise TypeError(
      f"`loss_fn` must be callable as `loss_fn(params, lam)`; got {loss_fn!r:.80} "
      f"({type(loss_fn).__name__}). Pass the function, not its value."
    )
  _check_options(lam, m, rtol, batch_size)
  selection = resolve(params, mask)
  params, selection, loss_fn = _nnx_params(params, selection, loss_fn)
  tree, probe = _probe(params)
  multipliers = [selection.multipliers[i] for i in tree.index]
  stats, rates = _penalty_stats(loss_fn, tree, probe, multipliers, lam, float(m))
  units = _Units(0.5, float(m), batch_size, float(rtol), "penalized")
  return _report(
    "verify_penalty",
    selection,
    tree,
    stats,
    units,
    lam,
    lambda k, row: _lam_form(row, rates[k], float(lam), units),
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
  once, in one compiled program.

  Args:
    tx: the user's `optax.GradientTransformation` (its ``update`` gets params).
    base_tx: the same optimizer without any decay.
    params: the params the optimizer updates.
    lam: λ ≥ 0 that ``tx`` should implement.
    m: the number of training inputs, > 0.
    mask: the intended selection, as for `jaxl2.l2_penalty`.
    grads: the gradients of the compared step (structure of ``params``).
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
    ValueError: as `jaxl2.verify_penalty`; ``grads`` not shaped like ``params``.

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
  selection = resolve(params, mask)
  params, selection, _ = _nnx_params(params, selection, None)
  tree, probe = _probe(params)
  if grads is not None:
    grads = _pick_grads(tree, grads, probe)
  multipliers = [selection.multipliers[i] for i in tree.index]
  measured = _update_stats(tx, base_tx, tree, probe, grads, multipliers, float(lam), float(m))
  units = _Units(1.0, float(m), batch_size, float(rtol), "decayed")
  return _report(
    "verify_update",
    selection,
    tree,
    [st for st, _, _ in measured],
    units,
    lam,
    lambda k, row: _frozen_or_rounding(
      row, measured[k][1], measured[k][0].measured, measured[k][2]
    ),
  )


def _nnx_params(
  params: Any, selection: Selection, loss_fn: Callable[..., Any] | None
) -> tuple[Any, Selection, Any]:
  """A Flax NNX module as its ``nnx.Param`` state: one leaf per Variable (tied weights once).

  Differentiating a module as a plain pytree would give each reference to a
  shared Variable a leaf of its own, so a correct penalty on tied weights
  would look doubled. The check runs on ``nnx.split``'s Param state instead,
  with ``loss_fn`` called on the merged module; the selection is the one
  resolved on the module, read at each Variable's (first) path.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None or not isinstance(params, nnx.Module):
    return params, selection, loss_fn
  graphdef, state, rest = nnx.split(params, nnx.Param, ...)
  by_path = {
    leaf.path: (multiplier, reason)
    for leaf, multiplier, reason in zip(
      selection.leaves, selection.multipliers, selection.reasons, strict=True
    )
  }
  leaves, treedef = flatten(state)
  decided = [by_path[leaf.path] for leaf in leaves]
  state_selection = Selection(leaves, [d[0] for d in decided], treedef, [d[1] for d in decided])

  def on_state(param_state: Any, lam: Any) -> Any:
    # copy=True: fresh Variables at this trace level, so the model may update its state.
    return loss_fn(nnx.merge(graphdef, param_state, rest, copy=True), lam)

  return state, state_selection, (on_state if loss_fn is not None else None)


def _pick_grads(tree: _Tree, grads: Any, floats: list[jax.Array]) -> list[jax.Array]:
  try:
    picked = tree.pick(grads)
  except (ValueError, TypeError) as err:
    raise ValueError(
      f"`grads` must have the structure of `params`; got {jax.tree_util.tree_structure(grads)} "
      f"for params {tree.treedef} ({err})."
    ) from None
  out = []
  for g, w in zip(picked, floats, strict=True):
    g = jnp.asarray(g)
    if g.shape != w.shape:
      raise ValueError(f"`grads` leaf has shape {g.shape}; its parameter has shape {w.shape}.")
    out.append(g.astype(jnp.float32 if w.dtype in _HALF_PRECISION else w.dtype))
  return out
