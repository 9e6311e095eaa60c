r"""`tune_lam` with one λ per group: a safeguarded secant search on each log λ_g.

With a `jaxl2.TrainStep` built with ``lam={pattern: λ_g}``, the hypergradient
is a vector (`jaxl2.lam_hypergradient`: one solve for every group), and each
group's u_g = log λ_g moves by its own `jaxl2.tuning._tune_search.Search` from its
own component g_g = λ_g·dV/dλ_g, all groups at each iteration, each within its
own bounds. The search has converged when every group's step is below
``rtol``. Points (u, λ, g) are floats with one λ and ``{pattern: float}``
dicts with groups; the helpers below take either, so `jaxl2.tuning._tune` runs one
loop for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from jaxl2.core._checks import check_lam
from jaxl2.penalties._lam_groups import is_grouped, lam_floats, lam_text
from jaxl2.tuning._tune_search import Search

__all__ = [
  "Searches",
  "add",
  "below",
  "bound_reason",
  "bounds_json",
  "check_start",
  "lam_of",
  "log_of",
  "log_slope",
  "nan_like",
  "new_search",
  "none_moved",
]

Point = Any  # a float, or {pattern: float}


def _each(fn: Callable[..., float], *points: Point) -> Point:
  """``fn`` on a float point, or on each group's component of dict points."""
  if isinstance(points[0], Mapping):
    return {p: fn(*(x[p] for x in points)) for p in points[0]}
  return fn(*points)


def _values(point: Point) -> list[float]:
  return list(point.values()) if isinstance(point, Mapping) else [point]


def lam_of(u: Point) -> Point:
  """λ = exp(u)."""
  return _each(math.exp, u)


def log_of(lam: Point) -> Point:
  """u = log λ."""
  return _each(math.log, lam)


def log_slope(lam: Point, hypergradient: Point) -> Point:
  """g = dV/d log λ = λ·dV/dλ (per group)."""
  return _each(lambda a, b: a * b, lam, hypergradient)


def add(u: Point, du: Point) -> Point:
  return _each(lambda a, b: a + b, u, du)


def nan_like(lam: Point) -> Point:
  """NaN where ``lam`` has a value: the hypergradient of a λ whose training diverged."""
  return _each(lambda _: math.nan, lam)


def below(du: Point, rtol: float) -> bool:
  """Every group's step is below ``rtol``."""
  return all(abs(x) < rtol for x in _values(du))


def none_moved(du: Point) -> bool:
  return all(x == 0 for x in _values(du))


class Searches:
  """One `Search` per group, keyed by pattern, with `Search`'s interface on dict points."""

  def __init__(self, max_step: float, bounds: Mapping[str, tuple[float, float]]) -> None:
    self.each = {p: Search(max_step, math.log(lo), math.log(hi)) for p, (lo, hi) in bounds.items()}

  def step(self, u: dict[str, float], g: dict[str, float]) -> dict[str, float]:
    """Each group's change of u_g from its g_g = dV/du_g."""
    return {p: s.step(u[p], g[p]) for p, s in self.each.items()}

  def away(self, u: dict[str, float]) -> dict[str, float]:
    """Each group ``max_step`` down after a divergence (`Search.away`)."""
    return {p: s.away(u[p]) for p, s in self.each.items()}

  @property
  def clamped(self) -> bool:
    return any(s.clamped for s in self.each.values())

  def as_dict(self) -> dict[str, Any]:
    return {p: s.as_dict() for p, s in self.each.items()}

  def load(self, saved: dict[str, Any]) -> None:
    for p, s in self.each.items():
      s.load(saved[p])


def new_search(max_step: float, bounds: Any) -> Search | Searches:
  """A `Search` for bounds (lo, hi), `Searches` for {pattern: (lo, hi)}."""
  if is_grouped(bounds):
    return Searches(max_step, bounds)
  return Search(max_step, math.log(bounds[0]), math.log(bounds[1]))


