"""Training on shuffled minibatches: k steps of a `TrainStep` in one compiled program.

`jaxl2.tune_lam` retrains between λ values with the step `jaxl2.make_train_step`
built, on minibatches of shuffled epochs. A run of k steps is one program (a
`jax.lax.scan` of ``train.step_fn``, the state donated), so a retraining costs
one dispatch, not k. The order is a function of a global step counter g only:
step g takes positions ``(g mod e)·b … (g mod e)·b + b − 1`` of the epoch
``permutation(fold_in(key(seed), g // e), n)``, e = n // b batches per epoch
(the last n mod b examples of each permutation sit that epoch out). So a run
resumed at g from a checkpoint takes exactly the batches an uninterrupted run
would.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep

__all__ = ["train_steps"]


def _batch(data: Any, key: jax.Array, g: jax.Array, batch_size: int) -> Any:
  n = jax.tree_util.tree_leaves(data)[0].shape[0]
  per_epoch = n // batch_size
  order = jax.random.permutation(jax.random.fold_in(key, g // per_epoch), n)
  idx = jax.lax.dynamic_slice(order, ((g % per_epoch) * batch_size,), (batch_size,))
  return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)


@functools.partial(jax.jit, static_argnames=("train", "steps", "batch_size"), donate_argnums=0)
def _run(
  state: TrainState, data: Any, key: jax.Array, start: jax.Array, *, train: TrainStep,
  steps: int, batch_size: int | None,
) -> tuple[TrainState, jax.Array]:  # fmt: skip
  def body(s: TrainState, g: jax.Array) -> tuple[TrainState, jax.Array]:
    batch = data if batch_size is None else _batch(data, key, g, batch_size)
    s, metrics = train.step_fn(s, batch)
    return s, metrics["loss"]

  state, losses = jax.lax.scan(body, state, start + jnp.arange(steps))
  finite = jnp.all(jnp.isfinite(losses))
  for leaf in jax.tree_util.tree_leaves(state.params):
    finite &= jnp.all(jnp.isfinite(leaf))
  return state, finite


def train_steps(
  train: TrainStep,
  state: TrainState,
  data: Any,
  *,
  steps: int,
  chunk: int,
  batch_size: int | None,
  seed: int,
  start: int,
) -> tuple[TrainState, bool]:
  """``steps`` steps of ``train`` from ``state`` (donated) at global step ``start``.

  Run as programs of ``chunk`` steps (and one of the remainder), so that runs of
  different lengths share one compiled program. Returns the new state and
  whether every loss and every param stayed finite.
  """
  key, finite = jax.random.key(seed), jnp.bool_(True)
  sizes = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
  for size in sizes:
    state, ok = _run(
      state, data, key, jnp.asarray(start, jnp.int32), train=train, steps=size,
      batch_size=batch_size,
    )  # fmt: skip
    finite, start = finite & ok, start + size
  return state, bool(jax.device_get(finite))
