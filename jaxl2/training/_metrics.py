"""What training and evaluation report: the penalty's terms, data losses, accuracy.

`make_train_step`, `make_eval_step` and `sweep` all take their numbers from
here, so a step's metrics and a sweep's results are the same quantities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2.masks._masks import MaskSpec
from jaxl2.penalties._lam_groups import group_metrics, is_grouped
from jaxl2.penalties._penalties import weight_sq_norm
from jaxl2.penalties._setup import l2_from_sq_norm

__all__ = [
  "Metrics",
  "MetricsFn",
  "accuracy",
  "classification",
  "output_metrics",
  "penalty_metrics",
  "regularized_loss",
]

Metrics = dict[str, jax.Array]
MetricsFn = Callable[[Any, Any], Metrics]


def penalty_metrics(params: Any, lam: Any, m: Any, mask: MaskSpec) -> Metrics:
  """``weight_sq_norm`` Σ c·‖W‖² and ``penalty`` (λ/2m)·Σ c·‖W‖² at ``params``.

  With a ``{pattern: λ_g}`` table, ``penalty`` is Σ_g (λ_g/2m)·Σ_{j ∈ g} c_j‖W_j‖²
  (`jaxl2.penalties._lam_groups`), patterns tried in the table's order.
  """
  if is_grouped(lam):
    return group_metrics(params, lam, m, mask)
  sq_norm = weight_sq_norm(params, mask=mask)
  return {"weight_sq_norm": sq_norm, "penalty": l2_from_sq_norm(sq_norm, lam, m)}


def regularized_loss(
  data_loss: jax.Array, params: Any, lam: Any, m: Any, mask: MaskSpec
) -> tuple[jax.Array, Metrics]:
  """``data_loss`` + (λ/2m)·Σ c·‖W‖², and its parts as metrics.

  The metrics: ``loss``, ``data_loss``, ``penalty`` and ``weight_sq_norm``.
  """
  terms = penalty_metrics(params, lam, m, mask)
  loss = data_loss + terms["penalty"]
  return loss, {"loss": loss, "data_loss": data_loss, **terms}


def accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Classification accuracy, decided from shapes (static, so safe under jit).

  Multi-class ``outputs`` (..., K) with K > 1 are compared by argmax with
  one-hot ``targets`` of the same shape (..., K), or else with class labels
  of shape (...) or (..., 1). A single logit (..., 1) or (...,) is
  thresholded at 0 against 0/1 targets.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> logits = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    >>> jaxl2.accuracy(logits, jnp.array([[0], [1]])), jaxl2.accuracy(logits, jnp.eye(3)[:2])
    (Array(1., dtype=float32), Array(1., dtype=float32))
  """
  if outputs.ndim and outputs.shape[-1] > 1:
    predicted = jnp.argmax(outputs, axis=-1)
    if targets.shape == outputs.shape:
      labels = jnp.argmax(targets, axis=-1)
    else:
      labels = targets.reshape(predicted.shape)
  else:
    predicted = (outputs > 0).reshape(targets.shape)
    labels = targets.astype(bool)
  return jnp.mean((predicted == labels).astype(jnp.float32))


def classification(outputs: jax.Array, targets: Any) -> Metrics:
  """``{"accuracy": ...}`` for integer class labels; ``{}`` for other targets (regression)."""
  if jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
    return {"accuracy": accuracy(outputs, targets)}
  return {}


def output_metrics(
  apply_fn: Callable[[Any, Any], Any],
  loss_fn: Callable[[Any, Any], jax.Array],
  metrics_fn: MetricsFn,
) -> Callable[[Any, Any], Metrics]:
  """``evaluate(params, (inputs, targets))``: the data ``loss`` and ``metrics_fn``'s metrics."""

  def evaluate(params: Any, batch: Any) -> Metrics:
    inputs, targets = batch
    outputs = apply_fn(params, inputs)
    return {**metrics_fn(outputs, targets), "loss": loss_fn(outputs, targets)}

  return evaluate
