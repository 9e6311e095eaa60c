"""`tune_lam`'s search on u = log λ: a safeguarded secant step between bounds.

From g = dV/du (u = log λ) the next u is u − g/h, h the slope between the
last two g (a full ``max_step`` downhill when no positive slope is known;
never more than ``max_step``; while unbracketed and moving the same way, at
least twice the last step, as V may fall on far beyond); once the minimum is bracketed (g < 0 at one
end, g > 0 at the other) a step that would leave the bracket goes to its
midpoint instead. u never leaves [log λ_min, log λ_max]. The state is plain
numbers, so a checkpoint can store it (`as_dict`, `from_dict`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Search"]


class Search:
  """The next log λ from g = dV/d log λ (module docstring)."""

  def __init__(self, max_step: float, lo_bound: float, hi_bound: float) -> None:
    self.max_step, self.lo_bound, self.hi_bound = max_step, lo_bound, hi_bound
    self.lo, self.hi = -math.inf, math.inf  # the bracket
    self.last: tuple[float, float] | None = None
    self.clamped = False  # the last step was cut short by a bound
    self.moved = 0.0  # the last step

  def step(self, u: float, g: float) -> float:
    """The change of u from u, given g = dV/du there."""
    if g < 0:  # V falls as λ grows: the minimum is above u
      self.lo, self.hi = (u, self.hi) if u < self.hi else (u, math.inf)
    elif g > 0:  # a bracket the noise of training contradicts is dropped
      self.lo, self.hi = (self.lo, u) if u > self.lo else (-math.inf, u)
    slope = math.nan
    if self.last is not None and self.last[0] != u:
      slope = (g - self.last[1]) / (u - self.last[0])
    self.last = (u, g)
    step = -g / slope if slope > 0 else -math.copysign(self.max_step, g) * (g != 0)
    if not math.isfinite(self.lo + self.hi) and self.moved and step * self.moved > 0:
      # Not bracketed yet and still going the same way: V may keep falling far beyond
      # (g decaying like a power of λ), where secant steps would only shrink.
      step = math.copysign(max(abs(step), 2 * abs(self.moved)), step)
    new = u + min(max(step, -self.max_step), self.max_step)
    if math.isfinite(self.lo + self.hi) and not self.lo < new < self.hi:
      new = (self.lo + self.hi) / 2
    self.moved = self.clamp(new) - u
    return self.moved

  def away(self, u: float) -> float:
    """The change of u after a λ whose training diverged: ``max_step`` down (a large λ
    stiffens the loss; at λ_min, up instead)."""
    self.last, self.moved = None, 0.0  # no slope or direction across a divergence
    new = self.clamp(u - self.max_step)
    return new - u if new != u else self.clamp(u + self.max_step) - u

  def clamp(self, u: float) -> float:
    clamped = min(max(u, self.lo_bound), self.hi_bound)
    self.clamped = clamped != u
    return clamped

  def as_dict(self) -> dict[str, Any]:
    last = None if self.last is None else list(self.last)
    return {"lo": self.lo, "hi": self.hi, "last": last, "moved": self.moved}

  def load(self, saved: dict[str, Any]) -> None:
    self.lo, self.hi, self.moved = saved["lo"], saved["hi"], saved["moved"]
    self.last = None if saved["last"] is None else tuple(saved["last"])
