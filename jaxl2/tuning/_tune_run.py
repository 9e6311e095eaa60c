"""One `tune_lam` search's record: the λ tried, the best so far, its checkpoints.

`Tuner` trains at a λ (`jaxl2.tuning._minibatch`), measures the hypergradient there
(`jaxl2.implicit._hypergradient`), keeps the path and a copy of the best state, and
writes and reads all of it as one checkpoint (`jaxl2.core._checkpoint`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax

from jaxl2.core._checkpoint import Checkpointer
from jaxl2.implicit._hypergradient import hypergradient
from jaxl2.implicit._implicit import troubles
from jaxl2.penalties._lam_groups import lam_text
from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep
from jaxl2.tuning._minibatch import train_steps as run_steps
from jaxl2.tuning._tune_groups import Searches, bound_reason
from jaxl2.tuning._tune_search import Search

__all__ = ["TuneResult", "TuneStep", "Tuner", "copy_state", "reason_at_stop"]


class TuneStep(NamedTuple):
  """One λ that `tune_lam` tried, after training at it (``diverged``: its training did not
  stay finite, twice; ``val_loss`` is then inf and the hypergradient NaN). With one λ
  per group, ``lam`` and ``hypergradient`` are ``{pattern: value}`` dicts."""

  lam: float | dict[str, float]
  val_loss: float
  hypergradient: float | dict[str, float]
  stationarity: float
  residual: float
  negative_curvature: bool = False
  diverged: bool = False


class TuneResult(NamedTuple):
  """`tune_lam`'s answer.

  Attributes:
    lam: λ*, the λ of the path with the lowest (finite) validation loss; a
      ``{pattern: λ_g}`` dict with one λ per group.
    val_loss: its validation loss.
    params: its trained params (``state.params``).
    path: every λ tried, in order.
    converged: the last step was below ``rtol`` and its hypergradient was
      reliable (the solve reached its tolerance without negative curvature).
    reason: why the search stopped, in words.
    state: the `jaxl2.TrainState` trained at λ* (params, model state, optimizer state).
  """

  lam: float | dict[str, float]
  val_loss: float
  params: Any
  path: tuple[TuneStep, ...]
  converged: bool
  reason: str = ""
  state: TrainState | None = None


def copy_state(state: TrainState) -> TrainState:
  """A copy with its own buffers: the training program donates the state it is given."""
  return jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


class Tuner:
  """One search: its options, where it is, and its checkpoints."""

  def __init__(self, train: TrainStep, data: tuple[Any, Any], opts: dict[str, Any]) -> None:
    self.train, self.data, self.opts = train, data, opts
    self.path: list[TuneStep] = []
    self.found: list[tuple[float, str]] = []  # (λ, trouble) per λ whose hypergradient warned
    self.step_count = 0  # global training steps: the minibatch order is a function of it
    self.best: tuple[int, TrainState] | None = None  # index in path, state

  def fit(self, state: TrainState, lam: float, steps: int) -> tuple[TrainState, bool]:
    state = self.train.set_lam(state, lam)
    state, finite = run_steps(
      self.train, state, self.data[0], steps=steps, chunk=self.opts["retrain_steps"],
      batch_size=self.opts["batch_size"], seed=self.opts["seed"], start=self.step_count,
    )  # fmt: skip
    self.step_count += steps
    return state, finite

  def measure(self, state: TrainState, lam: float) -> tuple[TuneStep, list[str]]:
    hg, used = hypergradient(self.train, state, *self.data, **self.opts["hyper"])
    found = troubles(
      hg.residual, used, hg.negative_curvature, hg.stationarity, self.opts["grad_rtol"],
      curvature=hg.curvature,
    )  # fmt: skip
    step = TuneStep(lam, hg.val_loss, hg.value, hg.stationarity, hg.residual, hg.negative_curvature)
    return step, found

  def record(self, step: TuneStep, state: TrainState | None) -> None:
    self.path.append(step)
    better = self.best is None or step.val_loss < self.path[self.best[0]].val_loss
    if state is not None and math.isfinite(step.val_loss) and better:
      self.best = (len(self.path) - 1, copy_state(state))

  # ---- checkpoints -------------------------------------------------------------------

  def save(self, ckpt: Checkpointer | None, it: int, arrays: dict[str, Any], meta: dict) -> None:
    if ckpt is None:
      return
    best = arrays["state"] if self.best is None else self.best[1]
    record = {
      **meta, "it": it, "path": [list(s) for s in self.path], "found": self.found,
      "step_count": self.step_count, "best": None if self.best is None else self.best[0],
    }  # fmt: skip
    ckpt.save(it, {**arrays, "best": best}, record)

  def load(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    self.path = [TuneStep(*s) for s in meta["path"]]
    self.found = [tuple(f) for f in meta["found"]]
    self.step_count = meta["step_count"]
    self.best = None if meta["best"] is None else (meta["best"], arrays["best"])

  def result(self, converged: bool, reason: str) -> TuneResult:
    if self.best is None:
      raise FloatingPointError(
        f"tune_lam: training diverged (non-finite loss or params) at every λ tried "
        f"({', '.join(lam_text(s.lam, '.3g') for s in self.path)}), even from the starting state. "
        "Lower the optimizer's learning rate, or narrow `lam_bounds`."
      )
    index, state = self.best
    best = self.path[index]
    return TuneResult(
      best.lam, best.val_loss, state.params, tuple(self.path), converged, reason, state
    )


def reason_at_stop(
  tuner: Tuner, search: Search | Searches, found: list[str], lam: Any
) -> tuple[bool, str]:
  """(converged, reason) when the search's step (every group's) fell below ``rtol`` at ``lam``."""
  at_bound = bound_reason(search, tuner.path[-1].hypergradient, lam)
  solver = [t for t in found if "conjugate" in t or "positive definite" in t]
  if at_bound:
    return False, at_bound
  text = lam_text(lam, ".3g")
  if solver:
    return False, f"stopped at λ={text} where the hypergradient is unreliable: {solver[0]}"
  note = f" (W* was not stationary there: {found[0]})" if found else ""
  return True, f"converged: the step in log λ fell below `rtol` at λ={text}{note}"
