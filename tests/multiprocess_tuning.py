"""`sweep` and the λ tools on 2 processes × 4 devices and on 1 process × 8 (test_multiprocess.py).

Groups as in `tests.multiprocess_cases`: each runs its cases in every process
and returns ``{case: JSON}``. The code is a user's on a pod: NumPy data that
every process holds alike, or global arrays from each process's own rows
(`jax.make_array_from_process_local_data`), params placed over a mesh of
`jax.devices()`. Checkpoints go to ``$JAXL2_MP_DIR``, a directory every
process sees (a shared file system on a pod).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxl2
from jaxl2.sweeps import _sweep_resume
from tests import sweep_faults
from tests.multiprocess_cases import BATCH, global_batch, host, mesh, run_cases

LAMS, SEEDS, STEPS = [0.0, 0.5, 3.0], (0, 1), 16


def _directory(name: str) -> pathlib.Path:
  return pathlib.Path(os.environ["JAXL2_MP_DIR"]) / name


def _regression(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """BATCH examples of a noisy linear map 6 → 3, the same in every process."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, 6)).astype(np.float32)
  w = np.random.default_rng(99).normal(size=(6, 3))
  return x, (x @ w + 0.3 * rng.normal(size=(BATCH, 3))).astype(np.float32)


def _init(key: jax.Array) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (6, 16)) / 3,
    "b1": jnp.zeros(16),
    "w2": jax.random.normal(k2, (16, 3)) / 4,
  }


