"""What `jaxl2.sweep` returns: per-λ metrics, the final params, and the best λ."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

__all__ = ["SweepResult", "sweep_result"]

_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "weight_sq_norm", "penalty")


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """Per-λ results of `jaxl2.sweep`, all measured after the last step.

  Every metric array has shape ``(len(lams), n_seeds)``, or
  ``(len(lams), folds, n_seeds)`` with ``folds``.

  Attributes:
    lams: the λ grid, in the order given.
    seeds: the seeds (one model per λ, fold and seed).
    m: the number of training inputs used in (λ/2m) (each fold's training part).
    train_loss, val_loss: mean data loss (no penalty) on the training part and
      on the validation data (or the held-out fold), in eval mode.
    train_accuracy, val_accuracy: the "accuracy" metric where there is one
      (integer class labels, or your ``metrics_fn``/aux), else NaN.
    weight_sq_norm: Σ c·‖W‖² of the final weights.
    penalty: (λ/2m) · weight_sq_norm.
    best_lam: the λ with the lowest validation loss, averaged over folds and
      seeds, among the λ none of whose runs diverged (NaN if all diverged).
    params: the final parameters, each leaf stacked like the metrics.
    diverged: True where a run ended with a non-finite loss or weights.
    metrics: every other metric, ``{"train_<name>", "val_<name>": array}``.
    folds: the number of cross-validation folds, or None.
  """

  lams: np.ndarray
  seeds: tuple[int, ...]
  m: float
  train_loss: np.ndarray
  val_loss: np.ndarray
  train_accuracy: np.ndarray
  val_accuracy: np.ndarray
  weight_sq_norm: np.ndarray
  penalty: np.ndarray
  best_lam: float
  params: Any = dataclasses.field(repr=False)
  diverged: np.ndarray | None = None
  metrics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  folds: int | None = None

  @property
  def classification(self) -> bool:
    """Whether an accuracy was measured."""
    return bool(np.isfinite(self.val_accuracy).any())

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready: per-λ rows averaged over folds and seeds, ``diverged`` and ``best_lam``."""
    keys = [k for k in _METRICS if self.classification or "accuracy" not in k]
    diverged = np.zeros(self.val_loss.shape, bool) if self.diverged is None else self.diverged

    def mean(values: np.ndarray, i: int) -> float:
      return float(np.mean(values[i]))

    rows = [
      {
        "lam": float(lam),
        **{k: mean(getattr(self, k), i) for k in keys},
        **{k: mean(v, i) for k, v in self.metrics.items()},
        "diverged": bool(diverged[i].any()),
      }
      for i, lam in enumerate(self.lams)
    ]
    return {
      "m": self.m,
      "lambdas": [float(lam) for lam in self.lams],
      "seeds": list(self.seeds),
      "folds": self.folds,
      "best_lam": self.best_lam,
      "best_by": "lowest mean validation loss" + (" over folds" if self.folds else ""),
      "results": rows,
    }


def _best_lam(lams: list[float], val_loss: np.ndarray, diverged: np.ndarray) -> float:
  """The λ with the lowest mean validation loss among λ with no diverged run; nan if none.

  A diverged run's loss is NaN or inf, and `np.argmin` would return a NaN
  as the minimum: such λ are removed before the comparison, never after.
  """
  per_lam = val_loss.reshape(len(lams), -1)
  usable = ~diverged.reshape(len(lams), -1).any(axis=1)
  if not usable.any():
    return math.nan
  return lams[int(np.argmin(np.where(usable, per_lam.mean(axis=1), np.inf)))]


def sweep_result(
  params: Any,
  out: dict[str, Any],
  *,
  lams: list[float],
  seeds: tuple[int, ...],
  m: float,
  folds: int | None,
  shape: tuple[int, ...],
) -> SweepResult:
  """The program's flat per-model outputs (padded past the last model) as a `SweepResult`.

  Every metric takes ``shape``, (λ, seed) or (λ, fold, seed); accuracies
  missing from ``out`` (regression) are NaN.
  """
  n_models = math.prod(shape)

  def arrange(values: Any) -> np.ndarray:
    return np.asarray(values)[:n_models].reshape(*shape, *np.shape(values)[1:])

  out = dict(out)
  fields = {k: arrange(out.pop(k)) for k in ("train_loss", "val_loss", "weight_sq_norm", "penalty")}
  finite_params = arrange(out.pop("finite_params"))
  metrics = {k: arrange(v) for k, v in out.items()}
  nan = np.full(fields["val_loss"].shape, np.nan)
  for split in ("train", "val"):
    fields[f"{split}_accuracy"] = metrics.pop(f"{split}_accuracy", nan)
  diverged = ~(np.isfinite(fields["train_loss"]) & np.isfinite(fields["val_loss"]) & finite_params)
  return SweepResult(
    lams=np.asarray(lams),
    seeds=seeds,
    m=m,
    best_lam=_best_lam(lams, fields["val_loss"], diverged),
    params=jax.tree_util.tree_map(arrange, params),
    diverged=diverged,
    metrics=metrics,
    folds=folds,
    **fields,
  )
