"""Sweep suite: 16 λ in one `jaxl2.sweep` vs 16 sequential runs vs 1 run; checkpoint cost.

Two figures each: the first call (compilation included, as a user meets it
once) and the steady call (median of 3 later calls: `sweep` reuses its
compiled program across calls). `sweep` compiles once for all models; the
sequential baseline compiles a one-model program once and runs it 16 times
with λ as data; "1 run" is one model alone. The suite runs in a child process
that exposes one XLA host device per CPU core, as `jaxl2 demo` does, so
`sweep` can shard its models.

Checkpoint overhead: the demo sweep with ``checkpoint_dir`` (default chunks,
a fresh directory each call, so every call trains and saves) against the
same sweep without, calls interleaved, medians of 3 after one warm-up each,
long enough (~20 s) for the default schedule to save mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

N_LAMS, REPEATS = 16, 3
CHECKPOINT_STEPS = 7000  # the demo sweep's ~2.9 ms a step here: ~20 s, two or more saves


def _problems(quick: bool):
  import flax.linen as nn
  import numpy as np
  import optax

  import jaxl2

  class Net(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
      for i, w in enumerate(self.widths):
        x = nn.Dense(w)(x)
        x = nn.relu(x) if i < len(self.widths) - 1 else x
      return x

  rng = np.random.default_rng(0)
  points = rng.normal(size=(211, 2)).astype(np.float32)
  labels = (points[:, 0] * points[:, 1] > 0).astype(np.float32)[:, None]
  tiny = Net((20, 3, 1))

  def bce(logits, y):
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()

  digits = jaxl2.load_digits(train_size=100, seed=0)
  demo = Net((256, 10))

  def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  steps = 50 if quick else 500
  yield (
    "tiny 2-20-3-1, 211 points",
    tiny,
    bce,
    (points, labels),
    (points, labels),
    2,
    steps,
  )
  yield (
    "demo MLP 64-256-10, 100 digits",
    demo,
    xent,
    (digits.x_train, digits.y_train),
    (digits.x_val, digits.y_val),
    64,
    50 if quick else 800,
  )


def _first_and_steady(fn) -> tuple[float, float]:
  """(first call, median of the later calls): compile included, then excluded."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def _model_fns(model: Any, in_dim: int) -> tuple[Any, Any]:
  """(init_fn, apply_fn) of a linen model taking ``in_dim`` inputs."""
  import jax
  import jax.numpy as jnp

  def init_fn(key: jax.Array) -> Any:
    return model.init(key, jnp.ones((1, in_dim)))["params"]

  def apply_fn(p: Any, x: jax.Array) -> jax.Array:
    return model.apply({"params": p}, x)

  return init_fn, apply_fn


def _measure(problem: tuple, lams: list[float]) -> dict[str, Any]:
  import jax
  import optax

  import jaxl2

  name, model, loss, train, val, in_dim, steps = problem
  opt = optax.adam(1e-2)
  init_fn, apply_fn = _model_fns(model, in_dim)

  def sweep(grid: list[float]) -> None:
    jaxl2.sweep(init_fn, apply_fn, loss, opt, train, val, lams=grid, steps=steps)

  step = jaxl2.make_train_step(apply_fn, loss, opt, lam=0.0, m=len(train[1]))

  @jax.jit
  def run_one(state: Any) -> Any:
    return jax.lax.scan(lambda st, _: (step.step_fn(st, train)[0], None), state, None, steps)[0]

  def sequential() -> None:
    # One compiled program (λ is data), run once per λ: what a user's loop costs.
    params = init_fn(jax.random.key(0))
    for lam in lams:
      jax.block_until_ready(run_one(step.init(params, lam=lam)))

  one_first, one = _first_and_steady(lambda: sweep(lams[1:2]))
  swept_first, swept = _first_and_steady(lambda: sweep(lams))
  seq_first, seq = _first_and_steady(sequential)
  return {
    "case": name,
    "devices": len(jax.devices()),
    "steps": steps,
    "one_run_s": one,
    "sweep16_first_s": swept_first,
    "sweep16_s": swept,
    "sequential16_first_s": seq_first,
    "sequential16_s": seq,
    "sweep_vs_sequential": swept / seq,
    "sweep_vs_sequential_first_call": swept_first / seq_first,
    "sweep_vs_one_run": swept / one,
    "one_run_first_s": one_first,
  }


