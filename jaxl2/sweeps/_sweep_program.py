"""The compiled programs of `jaxl2.sweep`, and the cache that keeps them across calls.

One program initializes, trains and evaluates every model: the models are a
`jax.vmap` axis (sharded over the devices when there are several), the steps
a `jax.lax.scan`. Each model's inputs (its λ, seed and fold, which index the
seeds' starts, the order keys and the folds' examples) come in as arrays, so a
sweep over other λ values of the same shapes reuses it. With checkpoints the
same three parts run as separate programs: ``begin`` (the stacked states),
``chunk`` (``length`` steps from step ``first``), ``end`` (the evaluation),
so that the states can be saved between chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxl2.masks._masks import MaskSpec
from jaxl2.training._metrics import (
  Metrics,
  MetricsFn,
  classification,
  output_metrics,
  penalty_metrics,
)
from jaxl2.training._models import Static
from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep

__all__ = ["Programs", "Settings", "program"]

# Models: {"lam", "seed", "fold"}, one row per model; shared: {"states" (per seed),
# "order_keys" (seed, fold), "train_idx", "val_idx" (per fold)} (see jaxl2.sweeps._sweep_models).
Models = dict[str, Any]


class Settings(NamedTuple):
  """Everything besides the training step that shapes the programs (their cache key)."""

  mask: MaskSpec
  m: float
  steps: int
  progress: Callable[[int, int], None] | None
  mesh: Mesh | None
  batch_size: int | None
  cross_validate: bool
  metrics_fn: MetricsFn | None
  static: Static | None  # the model's static part (NNX GraphDef, Equinox fields)


class Programs(NamedTuple):
  """The jitted programs of one sweep; ``whole`` is ``end(chunk(begin(...), 0, steps))``."""

  whole: Callable[..., tuple[Any, Metrics]]  # (models, shared, train_data, val_data)
  begin: Callable[..., TrainState]  # (models, shared)
  chunk: Callable[..., TrainState]  # (state, models, shared, train_data, first, length)
  end: Callable[..., tuple[Any, Metrics]]  # (state, models, shared, train_data, val_data)


# Compiled sweeps, reused by later calls with the same functions and settings
# (jit's own cache keys on the function object, which is rebuilt on each call).
_PROGRAMS: dict[Any, Programs] = {}
_MAX_PROGRAMS = 16


def program(train: TrainStep, settings: Settings) -> Programs:
  """The sweep's programs, jitted; cached when the settings are hashable."""
  key = (train.apply_fn, train.loss_fn, train.optimizer, *settings)
  try:
    cached = _PROGRAMS.get(key)
  except TypeError:  # an unhashable mask (a pytree of bools): build it anew
    key, cached = None, None
  if cached is not None:
    return cached
  built = _jitted(train, settings)
  if key is not None:
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))  # the oldest
    _PROGRAMS[key] = built
  return built


def _jitted(train: TrainStep, settings: Settings) -> Programs:
  whole = functools.partial(_whole, train, settings)
  chunk = functools.partial(_chunk, train, settings)
  end = functools.partial(_end, train, settings)
  # The chunk donates its state: the next state reuses the buffers in place.
  chunk_options = {"static_argnums": 5, "donate_argnums": 0}
  if settings.mesh is None:
    return Programs(jax.jit(whole), jax.jit(_begin), jax.jit(chunk, **chunk_options), jax.jit(end))
  per_model, same = NamedSharding(settings.mesh, P("models")), NamedSharding(settings.mesh, P())
  return Programs(
    jax.jit(whole, in_shardings=(per_model, same, same, same), out_shardings=per_model),
    jax.jit(_begin, in_shardings=(per_model, same), out_shardings=per_model),
    jax.jit(
      chunk,
      in_shardings=(per_model, per_model, same, same, same),
      out_shardings=per_model,
      **chunk_options,
    ),
    jax.jit(end, in_shardings=(per_model, per_model, same, same, same), out_shardings=per_model),
  )


def _whole(
  train: TrainStep, settings: Settings, models: Models, shared: Any, train_data: Any, val_data: Any
) -> tuple[Any, Metrics]:
  state = _begin(models, shared)
  state = _chunk(train, settings, state, models, shared, train_data, 0, settings.steps)
  return _end(train, settings, state, models, shared, train_data, val_data)