def _mlp(p: Any, x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean((outputs - targets) ** 2)


def _result(r: jaxl2.SweepResult) -> dict[str, Any]:
  fields = ("train_loss", "val_loss", "weight_sq_norm", "penalty", "val_accuracy", "diverged")
  out = {k: host(getattr(r, k)) for k in fields}
  return out | {"best_lam": r.best_lam, "params": host(r.params), "metrics": host(r.metrics)}


def _counted() -> tuple[Any, Any]:
  """A progress callback that records what it is called with, and a function that tells."""
  calls: list[int] = []

  def seen() -> dict[str, Any]:
    # Calls per process (the same list in every process), and what process 0 saw.
    per_process = multihost_utils.process_allgather(np.array([len(calls)], np.int32))
    values = np.full(64, -1, np.int32)
    distinct = sorted(set(calls))
    values[: len(distinct)] = distinct
    shown = multihost_utils.broadcast_one_to_all(values)
    return {"calls per process": host(per_process), "values": [int(v) for v in shown if v >= 0]}

  return lambda done, total: calls.append(done), seen


# ---- sweep ------------------------------------------------------------------------------


def _simple(train_data: Any, val_data: Any, **options: Any) -> jaxl2.SweepResult:
  return jaxl2.sweep(
    _init, _mlp, _mse, optax.adam(1e-2), train_data, val_data, lams=LAMS, steps=STEPS,
    seeds=SEEDS, batch_size=8, **options,
  )  # fmt: skip


def _with_progress(train_data: Any, val_data: Any) -> dict[str, Any]:
  progress, seen = _counted()
  return _result(_simple(train_data, val_data, progress=progress)) | {"progress": seen()}


def _resumed_round_trip() -> dict[str, Any]:
  """The general-form sweep of tests/sweep_faults (dropout keys, a running mean), checkpointed
  every 4 of 12 steps; its last checkpoint removed and the sweep rerun (resumed from step 8);
  rerun again (finished: no training). Both reruns must equal the first run bit for bit."""
  directory = _directory("sweep")
  first = _result(sweep_faults.sweep(directory))
  if jax.process_index() == 0:
    shutil.rmtree(directory / str(sweep_faults.STEPS))
  multihost_utils.sync_global_devices("removed the last checkpoint")
  resumed = _result(sweep_faults.sweep(directory))
  again = _result(sweep_faults.sweep(directory))
  return first | {"resumed equal": resumed == first, "finished equal": again == first}


def _default_schedule() -> dict[str, Any]:
  """The default save schedule (process 0's clock, agreed by all) with chunks of 5 steps, each
  chunk's end due for a save: every process must save, or none."""
  chunk, interval = _sweep_resume.DEFAULT_CHUNK, _sweep_resume.MIN_INTERVAL_S
  _sweep_resume.DEFAULT_CHUNK, _sweep_resume.MIN_INTERVAL_S = 5, 0.0
  try:
    x, y = _regression(0)
    return _result(_simple((x, y), _regression(1), checkpoint_dir=_directory("schedule")))
  finally:
    _sweep_resume.DEFAULT_CHUNK, _sweep_resume.MIN_INTERVAL_S = chunk, interval


def _general_folds() -> dict[str, Any]:
  """The general form with dropout and a running mean, 4-fold cross-validation, 2 seeds."""
  result = jaxl2.sweep(
    sweep_faults._init, None, sweep_faults._loss, optax.adam(1e-2), sweep_faults._data(40, 0),
    lams=LAMS, steps=12, seeds=(4, 5), batch_size=6, folds=4,
  )  # fmt: skip
  return _result(result)


def sweeps() -> dict[str, Any]:
  """sweep on host and global data, with folds, with checkpoints (resumed on every process)."""
  train, val = _regression(0), _regression(1)
  mesh_ = mesh()
  x, y = train
  return run_cases({
    "sweep numpy data": lambda: _with_progress(train, val),
    "sweep global data": lambda: _result(
      _simple(global_batch(train, mesh_), global_batch(val, mesh_))
    ),
    "sweep folds general form": _general_folds,
    "sweep checkpoints resumed": _resumed_round_trip,
    "sweep default save schedule": _default_schedule,
    "error sweep data differs between processes": lambda: _result(
      _simple((x + jax.process_index(), y), val)
    ),
  })  # fmt: skip


def sweep_killed() -> None:
  """The checkpointed sweep of `_resumed_round_trip` in a new directory; process 0 SIGKILLs
  itself at step 6, mid-chunk, once step 4 is saved (its peer is ended by the harness)."""
  sweep_faults.sweep(_directory("killed"), kill_at=6)


def sweep_after_kill() -> dict[str, Any]:
  """That sweep rerun: the checkpoint it found (step 4), its result, and the same sweep run
  uninterrupted in a new directory, which the resumed run must equal bit for bit."""
  directory = _directory("killed")
  found = ocp.CheckpointManager(directory).latest_step()
  resumed = _result(sweep_faults.sweep(directory))
  return {"found": found, "resumed": resumed, "uninterrupted": _result(
    sweep_faults.sweep(_directory("uninterrupted")))}  # fmt: skip


# ---- the λ tools -------------------------------------------------------------------------

LAM, M = 1.0, float(BATCH)
# FSDP: the hidden layer's kernel and bias split over all 8 devices, the head replicated.
FSDP = {"w1": P(None, "data"), "b1": P("data"), "w2": P()}


def _trained(layout: str, data: Any) -> tuple[jaxl2.TrainStep, jaxl2.TrainState]:
  """The MLP trained 40 full-batch Adam steps at λ = LAM, its params replicated or FSDP."""
  mesh_ = data[0].sharding.mesh
  specs = FSDP if layout == "fsdp" else {k: P() for k in FSDP}
  shardings = {k: NamedSharding(mesh_, s) for k, s in specs.items()}
  train = jaxl2.make_train_step(
    _mlp, _mse, optax.adam(2e-2), lam=LAM, m=M, mask=jaxl2.all_floating, param_sharding=shardings
  )
  state = train.init(jax.device_get(_init(jax.random.key(0))))
  for _ in range(40):
    # One step in flight at a time: with 4 simulated CPU devices per process, steps queued
    # without waiting were seen to hang both processes in a collective after ~30 steps.
    state, _ = jax.block_until_ready(train(state, data))
  return train, state


def _listed(result: tuple) -> dict[str, Any]:
  return {k: host(v) if isinstance(v, jax.Array) else v for k, v in result._asdict().items()}


def _tuned(result: jaxl2.TuneResult) -> dict[str, Any]:
  path = [dict(s._asdict()) for s in result.path]
  out = {"lam": result.lam, "val_loss": result.val_loss, "path": path}
  return out | {
    "converged": result.converged,
    "reason": result.reason,
    "params": host(result.params),
  }


def _tune(train: Any, state: Any, train_data: Any, val_data: Any, **options: Any) -> dict:
  return _tuned(
    jaxl2.tune_lam(
      train, state, train_data, val_data, train_steps=10, batch_size=8, max_iter=2, lam0=0.5,
      **options,
    )
  )  # fmt: skip


def _lam_cases() -> dict[str, Any]:
  """Each tool on replicated and FSDP params, with global and NumPy data (not every
  combination: where the data are placed does not depend on the params' layout)."""
  mesh_ = mesh()
  train_np, val_np = _regression(0), _regression(1)
  train_data, val_data = global_batch(train_np, mesh_), global_batch(val_np, mesh_)
  rep, fsdp = _trained("replicated", train_data), _trained("fsdp", train_data)

  def round_trip() -> dict[str, Any]:
    # With checkpoints, then again: the second call finds the finished search and returns
    # the same result without training.
    directory = _directory("tune_lam")
    first = _tune(*rep, train_data, val_data, checkpoint_dir=directory)
    again = _tune(*rep, train_data, val_data, checkpoint_dir=directory)
    return first | {"restored equal": again == first}

  return {
    "lam_hypergradient replicated": lambda: _listed(
      jaxl2.lam_hypergradient(*rep, train_data, val_data, batch_size=8)
    ),
    # NumPy data, the same in every process; 32 = 2 batches of 12 and a remainder of 8.
    "lam_hypergradient numpy data replicated": lambda: _listed(
      jaxl2.lam_hypergradient(*rep, train_np, val_np, batch_size=12)
    ),
    "lam_hypergradient fsdp": lambda: _listed(
      jaxl2.lam_hypergradient(*fsdp, train_data, val_data, batch_size=8)
    ),
    "effective_params exact numpy data fsdp": lambda: _listed(
      jaxl2.effective_params(*fsdp, train_np, batch_size=8)
    ),
    # Hutchinson's estimate with a rank-4 Nyström preconditioner.
    "effective_params estimate replicated": lambda: _listed(
      jaxl2.effective_params(
        *rep, train_data, batch_size=8, exact_below=1, probes=4, precondition=4
      )
    ),
    "tune_lam replicated, checkpoints restored": round_trip,
  }


def _lam_errors() -> dict[str, Any]:
  """Data that differ between processes, and data on one process's devices: clear errors."""
  mesh_ = mesh()
  (x, y), val = _regression(0), _regression(1)
  train, state = _trained("replicated", global_batch((x, y), mesh_))
  local = jax.device_put(x, jax.local_devices()[0])
  return {
    "error lam_hypergradient data differ between processes": lambda: _listed(
      jaxl2.lam_hypergradient(train, state, (x + jax.process_index(), y), val)
    ),
    "error effective_params data on one device": lambda: _listed(
      jaxl2.effective_params(train, state, (local, y))
    ),
    # Only the last process pins its data: the others must stop too, not wait for it.
    "error effective_params data on one device in one process": lambda: _listed(
      jaxl2.effective_params(train, state, (local if jax.process_index() == 1 else x, y))
    ),
  }


def lam_tools() -> dict[str, Any]:
  """lam_hypergradient, effective_params (exact, estimated) and tune_lam on replicated and FSDP
  params with global and NumPy data; tune_lam's checkpoints; the errors."""
  return run_cases({**_lam_cases(), **_lam_errors()})
