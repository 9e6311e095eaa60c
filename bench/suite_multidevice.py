"""Multi-device suite: the penalty's compile time on 8 simulated devices, params replicated.

A TPU host (every Colab TPU runtime) has 8 devices, and `jaxl2 demo` sets one
host device per core. Each measurement runs in a fresh process (JAX fixes the
device count when it starts, and a fresh process caches nothing from another
case) with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``; the tree is
``n`` float32 leaves of 40 x 25 (``bench/trees.py``), replicated on a mesh of
all N devices (``NamedSharding(mesh, P())``, the data-parallel default), and
``jax.jit(f).lower(tree).compile()`` is timed, after a warm-up compile of an
unrelated function (JAX's own first-use costs). Every case runs on both kinds
of mesh: Explicit axes (the default of `jax.make_mesh` since JAX 0.7: every
intermediate's type carries its sharding, and the lowered program a sharding
constraint per op) and Auto axes (the default of `jax.sharding.Mesh`, what
most training scripts build). Cases, ratios within one run:

* jaxl2 at 2,000 leaves on 8 devices vs on 1 device (target <= 1.5x);
* jaxl2 vs the naive per-leaf `vdot` sum at 1,000 leaves, both on 8 devices
  (target <= 0.15x).

The processes of a comparison take turns, ``rounds`` times; a figure is the
median over rounds. Compile times are process CPU seconds (XLA compiles on one
thread, and CPU time moves less than wall time when other jobs load the
machine); wall seconds are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

LAM, M = 0.1, 100.0
_REDUCE = re.compile(r"(?<![\w-])reduce\(")


def _worker(impl: str, n_leaves: int, axes: str) -> dict[str, Any]:
  """Compiles ``impl`` over ``n_leaves`` replicated leaves on all devices, ``axes`` mesh axes."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxl2
  from bench import trees

  jax.jit(lambda x: x + 1).lower(1.0).compile()  # JAX's own first-use costs, outside timing
  axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axes]
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
  tree = jax.device_put(
    trees.make_tree(trees.many_leaves_shapes(n_leaves)), NamedSharding(mesh, P())
  )
  if impl == "jaxl2":
    fn = lambda p: jaxl2.l2_penalty(p, LAM, M, mask=jaxl2.all_floating)  # noqa: E731
  else:
    fn = lambda p: LAM / (2 * M) * sum(jnp.vdot(w, w) for w in jax.tree_util.tree_leaves(p))  # noqa: E731
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = jax.jit(fn).lower(tree).compile()
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  value = float(compiled(tree))
  return {
    "devices": jax.device_count(),
    "compile_s": wall,
    "compile_cpu_s": cpu,
    "reductions": len(_REDUCE.findall(compiled.as_text())),
    "value": value,
  }


def _spawn(impl: str, n_leaves: int, devices: int, axes: str) -> dict[str, Any]:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "bench.suite_multidevice", "--worker", impl, str(n_leaves), axes]
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(
      f"{impl} at {n_leaves} leaves on {devices} devices ({axes}):\n{out.stderr[-3000:]}"
    )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _compare(
  name: str, runs: dict[str, tuple[str, int, int, str]], rounds: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """Each run (impl, leaves, devices, axes) ``rounds`` times, in turns; medians per run."""
  samples: dict[str, list[dict[str, Any]]] = {k: [] for k in runs}
  for _ in range(rounds):
    for key, run in runs.items():
      samples[key].append(_spawn(*run))
  medians = {
    key: {
      stat: statistics.median(s[stat] for s in rows)
      for stat in ("compile_s", "compile_cpu_s", "reductions")
    }
    | {"value": rows[0]["value"], "devices": rows[0]["devices"]}
    for key, rows in samples.items()
  }
  return {"case": name, "mesh": runs[next(iter(runs))][3], "rounds": rounds}, medians


def _pair(m: dict[str, dict[str, Any]], ratio: str, top: str, bottom: str) -> dict[str, Any]:
  """Both runs' compile times (CPU and wall) and reductions, and ``top``/``bottom`` ratios."""
  out: dict[str, Any] = {}
  for stat in ("compile_cpu_s", "compile_s", "reductions"):
    for key in (top, bottom):
      out[f"{key}_{stat}"] = m[key][stat]
  out[ratio] = m[top]["compile_cpu_s"] / m[bottom]["compile_cpu_s"]
  out[f"{ratio}_wall"] = m[top]["compile_s"] / m[bottom]["compile_s"]
  return out


def _comparison(
  name: str, runs: dict[str, tuple[str, int, int, str]], rounds: int, ratio: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """One row: both runs' figures (named by their keys) and ``ratio`` = first / second."""
  row, m = _compare(name, runs, rounds)
  top, bottom = runs
  row.update(leaves=runs[top][1], **_pair(m, ratio, top, bottom))
  return row, m


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  """The two comparisons on each kind of mesh; ``repeats`` is unused (one compile a process)."""
  del repeats
  big, mid, rounds = (100, 100, 1) if quick else (2000, 1000, 3)
  rows = []
  for axes in ("explicit", "auto"):
    row, m = _comparison(
      f"jaxl2 compile, {big} replicated leaves, 8 vs 1 device, {axes} mesh",
      {"one_device": ("jaxl2", big, 1, axes), "eight_devices": ("jaxl2", big, 8, axes)},
      rounds,
      "eight_vs_one",
    )
    row["value_rel_diff"] = abs(m["eight_devices"]["value"] / m["one_device"]["value"] - 1)
    rows.append(row)
    row, _ = _comparison(
      f"compile, {mid} replicated leaves on 8 devices, jaxl2 vs naive, {axes} mesh",
      {"jaxl2": ("jaxl2", mid, 8, axes), "naive": ("naive", mid, 8, axes)},
      rounds,
      "jaxl2_vs_naive",
    )
    rows.append(row)
    a, b = rows[-2:]
    print(
      f"  multidevice ({axes}): {big} leaves, 8 vs 1 device {a['eight_vs_one']:.2f}x "
      f"({a['eight_devices_compile_cpu_s']:.2f} / {a['one_device_compile_cpu_s']:.2f} s CPU); "
      f"{mid} leaves on 8, jaxl2 vs naive {b['jaxl2_vs_naive']:.3f}x "
      f"({b['jaxl2_compile_cpu_s']:.2f} / {b['naive_compile_cpu_s']:.2f} s CPU)",
      flush=True,
    )
  return rows


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--worker", nargs=3, metavar=("IMPL", "LEAVES", "AXES"), required=True)
  args = parser.parse_args()
  impl, leaves, axes = args.worker
  print(json.dumps(_worker(impl, int(leaves), axes)))
