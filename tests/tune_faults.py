"""A small `jaxl2.tune_lam` with checkpoints, killed and resumed; run by test_tune_resume.py.

``python -m tests.tune_faults MODE DIR`` runs the same search (general form
with dropout, minibatches, 4 λ: 20 training steps for the first, 10 for each
later one) with ``checkpoint_dir=DIR``. The loss counts training steps through
a `jax.debug.callback` (user code, no hook in jaxl2), which is how the child
kills itself mid-run. Modes:

* ``full``: the uninterrupted search;
* ``kill-early``: SIGKILLs itself at training step 5, before any checkpoint;
* ``kill-mid``: at step 35, while training the third λ (two λ saved);
* ``kill-save``: during the save after the second λ, once orbax has written
  its temporary folder and before renaming it (orbax's finalize is wrapped);
* ``resume``: reruns the search to the end.

``full`` and ``resume`` write the result to ``DIR.npz`` and print the latest
checkpoint the run found in DIR.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import jaxl2
from tests.faults import kill, kill_in_finalize

KILL_AT = {"kill-early": 5, "kill-mid": 35}
SAVE_KILLED = 2  # the checkpoint (after the second λ) whose save "kill-save" interrupts
_steps = {"n": 0, "kill_at": None}


def _count(_: jax.Array) -> None:
  _steps["n"] += 1
  if _steps["n"] == _steps["kill_at"]:
    kill()


def _loss(params, state, batch, key):
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  if key is not None:  # training: dropout, and one count per step
    jax.debug.callback(_count, key)
    hidden = hidden * jax.random.bernoulli(key, 0.8, hidden.shape) / 0.8
  logits = hidden @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), (state, {})


def _data(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)}


def tune(directory: pathlib.Path) -> jaxl2.TuneResult:
  rng = np.random.default_rng(0)
  params = {
    "w1": (0.5 * rng.normal(size=(6, 12))).astype(np.float32),
    "b1": np.zeros(12, np.float32),
    "w2": (0.5 * rng.normal(size=(12, 3))).astype(np.float32),
  }
  train = jaxl2.make_train_step(None, _loss, optax.adam(0.05), lam=1.0, m=40)
  return jaxl2.tune_lam(
    train, train.init(params, seed=3), _data(40, 1), _data(30, 2), train_steps=20,
    retrain_steps=10, batch_size=8, max_iter=4, checkpoint_dir=directory,
  )  # fmt: skip


def main(mode: str, directory: str) -> None:
  path = pathlib.Path(directory).resolve()
  found = ocp.CheckpointManager(path).latest_step() if path.exists() else None
  _steps["kill_at"] = KILL_AT.get(mode)
  if mode == "kill-save":
    kill_in_finalize(path, SAVE_KILLED)
  result = tune(path)
  if mode not in ("full", "resume"):
    raise SystemExit(f"mode {mode!r} ran to the end without being killed")
  leaves = jax.tree_util.tree_leaves((result.params, result.state.opt_state))
  arrays = {f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)}
  path_rows = np.array([list(step) for step in result.path], np.float64)
  np.savez(path.with_suffix(".npz"), path=path_rows, lam=result.lam, **arrays)
  print(json.dumps({"found": found, "steps": _steps["n"], "reason": result.reason}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
