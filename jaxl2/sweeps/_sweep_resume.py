"""`jaxl2.sweep` with a checkpoint directory: chunks of steps, the states saved between them.

The sweep's program runs as ``begin``, then ``chunk`` after ``chunk`` of
``checkpoint_every`` steps (the last one shorter if it does not divide
``steps``), then ``end``; after a chunk, every model's `TrainState` (stacked
along the model axis, sharded as it is) is saved with `jaxl2.core._checkpoint`.
A rerun finds the latest checkpoint and runs the chunks that remain: the same
programs on the same states, so it ends bit for bit where an uninterrupted run
with the same chunks ends.

By default (``checkpoint_every=None``) chunks are ``DEFAULT_CHUNK`` steps and
a chunk's end is saved only once at least ``MIN_INTERVAL_S`` seconds and
``SAVE_RATIO`` times the previous save's duration have passed since that save
ended (and always after the last step): saving then takes at most about
1/``SAVE_RATIO`` of the time, whatever the size of the models, and a
preemption loses little more than ``MIN_INTERVAL_S`` of work. Which chunk ends
are saved depends on timing; the results do not, since every chunk runs the
same program either way.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.core._checkpoint import Checkpointer
from jaxl2.core._hosts import to_host
from jaxl2.sweeps._sweep_program import Programs
from jaxl2.training._metrics import Metrics

__all__ = ["fingerprint", "run_resumable"]

DEFAULT_CHUNK = 100
MIN_INTERVAL_S = 10.0
SAVE_RATIO = 40.0


class _Schedule:
  """When a chunk's end is saved: each one with an explicit chunk size, else by time."""

  def __init__(self, every: int | None) -> None:
    self.every = every
    self.last_end = time.perf_counter()
    self.last_cost = 0.0

  def due(self, state: Any, final: bool) -> bool:
    if final or self.every is not None:
      return True
    jax.block_until_ready(state)  # the chunk's end, not its dispatch
    wait = max(MIN_INTERVAL_S, SAVE_RATIO * self.last_cost)
    return _agreed(time.perf_counter() - self.last_end >= wait)

  def saved(self, start: float) -> None:
    self.last_end = time.perf_counter()
    self.last_cost = self.last_end - start


def _agreed(decision: bool) -> bool:
  """Process 0's ``decision`` on every process: a save is collective, clocks are not."""
  if jax.process_count() == 1:
    return decision
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.bool_(decision)))


def run_resumable(
  programs: Programs,
  models: dict[str, Any],
  shared: Any,
  train_data: Any,
  val_data: Any,
  *,
  steps: int,
  directory: str,
  every: int | None,
  facts: dict[str, Any],
) -> tuple[Any, Metrics]:
  """The sweep's (params, metrics), resumed from ``directory``'s latest checkpoint if any.

  Raises:
    ValueError: ``directory`` holds a checkpoint of another run (``facts`` differ).
  """
  checkpointer = Checkpointer(directory, what="sweep", fingerprint=facts)
  try:
    state = programs.begin(models, shared)
    done, restored = 0, checkpointer.restore(state)
    if restored is not None:
      state, meta = restored
      done = int(meta["done"])
    schedule, length = _Schedule(every), every or DEFAULT_CHUNK
    while done < steps:
      n = min(length, steps - done)
      state = programs.chunk(state, models, shared, train_data, done, n)
      done += n
      if schedule.due(state, done == steps):
        start = time.perf_counter()
        checkpointer.save(done, state, {"done": done})
        schedule.saved(start)
    return programs.end(state, models, shared, train_data, val_data)
  finally:
    checkpointer.close()


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _layout(tree: Any) -> str:
  """A digest of ``tree``'s paths, shapes and dtypes."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return _digest(
    [[jax.tree_util.keystr(p), list(np.shape(x)), str(jnp.result_type(x))] for p, x in leaves]
  )


@jax.jit
def _sums(tree: Any) -> list[jax.Array]:
  """Σx and Σx² of every numeric leaf (|x| if complex), in float32 (PRNG keys skipped)."""
  out = []
  for x in jax.tree_util.tree_leaves(tree):
    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jnp.abs(x) if jnp.iscomplexobj(x) else x
      x = jnp.asarray(x, jnp.float32)
      out.append(jnp.stack([jnp.sum(x), jnp.sum(x * x)]))
  return out


def _values(tree: Any) -> str:
  """A digest of ``tree``'s values (sums rounded to 6 digits, so a resumed run on other
  hardware, whose reductions may round differently, still matches)."""
  return _digest([[float(f"{v:.6g}") for v in s] for s in to_host(_sums(tree))])


def fingerprint(options: dict[str, Any], **trees: Any) -> dict[str, Any]:
  """What identifies a sweep: its JSON-able ``options``, and each tree's layout and values."""
  out = dict(options)
  for name, tree in trees.items():
    out[name] = {"layout": _layout(tree), "values": _values(tree)}
  return out