def _begin(models: Models, shared: Any) -> TrainState:
  """Every model's state at step 0: its seed's start with its own λ."""

  def start(model: dict[str, Any]) -> TrainState:
    state = jax.tree_util.tree_map(lambda x: x[model["seed"]], shared["states"])
    return state._replace(lam=model["lam"])

  return jax.vmap(start)(models)


def _chunk(
  train: TrainStep,
  settings: Settings,
  state: TrainState,
  models: Models,
  shared: Any,
  train_data: Any,
  first: Any,
  length: int,
) -> TrainState:
  """Steps ``first`` to ``first + length − 1`` of every model (a scan), with the progress."""

  def body(state: TrainState, i: jax.Array) -> tuple[TrainState, None]:
    def one(s: TrainState, model: dict[str, Any]) -> TrainState:
      return train.step_fn(s, _batch(settings, shared, train_data, model, i))[0]

    state = jax.vmap(one)(state, models)
    if settings.progress is not None:
      _report(settings.progress, settings.steps, i + 1)
    return state, None

  steps = jnp.asarray(first, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
  return jax.lax.scan(body, state, steps)[0]


def _end(
  train: TrainStep,
  settings: Settings,
  state: TrainState,
  models: Models,
  shared: Any,
  train_data: Any,
  val_data: Any,
) -> tuple[Any, Metrics]:
  """The final params and metrics of every model."""
  evaluate = _evaluator(train, settings)

  def final(s: TrainState, model: dict[str, Any]) -> Metrics:
    if settings.cross_validate:
      fold = model["fold"]
      train_part = _take(train_data, shared["train_idx"][fold])
      return evaluate(s, train_part, _take(train_data, shared["val_idx"][fold]))
    return evaluate(s, train_data, val_data)

  return state.params, jax.vmap(final)(state, models)


def _batch(
  settings: Settings, shared: Any, train_data: Any, model: dict[str, Any], i: jax.Array
) -> Any:
  """One model's batch at step ``i``: its training part, or a minibatch of a shuffled epoch."""
  idx = shared["train_idx"][model["fold"]]
  if settings.batch_size is not None:
    size = settings.batch_size
    per_epoch = idx.shape[0] // size
    key = shared["order_keys"][model["seed"], model["fold"]]
    order = jax.random.permutation(jax.random.fold_in(key, i // per_epoch), idx)
    idx = jax.lax.dynamic_slice(order, ((i % per_epoch) * size,), (size,))
  elif not settings.cross_validate:
    return train_data  # the whole training set, shared by every model: no copy
  return _take(train_data, idx)


def _report(progress: Callable[[int, int], None], steps: int, done: jax.Array) -> None:
  """``progress(done, steps)`` from inside the program, about 20 times and at the end, in
  process 0 only."""
  every = max(1, steps // 20)

  def report(d: Any) -> None:
    if jax.process_index() == 0:  # one report per run, not one per host
      progress(int(d), steps)

  jax.lax.cond(
    (done % every == 0) | (done == steps),
    lambda: jax.debug.callback(report, done),
    lambda: None,
  )


def _evaluator(
  train: TrainStep, settings: Settings
) -> Callable[[TrainState, Any, Any], dict[str, jax.Array]]:
  """Final metrics of one model: losses and metrics in eval mode, Σ‖W‖², penalty, finiteness."""
  if train.apply_fn is None:
    split_metrics = train.eval_fn
  else:
    metrics_fn = classification if settings.metrics_fn is None else settings.metrics_fn
    on_outputs = output_metrics(train.apply_fn, train.loss_fn, metrics_fn)

    def split_metrics(state: TrainState, data: Any) -> Metrics:
      return on_outputs(state.params, data)

  def evaluate(state: TrainState, train_part: Any, val_part: Any) -> dict[str, jax.Array]:
    out = {}
    for split, data in (("train", train_part), ("val", val_part)):
      out.update({f"{split}_{k}": v for k, v in split_metrics(state, data).items()})
    out.update(penalty_metrics(state.params, state.lam, settings.m, settings.mask))
    finite = [jnp.all(jnp.isfinite(w)) for w in jax.tree_util.tree_leaves(state.params)]
    out["finite_params"] = jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)
    return out

  return evaluate


def _take(data: Any, idx: jax.Array) -> Any:
  return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)
