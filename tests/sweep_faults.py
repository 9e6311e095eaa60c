"""A small `jaxl2.sweep` with checkpoints, killed and resumed; run by test_sweep_faults.py.

``python -m tests.sweep_faults MODE DIR`` runs the same sweep (general form
with a running statistic and dropout, minibatches, 3 λ × 2 seeds, 12 steps in
chunks of 4) with ``checkpoint_dir=DIR``; plain JAX, so that each process
starts fast. Modes:

* ``full``: the uninterrupted run;
* ``kill-early``: SIGKILLs itself at step 2, before the first checkpoint;
* ``kill-mid``: SIGKILLs itself at step 6, in the middle of the second chunk
  (step 4 saved);
* ``kill-save``: SIGKILLs itself during the second save (step 8), once orbax
  has written the checkpoint's temporary folder and before it renames it into
  place (orbax's own finalize step is wrapped here, not jaxl2's code);
* ``resume``: reruns the sweep to the end.

``full`` and ``resume`` write the final params and metrics to ``DIR.npz``
and print the latest checkpoint the run found in DIR (None for none).
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

STEPS, EVERY, KILL_AT = 12, 4, {"kill-early": 2, "kill-mid": 6}
SAVE_KILLED = 8  # the step whose save is killed in "kill-save"


def _init(key):
  k1, k2 = jax.random.split(key)
  params = {"w1": 0.5 * jax.random.normal(k1, (8, 16)), "w2": 0.5 * jax.random.normal(k2, (16, 3))}
  return params, {"mean": jnp.zeros(16)}  # a running mean of the hidden units


def _loss(params, state, batch, key):
  hidden = jnp.tanh(batch["x"] @ params["w1"])
  if key is None:  # evaluation: no dropout, the running statistic
    centered, new_state = hidden - state["mean"], state
  else:
    centered = hidden - hidden.mean(axis=0)
    centered = centered * jax.random.bernoulli(key, 0.7, centered.shape) / 0.7
    new_state = {"mean": 0.9 * state["mean"] + 0.1 * hidden.mean(axis=0)}
  logits = centered @ params["w2"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss, (new_state, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])})


def _data(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8)).astype(np.float32)
  return {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)}


def sweep(directory: pathlib.Path, kill_at: int | None = None) -> jaxl2.SweepResult:
  def progress(done, total):
    if done == kill_at:
      kill()

  return jaxl2.sweep(
    _init, None, _loss, optax.adam(1e-2), _data(40, 0), _data(30, 1), lams=[0.0, 0.5, 3.0],
    steps=STEPS, seeds=(4, 5), batch_size=8, progress=progress, checkpoint_dir=directory,
    checkpoint_every=EVERY,
  )  # fmt: skip


def main(mode: str, directory: str) -> None:
  path = pathlib.Path(directory).resolve()
  found = ocp.CheckpointManager(path).latest_step() if path.exists() else None
  if mode == "kill-save":
    kill_in_finalize(path, SAVE_KILLED)
  result = sweep(path, KILL_AT.get(mode))
  if mode not in ("full", "resume"):
    raise SystemExit(f"mode {mode!r} ran to the end without being killed")
  leaves = jax.tree_util.tree_leaves(result.params)
  arrays = {f"param{i}": np.asarray(x) for i, x in enumerate(leaves)}
  metrics = {k: getattr(result, k) for k in ("train_loss", "val_loss", "val_accuracy")}
  np.savez(path.with_suffix(".npz"), **arrays, **metrics)
  print(json.dumps({"found": found, "best_lam": result.best_lam}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