def bound_reason(search: Search | Searches, hypergradient: Point, lam: Point) -> str | None:
  """Why the search stopped at a bound, when its last step was cut by one; else None."""
  if not search.clamped:
    return None
  fix = (
    "the validation loss still falls beyond it. Widen `lam_bounds` if a λ out there is plausible."
  )
  if isinstance(search, Search):
    side = "λ_min" if hypergradient > 0 else "λ_max"
    return f"stopped at {side} = {lam:.3g} (`lam_bounds`): {fix}"
  at = [
    f"{'λ_min' if hypergradient[p] > 0 else 'λ_max'} = {lam[p]:.3g} for {p!r}"
    for p, s in search.each.items()
    if s.clamped
  ]
  return f"stopped at {', '.join(at)} (`lam_bounds`) at λ={lam_text(lam, '.3g')}: {fix}"


def _check_bounds(bounds: Any, name: str) -> tuple[float, float]:
  if not (isinstance(bounds, tuple) and len(bounds) == 2 and 0 < bounds[0] < bounds[1] < math.inf):
    raise ValueError(
      f"`{name}` must be a tuple (λ_min, λ_max) with 0 < λ_min < λ_max < inf (the search is "
      f"on log λ); got {bounds!r}."
    )
  return bounds


def _check_lam0(lam0: Any, bounds: tuple[float, float], name: str, where: str) -> None:
  check_lam(lam0, name)
  if not bounds[0] <= float(lam0) <= bounds[1]:
    raise ValueError(
      f"`{name}` must lie within {where} {bounds} (and be > 0: the search is on log λ); got "
      f"{lam0!r}. Pass `lam0=`, or set the state's λ with `train.set_lam(state, lam)`."
    )


def check_start(lam0: Any, bounds: Any, train_lam: Any) -> tuple[Point, Any]:
  """``lam0`` as floats and ``lam_bounds`` checked: one (lo, hi), or {pattern: (lo, hi)}.

  With a step built with one λ per group (``train_lam`` a table), ``lam0`` is
  a table with its patterns and ``lam_bounds`` one (lo, hi) for every group
  or a table of them.

  Raises:
    TypeError: ``lam0`` or ``lam_bounds`` a table for a step with one λ, or
      ``lam0`` one number for a step with groups.
    ValueError: bad bounds, a λ0 outside them, patterns that differ.
  """
  if not is_grouped(train_lam):
    if is_grouped(lam0) or is_grouped(bounds):
      which = "lam0" if is_grouped(lam0) else "lam_bounds"
      raise TypeError(
        f"`{which}` is a {{pattern: ...}} table, but `train` was built with one λ. To tune one "
        "λ per group, build it with `jaxl2.make_train_step(..., lam={pattern: λ, ...})`."
      )
    _check_lam0(lam0, _check_bounds(bounds, "lam_bounds"), "lam0", "`lam_bounds`")
    return float(lam0), bounds
  patterns = list(train_lam)
  for name, table in (("lam0", lam0), ("lam_bounds", bounds)):
    table_needed = name == "lam0" or is_grouped(table)  # bounds may be one (lo, hi) for all
    if table_needed and not (is_grouped(table) and set(table) == set(patterns)):
      raise TypeError(
        f"`{name}` must be a table with the patterns `train` was built with ({patterns}); "
        f"got {table!r}."
      )
  each = {
    p: _check_bounds(bounds[p] if is_grouped(bounds) else bounds, f"lam_bounds[{p!r}]")
    for p in patterns
  }
  for p in patterns:
    _check_lam0(lam0[p], each[p], f"lam0[{p!r}]", f"`lam_bounds` for {p!r}")
  return lam_floats({p: lam0[p] for p in patterns}), each


def bounds_json(bounds: Any) -> Any:
  """``lam_bounds`` as JSON gives it back (lists), for a checkpoint's fingerprint."""
  if is_grouped(bounds):
    return {p: list(b) for p, b in bounds.items()}
  return list(bounds)
