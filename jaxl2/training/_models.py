"""How a training step calls a real model: trainable params, carried state, static part.

The general form of a model's data loss is one function,

    loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, aux))

``key`` is a fresh PRNG key in training (for dropout) and ``None`` in
evaluation (no dropout, running statistics used); ``aux`` is a dict of
metrics (``{}`` for none). `split_model` turns what a user has into that form:

* plain params (Flax linen, Haiku, dicts): the user's function as it is, with
  ``model_state`` for linen ``batch_stats`` or Haiku state;
* a Flax NNX module: ``loss_fn(model, batch) -> loss | (loss, aux)``; the
  module is split into its ``nnx.Param`` state (trained, penalized), every
  other Variable (BatchStat, RNG keys and counts: carried) and its GraphDef
  (static), merged again for each call, in ``model.train()`` or
  ``model.eval()`` mode;
* an Equinox module: ``loss_fn(model, model_state, batch, key)`` as in the
  general form, with the model split by `equinox.partition` into its floating
  arrays (trained) and the rest (static), and ``eqx.nn.inference_mode`` in
  evaluation.

The static part (the GraphDef, the Equinox module's other fields: activation
functions, sizes, an NNX attribute such as ``self.scale = 5.0``) is a `Static`:
pytree metadata, not a leaf. It travels inside the `jaxl2.TrainState`, so two
models of the same shapes that differ only there are two states that compile
two programs (`jax.jit` keys its cache on the tree's metadata), never one
model running the other's code.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = ["ModelLoss", "Static", "bind", "split_model"]

Loss = Callable[[Any, Any, Any, Any], tuple[Any, tuple[Any, dict[str, Any]]]]


def _hashable(leaf: Any) -> Any:
  """``leaf`` as a cache key: by value where it hashes, else by identity."""
  try:
    hash(leaf)
  except TypeError:  # a list, a non-floating array: only the very same object is the same
    return ("id", id(leaf))
  return leaf


class Static:
  """The static part of a model, compared by value; pytree metadata, not a leaf.

  ``kind`` is ``"nnx"`` (``value`` an NNX GraphDef) or ``"equinox"`` (``value``
  the module with its floating arrays replaced by None).
  """

  __slots__ = ("_key", "kind", "value")

  def __init__(self, kind: str, value: Any) -> None:
    self.kind, self.value = kind, value
    if kind == "nnx":
      self._key = (kind, value)
    else:
      leaves, treedef = jax.tree_util.tree_flatten(value)
      self._key = (kind, treedef, tuple(_hashable(x) for x in leaves))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Static) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)

  def __repr__(self) -> str:
    return f"Static({self.kind})"


jax.tree_util.register_static(Static)


class ModelLoss(NamedTuple):
  """A model in the general form: what to train, what to carry, and its static part."""

  params: Any
  model_state: Any
  static: Static | None


def _reseed(module: Any, key: jax.Array) -> None:
  """Every RNG stream of an NNX ``module`` restarted from ``key``: stream i gets fold_in(key, i)."""
  from flax import nnx

  streams = [s for _, s in nnx.iter_graph(module) if isinstance(s, nnx.RngStream)]
  for i, stream in enumerate(streams):
    # The stream's name enters too, so two streams never share a key whatever their order.
    new = jax.random.fold_in(jax.random.fold_in(key, i), zlib.crc32(stream.tag.encode()))
    shape = stream.key.shape
    if shape:  # a stacked stream (nnx.vmap / nnx.scan layers): one key per layer
      new = jax.random.split(new, shape)
    stream.key.set_value(new)
    stream.count.set_value(jax.numpy.zeros(shape, jax.numpy.uint32))


def _nnx_split(model: Any, seed: int | None) -> ModelLoss:
  from flax import nnx  # Only reached with an NNX module in hand.

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if seed is not None:
    module = nnx.merge(graphdef, params, rest, copy=True)
    _reseed(module, jax.random.key(seed))
    rest = nnx.split(module, nnx.Param, ...)[2]
  return ModelLoss(params, rest, Static("nnx", graphdef))


def _nnx_loss(loss_fn: Callable[..., Any], graphdef: Any) -> Loss:
  from flax import nnx

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

  return loss


def _equinox_loss(loss_fn: Loss, static: Any) -> Loss:
  import equinox as eqx

  def loss(params: Any, state: Any, batch: Any, key: Any) -> tuple[Any, tuple[Any, Any]]:
    module = eqx.combine(params, static)
    if key is None:
      module = eqx.nn.inference_mode(module)
    return loss_fn(module, state, batch, key)

  return loss


def bind(loss_fn: Callable[..., Any], static: Static | None) -> Loss:
  """The user's ``loss_fn`` in the general form, for the model whose static part is ``static``."""
  if static is None:
    return loss_fn
  if static.kind == "nnx":
    return _nnx_loss(loss_fn, static.value)
  return _equinox_loss(loss_fn, static.value)


def split_model(model: Any, model_state: Any, *, seed: int | None = None) -> ModelLoss:
  """``model`` (params, an NNX module or an Equinox module) split for the general form.

  ``seed`` (NNX only): restart the module's RNG streams from ``key(seed)``;
  None keeps them as the module holds them.

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
    return _nnx_split(model, seed)
  eqx = sys.modules.get("equinox")
  if eqx is not None and isinstance(model, eqx.Module):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return ModelLoss(params, model_state, Static("equinox", static))
  return ModelLoss(model, model_state, None)
