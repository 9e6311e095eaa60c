"""One process of a simulated multi-host run; tests/test_sharding.py starts two.

``python tests/multihost_check.py PROCESS_ID NUM_PROCESSES PORT`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: each process is a
"host" with 4 CPU devices, `jax.distributed.initialize` joins them over
localhost (JAX's CPU collectives), and the mesh spans all 8 devices. Every
process runs the same program, as on a real cluster, feeding its own half of
the global batch; it prints its results as one JSON line.

`problem` and `train` are shared with the single-process reference.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxl2

LAM, M, STEPS, BATCH = 0.1, 1024.0, 5, 64


def problem() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Host (NumPy) weights and the global batch, identical in every process."""
  rng = np.random.default_rng(0)
  weights = {
    "w1": (0.1 * rng.normal(size=(16, 64))).astype(np.float32),
    "b1": np.zeros(64, np.float32),
    "w2": (0.1 * rng.normal(size=(64, 8))).astype(np.float32),
    "b2": np.zeros(8, np.float32),
  }
  x = rng.normal(size=(BATCH, 16)).astype(np.float32)
  y = rng.normal(size=(BATCH, 8)).astype(np.float32)
  return weights, x, y


def mlp(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def mean_squared(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean((outputs - targets) ** 2)


def train(step: jaxl2.TrainStep, weights: Any, batch: Any) -> tuple[Any, list[float]]:
  """STEPS steps, then λ doubled and one more: the penalties seen at each step."""
  state = step.init(weights)
  penalties = []
  for i in range(STEPS + 1):
    if i == STEPS:
      state = step.set_lam(state, 2 * LAM)
    state, metrics = step(state, batch)
    penalties.append(float(metrics["penalty"]))
  return state, penalties


def main(process_id: int, num_processes: int, port: int) -> dict[str, Any]:
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,  # a peer that never comes fails the test within a minute
    shutdown_timeout_seconds=60,
  )
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  layout = {
    "w1": NamedSharding(mesh, P("data", "model")),
    "b1": NamedSharding(mesh, P("model")),
    "w2": NamedSharding(mesh, P("model", "data")),
    "b2": NamedSharding(mesh, P()),
  }
  weights, x, y = problem()
  # Each process holds only its rows of the batch, as on a real cluster.
  rows = slice(process_id * BATCH // num_processes, (process_id + 1) * BATCH // num_processes)
  batch_sharding = NamedSharding(mesh, P("data"))
  batch = (
    jax.make_array_from_process_local_data(batch_sharding, x[rows]),
    jax.make_array_from_process_local_data(batch_sharding, y[rows]),
  )
  step = jaxl2.make_train_step(
    mlp, mean_squared, optax.adam(1e-2), lam=LAM, m=M, param_sharding=layout
  )
  state, penalties = train(step, weights, batch)
  # Params already global: init infers their layout instead.
  inferred = jaxl2.make_train_step(mlp, mean_squared, optax.adam(1e-2), lam=LAM, m=M)
  _, inferred_penalties = train(inferred, state.params, batch)
  penalty = jax.jit(lambda p: jaxl2.l2_penalty(p, LAM, M))
  hlo = penalty.lower(state.params).compile().as_text()
  return {
    "process": process_id,
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "penalties": penalties,
    "inferred_penalties": inferred_penalties,
    "l2_penalty": float(penalty(state.params)),
    "w1_layout_kept": state.params["w1"].sharding == layout["w1"],
    "no_all_gather": "all-gather" not in hlo and "all-reduce" in hlo,
  }


if __name__ == "__main__":
  print(json.dumps(main(*(int(a) for a in sys.argv[1:4]))))