def _checkpoint_overhead(problem: tuple, lams: list[float], steps: int) -> dict[str, Any]:
  """The sweep with checkpoints at the default chunk size vs without, in one process."""
  import optax
  import orbax.checkpoint as ocp

  import jaxl2

  name, model, loss, train, val, in_dim, _ = problem
  init_fn, apply_fn = _model_fns(model, in_dim)
  opt = optax.adam(1e-2)  # one object: the program cache keys on it
  saves: list[int] = []
  original = ocp.CheckpointManager.save

  def counted(self: Any, step: int, *args: Any, **kwargs: Any) -> Any:
    saves.append(step)
    return original(self, step, *args, **kwargs)

  def sweep(directory: str | None) -> float:
    start = time.perf_counter()
    jaxl2.sweep(init_fn, apply_fn, loss, opt, train, val, lams=lams, steps=steps,
                checkpoint_dir=directory)  # fmt: skip
    return time.perf_counter() - start

  root = tempfile.mkdtemp()
  ocp.CheckpointManager.save = counted
  try:
    sweep(None), sweep(os.path.join(root, "warm-up"))  # compilation, excluded
    plain, checkpointed, per_call = [], [], []
    for i in range(REPEATS):  # interleaved, so drift favours neither
      plain.append(sweep(None))
      saves.clear()
      checkpointed.append(sweep(os.path.join(root, str(i))))
      per_call.append(len(saves))
  finally:
    ocp.CheckpointManager.save = original
    shutil.rmtree(root, ignore_errors=True)
  ratio = statistics.median(checkpointed) / statistics.median(plain)
  return {
    "case": f"checkpoint overhead, {name}",
    "steps": steps,
    "plain_s": statistics.median(plain),
    "checkpointed_s": statistics.median(checkpointed),
    "checkpointed_vs_plain": ratio,
    "saves_per_call": per_call,
  }


def child(quick: bool) -> list[dict[str, Any]]:
  import numpy as np

  lams = [0.0, *np.logspace(-3, 1, N_LAMS - 1).tolist()]
  problems = list(_problems(quick))
  rows = [_measure(problem, lams) for problem in problems]
  steps = 100 if quick else CHECKPOINT_STEPS
  return [*rows, _checkpoint_overhead(problems[-1], lams, steps)]


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  del repeats  # long cases: REPEATS, stated in the module docstring
  env = dict(os.environ)
  cores = os.cpu_count() or 1
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cores}"
  cmd = [sys.executable, "-m", "bench.suite_sweep", "--child"] + (["--quick"] if quick else [])
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  rows = json.loads(out.stdout.strip().splitlines()[-1])
  for row in rows:
    if "checkpointed_vs_plain" in row:
      print(
        f"  sweep {row['case']}: {row['checkpointed_vs_plain']:.3f}x the sweep without "
        f"({row['checkpointed_s']:.2f}s vs {row['plain_s']:.2f}s, saves {row['saves_per_call']})",
        flush=True,
      )
      continue
    print(
      f"  sweep {row['case']} on {row['devices']} device(s): sweep16 {row['sweep16_s']:.2f}s = "
      f"{row['sweep_vs_sequential']:.2f}x sequential16 steady, "
      f"{row['sweep_vs_sequential_first_call']:.2f}x on the first call, "
      f"{row['sweep_vs_one_run']:.2f}x one run",
      flush=True,
    )
  return rows


if __name__ == "__main__":
  if "--child" in sys.argv:
    print(json.dumps(child("--quick" in sys.argv)))
