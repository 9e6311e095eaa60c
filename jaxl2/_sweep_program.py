"""The compiled program of `jaxl2.sweep`, and the cache that keeps it across calls.

One program initializes, trains and evaluates every model: the models are a
`jax.vmap` axis (sharded over the devices when there are several), the steps
a `jax.lax.scan`. Each model's inputs (its start, λ, keys, data indices) come
in as arrays, so a sweep over other λ values of the same shapes reuses it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxl2._masks import MaskSpec
from jaxl2._metrics import Metrics, MetricsFn, classification, output_metrics, penalty_metrics
from jaxl2._models import Static
from jaxl2._train_state import TrainState
from jaxl2._training import TrainStep

__all__ = ["Settings", "program"]

# Models: {"start", "lam", "key", "order_key", "train_idx", "val_idx"}, one row per model.
Models = dict[str, Any]


class Settings(NamedTuple):
  """Everything besides the training step that shapes the program (its cache key)."""

  mask: MaskSpec
  m: float
  steps: int
  progress: Callable[[int, int], None] | None
  mesh: Mesh | None
  batch_size: int | None
  cross_validate: bool
  metrics_fn: MetricsFn | None
  static: Static | None  # the model's static part (NNX GraphDef, Equinox fields)


# Compiled sweeps, reused by later calls with the same functions and settings
# (jit's own cache keys on the function object, which is rebuilt on each call).
_PROGRAMS: dict[Any, Callable[..., Any]] = {}
_MAX_PROGRAMS = 16


def program(train: TrainStep, settings: Settings) -> Callable[..., Any]:
  """``run(models, train_data, val_data) -> (params, metrics)``, jitted; cached when hashable."""
  key = (train.apply_fn, train.loss_fn, train.optimizer, *settings)
  try:
    cached = _PROGRAMS.get(key)
  except TypeError:  # an unhashable mask (a pytree of bools): build it anew
    key, cached = None, None
  if cached is not None:
    return cached
  run = functools.partial(_run, train, settings)
  if settings.mesh is None:
    compiled = jax.jit(run)
  else:
    models, replicated = (
      NamedSharding(settings.mesh, P("models")),
      NamedSharding(settings.mesh, P()),
    )
    compiled = jax.jit(
      run, in_shardings=(models, replicated, replicated), out_shardings=(models, models)
    )
  if key is not None:
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))  # the oldest
    _PROGRAMS[key] = compiled
  return compiled


def _run(
  train: TrainStep, settings: Settings, models: Models, train_data: Any, val_data: Any
) -> tuple[Any, Metrics]:
  general = train.apply_fn is None
  state = jax.vmap(functools.partial(_init, train.optimizer, general, settings.static))(models)
  state, _ = jax.lax.scan(
    functools.partial(_step, train, settings, models, train_data),
    state,
    jnp.arange(settings.steps),
  )
  evaluate = _evaluator(train, settings)

  def final(s: TrainState, model: dict[str, Any]) -> Metrics:
    if settings.cross_validate:
      return evaluate(s, _take(train_data, model["train_idx"]), _take(train_data, model["val_idx"]))
    return evaluate(s, train_data, val_data)

  return state.params, jax.vmap(final)(state, models)


def _init(
  optimizer: Any, general: bool, static: Static | None, model: dict[str, Any]
) -> TrainState:
  """One model's state at step 0 (the general form's start is (params, model_state))."""
  params, model_state = model["start"] if general else (model["start"], None)
  key = model["key"] if general else None
  return TrainState(
    params, optimizer.init(params), jnp.zeros([], jnp.int32), model["lam"], model_state, key,
    static,
  )  # fmt: skip


def _step(
  train: TrainStep,
  settings: Settings,
  models: Models,
  train_data: Any,
  state: TrainState,
  i: jax.Array,
) -> tuple[TrainState, None]:
  """Step ``i`` of every model (the scan's body), then the progress report."""
  step = jax.vmap(lambda s, model: train.step_fn(s, _batch(settings, train_data, model, i))[0])
  state = step(state, models)
  if settings.progress is not None:
    _report(settings.progress, settings.steps, i + 1)
  return state, None


def _batch(settings: Settings, train_data: Any, model: dict[str, Any], i: jax.Array) -> Any:
  """One model's batch at step ``i``: its training part, or a minibatch of a shuffled epoch."""
  idx = model["train_idx"]
  if settings.batch_size is not None:
    size = settings.batch_size
    per_epoch = idx.shape[0] // size
    order = jax.random.permutation(jax.random.fold_in(model["order_key"], i // per_epoch), idx)
    idx = jax.lax.dynamic_slice(order, ((i % per_epoch) * size,), (size,))
  elif not settings.cross_validate:
    return train_data  # the whole training set, shared by every model: no copy
  return _take(train_data, idx)


def _report(progress: Callable[[int, int], None], steps: int, done: jax.Array) -> None:
  """``progress(done, steps)`` from inside the program, about 20 times and at the end."""
  every = max(1, steps // 20)
  jax.lax.cond(
    (done % every == 0) | (done == steps),
    lambda: jax.debug.callback(lambda d: progress(int(d), steps), done),
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
