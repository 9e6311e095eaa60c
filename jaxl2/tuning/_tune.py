r"""`tune_lam`: descent on log λ with implicit hypergradients, retraining warm between steps.

Each λ is trained with the model's own `jaxl2.TrainStep` on shuffled minibatches
(`jaxl2.tuning._minibatch`), then `jaxl2.lam_hypergradient`'s dV/dλ moves log λ by a
safeguarded secant step (`jaxl2.tuning._tune_search`). A λ whose training diverges is
retrained from the last finite state, and skipped if it diverges again; the
search stays within bounds; a checkpoint after each λ lets a preempted search
resume where it was, to the same result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax

from jaxl2.core._checkpoint import Checkpointer, check_checkpoint_dir
from jaxl2.core._checks import check_count
from jaxl2.implicit._batches import check_batch_size, n_examples
from jaxl2.implicit._curvature import GaussNewton
from jaxl2.implicit._implicit import MAXITER
from jaxl2.implicit._lam_setup import check_hosts, check_model
from jaxl2.penalties._lam_groups import lam_text, state_lam
from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep
from jaxl2.tuning._tune_groups import (
  Searches,
  add,
  below,
  bounds_json,
  check_start,
  lam_of,
  log_of,
  log_slope,
  nan_like,
  new_search,
  none_moved,
)
from jaxl2.tuning._tune_run import Tuner, TuneResult, TuneStep, copy_state, reason_at_stop
from jaxl2.tuning._tune_search import Search

__all__ = ["TuneResult", "TuneStep", "tune_lam"]


def _check_options(counts: dict[str, Any], max_step: Any, rtol: Any) -> None:
  for name, value in counts.items():
    check_count(value, name)
  for name, value in (("max_step", max_step), ("rtol", rtol)):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")


def _search(
  tuner: Tuner, ckpt: Checkpointer | None, state: TrainState, anchor: TrainState,
  u: Any, search: Search | Searches, it0: int,
) -> tuple[bool, str]:  # fmt: skip
  """The loop from iteration ``it0``: train, measure, step; returns (converged, reason).

  ``u`` is log λ, a float, or {pattern: log λ_g} with one λ per group (`jaxl2.tuning._tune_groups`).
  """
  opts = tuner.opts
  for it in range(it0, opts["max_iter"]):
    lam = lam_of(u)
    steps = opts["train_steps"] if it == 0 else opts["retrain_steps"]
    state, finite = tuner.fit(state, lam, steps)
    if not finite:  # once more, from the last finite state
      state, finite = tuner.fit(copy_state(anchor), lam, steps)
    if not finite:
      nan = math.nan
      tuner.record(TuneStep(lam, math.inf, nan_like(lam), nan, nan, False, True), None)
      state, du = copy_state(anchor), search.away(u)
      if none_moved(du):
        return False, "training diverged at every λ the bounds allow"
    else:
      anchor = copy_state(state)
      step, found = tuner.measure(state, lam)
      tuner.record(step, state)
      tuner.found += [(lam, t) for t in found[:1]]
      du = search.step(u, log_slope(lam, step.hypergradient))  # dV/d log λ = λ·dV/dλ
      if below(du, opts["rtol"]):
        converged, reason = reason_at_stop(tuner, search, found, lam)
        tuner.save(
          ckpt, it + 1, {"state": state, "anchor": anchor}, _done(u, search, reason, converged)
        )
        return converged, reason
    u = add(u, du)
    tuner.save(ckpt, it + 1, {"state": state, "anchor": anchor}, _done(u, search, None, False))
  return False, f"stopped after `max_iter`={opts['max_iter']} λ values"


def _done(u: Any, search: Search | Searches, reason: str | None, converged: bool) -> dict[str, Any]:
  return {"u": u, "search": search.as_dict(), "reason": reason, "converged": converged}


def _warn_approximate(found: list[tuple[float, str]], tried: int) -> None:
  if found:
    lam, trouble = found[-1]
    warnings.warn(
      f"tune_lam: the hypergradient was approximate at {len(found)} of the {tried} λ "
      f"tried; the last, at λ={lam_text(lam)}: {trouble}",
      RuntimeWarning,
      stacklevel=3,
    )


def _fingerprint(train: TrainStep, state: TrainState, data: tuple[Any, Any], opts: dict) -> dict:
  """What identifies a search, for its checkpoints (JSON-able)."""
  shapes = [list(x.shape) for x in jax.tree_util.tree_leaves(state.params)]
  curvature = opts["hyper"]["curvature"]
  return {
    "lam0": opts["lam0"], "lam_bounds": bounds_json(opts["lam_bounds"]), "m": float(train.m),
    "params": shapes, "n_train": n_examples(data[0], "train_data"),
    "n_val": n_examples(data[1], "val_data"),
    "curvature": curvature if isinstance(curvature, str) else "GaussNewton",
    **{k: opts[k] for k in ("train_steps", "retrain_steps", "batch_size", "seed", "max_iter",
                            "max_step", "rtol")},
  }  # fmt: skip


def tune_lam(
  train: TrainStep,
  state: TrainState,
  train_data: Any,
  val_data: Any,
  *,
  train_steps: int,
  retrain_steps: int | None = None,
  batch_size: int | None = None,
  eval_batch_size: int | None = None,
  val_loss_fn: Callable[..., Any] | None = None,
  lam0: float | None = None,
  lam_bounds: tuple[float, float] = (1e-6, 1e6),
  max_iter: int = 20,
  max_step: float = 1.0,
  rtol: float = 1e-2,
  curvature: str | GaussNewton = "auto",
  damping: float | None = None,
  precondition: int | None = None,
  tol: float | None = None,
  maxiter: int = MAXITER,
  grad_rtol: float = 1e-2,
  seed: int = 0,
  checkpoint_dir: Any = None,
) -> TuneResult:
  r"""Finds λ by descent on log λ with implicit hypergradients, retraining warm between steps.

  The model is taken as `jaxl2.make_train_step` takes it (its `TrainStep`
  ``train`` and a `TrainState` ``state`` to start from) with the data as
  arguments. Each iteration trains at the current λ with ``train``'s own step
  (its optimizer and mask; dropout on) on minibatches of ``batch_size`` from
  shuffled epochs of ``train_data`` (full batch by default): ``train_steps``
  steps for the first λ, then ``retrain_steps`` warm-started from the
  previous λ's params *and* optimizer state. Step g of the search takes
  positions (g mod e)·b … (g mod e)·b + b − 1 of the permutation
  ``jax.random.permutation(fold_in(key(seed), g // e), n)`` (e = n // b
  batches per epoch), whatever λ it trains. Then
  g = dV/d log λ = λ·`jaxl2.lam_hypergradient` (evaluation mode, summed over
  the sets ``eval_batch_size`` examples at a time) moves log λ by the
  safeguarded secant step −g/h (h the slope between the last two g; a full
  ``max_step`` downhill when no positive slope is known; never more than
  ``max_step``; the bracket's midpoint once the minimum is bracketed),
  within ``lam_bounds``.

  One λ per group: with ``train`` built with ``lam={pattern: λ_g, ...}``
  (`jaxl2.make_train_step`), each log λ_g moves by its own safeguarded secant
  step from its own component λ_g·dV/dλ_g of the vector hypergradient (one
  solve per iteration for all groups, as in Lorraine et al. 2020), all groups
  at each iteration, each within its ``lam_bounds``; the search stops when
  every group's step is below ``rtol``. ``lam0`` is then a table with the
  step's patterns, and ``TuneStep.lam``, ``TuneStep.hypergradient`` and
  ``TuneResult.lam`` are ``{pattern: value}`` dicts.

  It stops when a step would change log λ by less than ``rtol``, when the step
  is cut to nothing by a bound, or after ``max_iter`` trainings. A λ whose
  training ends non-finite is trained again from the last finite state (or
  ``state``); if that diverges too it is recorded as diverged (never chosen)
  and log λ moves ``max_step`` down. λ* is the λ of the path with the lowest
  finite validation loss.

  With ``checkpoint_dir`` the search saves after each λ (orbax; the last two
  checkpoints kept, a kill during a save leaves the previous one) and a call
  with the same arguments resumes from the latest, ending bit-identical to an
  uninterrupted run; a finished search returns its result at once.

  Args:
    train: the `jaxl2.TrainStep` to train with (any form).
    state: where to start: ``train.init(...)``, trained or not (not donated).
    train_data, val_data: the training and validation sets (pytrees).
    train_steps: training steps at the first λ.
    retrain_steps: steps at each later λ (default ``train_steps``).
    batch_size: the training minibatch size (default: full batch).
    eval_batch_size: batch size of the hypergradient's sums (default ``batch_size``).
    val_loss_fn, curvature, damping, precondition, tol, maxiter, grad_rtol:
      as for `jaxl2.lam_hypergradient`.
    lam0: the first λ (default: ``state.lam``); > 0, within ``lam_bounds``. With
      one λ per group, a ``{pattern: λ_g}`` table with the step's patterns.
    lam_bounds: (λ_min, λ_max), 0 < λ_min < λ_max; with one λ per group, for
      every group, or a ``{pattern: (λ_min, λ_max)}`` table.
    max_iter: the most λ values tried (each one training and one hypergradient).
    max_step: the largest change of log λ in one step (1.0: a factor e).
    rtol: stop when |Δ log λ| < rtol.
    seed: seed of the minibatch order (and the preconditioner's probes).
    checkpoint_dir: a directory to save to and resume from; None: no checkpoints.

  Returns:
    A `TuneResult`: λ*, its validation loss, params and state, the path,
    whether it converged and why it stopped.

  Raises:
    TypeError, ValueError: as `jaxl2.lam_hypergradient`; a bad count, step,
      ``lam0`` or ``lam_bounds``; a ``checkpoint_dir`` of another search.
    FloatingPointError: training diverged at every λ tried.

  Warns:
    RuntimeWarning: once, for the λ of the path where `lam_hypergradient` would
      have warned (most often: training had not reached W*; raise the steps).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxl2
    >>> x = jax.random.normal(jax.random.key(0), (40, 3)); w = jnp.array([1.0, -0.5, 0.2])
    >>> y = x @ w + jax.random.normal(jax.random.key(1), (40,))
    >>> train = jaxl2.make_train_step(lambda p, x: x @ p["w"],
    ...   lambda o, y: jnp.mean((o - y) ** 2), optax.sgd(0.2), lam=1.0, m=20,
    ...   mask=jaxl2.all_floating)
    >>> result = jaxl2.tune_lam(train, train.init({"w": jnp.zeros(3)}), (x[:20], y[:20]),
    ...   (x[20:], y[20:]), train_steps=100)
    >>> result.converged, result.val_loss <= result.path[0].val_loss
    (True, True)

    One λ for the first two coefficients and one for the third:

    >>> split = jaxl2.make_train_step(lambda p, x: x[:, :2] @ p["a"] + x[:, 2] * p["b"],
    ...   lambda o, y: jnp.mean((o - y) ** 2), optax.sgd(0.2), lam={"a": 1.0, "b": 1.0}, m=20,
    ...   mask=jaxl2.all_floating)
    >>> by_group = jaxl2.tune_lam(split, split.init({"a": jnp.zeros(2), "b": jnp.zeros(())}),
    ...   (x[:20], y[:20]), (x[20:], y[20:]), train_steps=100)
    >>> sorted(by_group.lam), by_group.val_loss <= result.val_loss  # one more freedom
    (['a', 'b'], True)
  """
  check_model("tune_lam", train, state)
  check_hosts(state, {"train_data": train_data, "val_data": val_data})
  lam0 = state_lam(train, state) if lam0 is None else lam0
  retrain_steps = train_steps if retrain_steps is None else retrain_steps
  counts = {"train_steps": train_steps, "retrain_steps": retrain_steps, "max_iter": max_iter}
  _check_options(counts, max_step, rtol)
  lam0, lam_bounds = check_start(lam0, lam_bounds, train.lam)
  n = n_examples(train_data, "train_data")
  batch_size = None if batch_size is None else check_batch_size(batch_size, n)
  eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
  opts = {
    **counts, "batch_size": batch_size, "seed": seed, "grad_rtol": grad_rtol, "lam0": lam0,
    "lam_bounds": lam_bounds, "max_step": float(max_step), "rtol": float(rtol),
    "hyper": {
      "val_loss_fn": val_loss_fn, "val_batch_size": None, "batch_size": eval_batch_size,
      "curvature": curvature, "damping": damping, "precondition": precondition, "tol": tol,
      "maxiter": maxiter, "seed": seed,
    },
  }  # fmt: skip
  data = (train_data, val_data)
  tuner = Tuner(train, data, opts)
  directory = check_checkpoint_dir(checkpoint_dir)
  ckpt = None
  if directory is not None:
    ckpt = Checkpointer(
      directory, what="tune_lam", fingerprint=_fingerprint(train, state, data, opts)
    )
  try:
    converged, reason = _resume_or_start(tuner, ckpt, state)
  finally:
    if ckpt is not None:
      ckpt.close()
  _warn_approximate(tuner.found, len(tuner.path))
  return tuner.result(converged, reason)


def _resume_or_start(
  tuner: Tuner, ckpt: Checkpointer | None, state: TrainState
) -> tuple[bool, str]:
  opts = tuner.opts
  search = new_search(opts["max_step"], opts["lam_bounds"])
  state = copy_state(state)  # the caller's state stays valid: training donates
  saved = None if ckpt is None else ckpt.restore({"state": state, "anchor": state, "best": state})
  if saved is None:
    return _search(tuner, ckpt, state, copy_state(state), log_of(opts["lam0"]), search, 0)
  arrays, meta = saved
  tuner.load(arrays, meta)
  search.load(meta["search"])
  if meta["reason"] is not None:
    return meta["converged"], meta["reason"]
  return _search(tuner, ckpt, arrays["state"], arrays["anchor"], meta["u"], search, meta["it"])
