"""How a training step calls a real model: trainable params, carried state, train or eval.

The general form of a model's data loss is one function,

    loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, aux))

``key`` is a fresh PRNG key in training (for dropout) and ``None`` in
evaluation (no dropout, running statistics used); ``aux`` is a dict of
metrics (``{}`` for none). `split_model` turns what a user has into that form:

* plain params (Flax linen, Haiku, dicts): the user's function as it is, with
  ``model_state`` for linen ``batch_stats`` or Haiku state;
* a Flax NNX module: ``loss_fn(model, batch) -> loss | (loss, aux)``; the
  module is split into its ``nnx.Param`` state (trained, penalized) and every
  other Variable (BatchStat, RNG keys and counts: carried), merged again for
  each call, in ``model.train()`` or ``model.eval()`` mode;
* an Equinox module: ``loss_fn(model, model_state, batch, key)`` as in the
  general form, with the model split by `equinox.partition` into its floating
  arrays (trained) and the rest (static), and ``eqx.nn.inference_mode`` in
  evaluation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["ModelLoss", "split_model"]

Loss = Callable[[Any, Any, Any, Any], tuple[Any, tuple[Any, dict[str, Any]]]]


class ModelLoss(NamedTuple):
  """A model in the general form: what to train, what to carry, and the loss to call."""

  params: Any
  model_state: Any
  loss: Loss


def _nnx(loss_fn: Callable[..., Any], model: Any) -> ModelLoss:
  from flax import nnx  # Only reached with an NNX module in hand.

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params: Any, rest: Any, batch: Any, key: Any) -> tuple[Any, tuple[Any, Any]]:
    # copy=True: fresh Variables at this trace level, which the model may update.
    module = nnx.merge(graphdef, params, rest, copy=True)
    if key is None:
      module.eval()
    else:
      module.train()
    out = loss_fn(module, batch)
    value, aux = out if isinstance(out, tuple) else (out, {})
    return value, (nnx.split(module, nnx.Param, ...)[2], aux)

  return ModelLoss(params, rest, loss)


def _equinox(loss_fn: Loss, model: Any, model_state: Any) -> ModelLoss:
  import equinox as eqx  # Only reached with an Equinox module in hand.

  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss(params: Any, state: Any, batch: Any, key: Any) -> tuple[Any, tuple[Any, Any]]:
    module = eqx.combine(params, static)
    if key is None:
      module = eqx.nn.inference_mode(module)
    return loss_fn(module, state, batch, key)

  return ModelLoss(params, model_state, loss)


def split_model(loss_fn: Callable[..., Any], model: Any, model_state: Any) -> ModelLoss:
  """``model`` (params, an NNX module or an Equinox module) in the general form.

  Raises:
    ValueError: ``model_state`` given with an NNX module (its state lives in
      the module).
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(model, nnx.Module):
    if model_state is not None:
      raise ValueError(
        "`model_state` must be None for a Flax NNX module: its BatchStat and RNG Variables "
        "live in the module and are carried from it. Pass the module alone."
      )
    return _nnx(loss_fn, model)
  eqx = sys.modules.get("equinox")
  if eqx is not None and isinstance(model, eqx.Module):
    return _equinox(loss_fn, model, model_state)
  return ModelLoss(model, model_state, loss_fn)
