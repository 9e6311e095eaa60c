"""A `jaxl2.TrainState` of every form through orbax, across processes; run by test_checkpoint.py.

``python -m tests.checkpoint_forms save DIR`` builds each model, takes 3 steps,
saves the state with orbax's ``StandardCheckpointer`` (as README "Checkpoints"
shows), then goes on for 5 more steps: the uninterrupted run. ``... resume DIR``
is a fresh process: it builds the same models, restores each state with an
abstract target made from a freshly ``init``-ed one, and takes the same 5 steps.
Each writes, per form, the losses of those 5 steps and the final params and
model state (``DIR/<mode>-<form>.npz``) and the restored leaves' shardings.
Run with 4 CPU devices: the ``sharded`` form spreads its params over them.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxl2
from tests.training import test_training_models as models

LAM, M, BEFORE, AFTER = 0.5, 640.0, 3, 5
BATCH = models.BATCH


def _linen() -> tuple[jaxl2.TrainStep, jaxl2.TrainState]:
  model = models.ResNetish()
  variables = model.init(jax.random.key(0), models.IMAGES, train=False)

  def loss_fn(params, batch_stats, batch, key):
    train = key is not None
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], train=train,
      mutable=["batch_stats"] if train else [], rngs={"dropout": key} if train else {},
    )  # fmt: skip
    return models._weighted_ce(logits, batch), (updates.get("batch_stats", batch_stats), {})

  train = jaxl2.make_train_step(None, loss_fn, optax.adam(1e-2), lam=LAM, m=M)
  return train, train.init(variables["params"], variables["batch_stats"], seed=7)


def _nnx() -> tuple[jaxl2.TrainStep, jaxl2.TrainState]:
  def loss_fn(model, batch):
    return models._weighted_ce(model(batch["image"]), batch)

  train = jaxl2.make_train_step(None, loss_fn, optax.adam(1e-2), lam=LAM, m=M)
  return train, train.init(models.NNXNet(nnx.Rngs(0, dropout=1)), seed=4)


def _equinox() -> tuple[jaxl2.TrainStep, jaxl2.TrainState]:
  model, model_state = eqx.nn.make_with_state(models.EqxNet)(jax.random.key(0))
  train = jaxl2.make_train_step(None, models._eqx_loss, optax.adam(1e-2), lam=LAM, m=M)
  return train, train.init(model, model_state, seed=3)


def _simple(sharded: bool) -> tuple[jaxl2.TrainStep, jaxl2.TrainState]:
  rng = np.random.default_rng(0)
  params = {
    "w1": (0.1 * rng.normal(size=(192, 16))).astype(np.float32),
    "b1": np.zeros(16, np.float32),
    "w2": (0.1 * rng.normal(size=(16, 4))).astype(np.float32),
  }

  def apply_fn(p, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"]) @ p["w2"]

  sharding = None
  if sharded:  # FSDP: each kernel's first axis split over the 4 devices, the bias replicated
    mesh = jax.make_mesh((jax.device_count(),), ("data",), (jax.sharding.AxisType.Auto,))
    sharding = {
      "w1": NamedSharding(mesh, P("data")),
      "b1": NamedSharding(mesh, P()),
      "w2": NamedSharding(mesh, P("data")),
    }
  train = jaxl2.make_train_step(
    apply_fn, models._mean_ce, optax.adam(1e-2), lam=LAM, m=M, param_sharding=sharding
  )
  return train, train.init(params)


FORMS = {
  "simple": lambda: _simple(False),
  "sharded": lambda: _simple(True),
  "linen": _linen,
  "nnx": _nnx,
  "equinox": _equinox,
}


def _batch(form: str) -> Any:
  return (models.IMAGES, models.LABELS) if form in ("simple", "sharded") else BATCH


def _steps(train: jaxl2.TrainStep, state: jaxl2.TrainState, batch: Any, n: int):
  losses = []
  for _ in range(n):
    state, metrics = train(state, batch)
    losses.append(np.asarray(metrics["loss"]))
  return state, losses


def _raw(x: Any) -> Any:
  """A typed PRNG key (NNX's RNG streams) as its raw bits; other arrays as they are."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def _write(path: pathlib.Path, state: jaxl2.TrainState, losses: list[np.ndarray]) -> None:
  leaves = jax.tree_util.tree_leaves((state.params, state.model_state, state.opt_state))
  arrays = {f"leaf{i}": np.asarray(_raw(x)) for i, x in enumerate(leaves)}
  np.savez(path, losses=np.stack(losses), **arrays)


def _shardings(state: jaxl2.TrainState) -> list[str]:
  return [repr(x.sharding) for x in jax.tree_util.tree_leaves(state)]


def main(mode: str, directory: str) -> None:
  out = pathlib.Path(directory)
  checkpointer = ocp.StandardCheckpointer()
  report = {}
  for form, build in FORMS.items():
    train, state = build()
    if mode == "save":
      state, _ = _steps(train, state, _batch(form), BEFORE)
      checkpointer.save(out / f"ckpt-{form}", state)
      checkpointer.wait_until_finished()
    else:
      fresh = _shardings(state)
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
      state = checkpointer.restore(out / f"ckpt-{form}", abstract)
      report[form] = {"same_shardings": _shardings(state) == fresh, "step": int(state.step)}
    state, losses = _steps(train, state, _batch(form), AFTER)
    _write(out / f"{mode}-{form}.npz", state, losses)
  print(json.dumps(report))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
