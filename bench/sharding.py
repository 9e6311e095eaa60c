"""The L2 penalty over a sharded tree on 1, 2, 4 and 8 devices: ``python bench/sharding.py``.

A tree of ``--params`` float32 parameters in ``--leaves`` kernels (25M in 4 by
default), each split along its rows over a one-axis mesh ("data", fully
sharded), is penalized by ``jax.jit(lambda p: jaxl2.l2_penalty(p, lam, m))``;
its analytic gradient ``jaxl2.l2_penalty_grad`` is timed beside it. Each device
count runs in its own process (JAX fixes the device count when it starts),
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.

Per device count: compile excluded, one warm-up call excluded, every call
waited on with `jax.block_until_ready`, the median of ``--repeats`` (>= 20)
calls, reported as a ratio to the 1-device median measured in the same run.
The optimized HLO's collectives are counted too: the penalty must all-reduce
scalars and never all-gather; the gradient needs no collective.

On CPU the "devices" are simulated: they share the host's cores and memory
bandwidth, so the ratios are informational (they show the per-device work and
the collectives add little, not a speed-up). On a GPU/TPU host run it with
``--platform`` left at its default to use the real devices.

Results: JSON at ``--out`` (default ``bench/results/sharding-cpu.json``) and a
markdown table on stdout. ``--quick``: 2M parameters, 20 repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

HERE = pathlib.Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results" / "sharding-cpu.json"
COLS = 1024  # columns per kernel; rows are split across devices
LAM, M = 0.1, 50_000.0
_COLLECTIVE = re.compile(
  r"= (?P<type>.+?) (?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
  r"collective-permute|collective-broadcast)(?:-start)?\("
)


def leaf_shapes(total: int, leaves: int, max_devices: int) -> list[tuple[int, int]]:
  """``leaves`` kernels of ~``total / leaves`` parameters; rows a multiple of ``max_devices``."""
  rows = max(1, round(total / leaves / COLS / max_devices)) * max_devices
  return [(rows, COLS)] * leaves


# ---- one device count (runs in its own process) ------------------------------------


def _time(fn: Any, args: tuple[Any, ...], repeats: int) -> dict[str, float]:
  import jax

  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  text = compiled.as_text()
  jax.block_until_ready(compiled(*args))  # warm-up, excluded
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  ops: dict[str, int] = {}
  scalar_only = True
  for match in _COLLECTIVE.finditer(text):
    ops[match["op"]] = ops.get(match["op"], 0) + 1
    shapes = re.findall(r"[a-z]+\d*\[([^\]]*)\]", match["type"])
    scalar_only = scalar_only and all(dims == "" for dims in shapes)
  return {
    "median_s": statistics.median(times),
    "min_s": min(times),
    "compile_s": compile_s,
    "collectives": ops,
    "collectives_scalar_only": scalar_only,
  }


def run_worker(n_devices: int, shapes: list[tuple[int, int]], repeats: int) -> dict[str, Any]:
  """Times the penalty and its gradient with the tree sharded over ``n_devices`` devices."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxl2

  devices = jax.devices()
  if len(devices) < n_devices:
    raise RuntimeError(f"asked for {n_devices} devices; JAX sees {len(devices)}: {devices}")
  mesh = jax.sharding.Mesh(np.asarray(devices[:n_devices]), ("data",))
  sharding = NamedSharding(mesh, P("data", None))
  keys = jax.random.split(jax.random.key(0), len(shapes))
  params = {
    f"kernel_{i}": jax.device_put(jax.random.normal(k, s, jnp.float32), sharding)
    for i, (k, s) in enumerate(zip(keys, shapes, strict=True))
  }
  jax.block_until_ready(params)
  penalty = _time(lambda p: jaxl2.l2_penalty(p, LAM, M), (params,), repeats)
  grad = _time(lambda p: jaxl2.l2_penalty_grad(p, LAM, M), (params,), repeats)
  return {
    "devices": n_devices,
    "platform": devices[0].platform,
    "penalty": penalty,
    "l2_penalty_grad": grad,
  }


# ---- the driver -------------------------------------------------------------------------


def _worker_env(n_devices: int, platform_name: str | None) -> dict[str, str]:
  env = dict(os.environ)
  if platform_name == "cpu":
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _spawn(n_devices: int, args: argparse.Namespace) -> dict[str, Any]:
  command = [
    sys.executable,
    str(HERE),
    "--worker",
    str(n_devices),
    "--params",
    str(args.params),
    "--leaves",
    str(args.leaves),
    "--repeats",
    str(args.repeats),
    "--max-devices",
    str(max(args.devices)),
  ]
  proc = subprocess.run(
    command,
    env=_worker_env(n_devices, args.platform),
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"the {n_devices}-device run failed:\n{proc.stdout}\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _ops(timing: dict[str, Any]) -> str:
  ops = ", ".join(f"{n} {op}" for op, n in sorted(timing["collectives"].items()))
  if not ops:
    return "none"
  return ops + (" (scalars)" if timing["collectives_scalar_only"] else " (NOT scalar)")


def _table(results: list[dict[str, Any]]) -> str:
  lines = [
    "| devices | penalty median (ms) | ratio to 1 device | grad median (ms) | ratio to 1 device "
    "| penalty collectives | grad collectives |",
    "|---:|---:|---:|---:|---:|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['devices']} | {1e3 * r['penalty']['median_s']:.2f} | {r['penalty_ratio']:.2f} "
      f"| {1e3 * r['l2_penalty_grad']['median_s']:.2f} | {r['grad_ratio']:.2f} "
      f"| {_ops(r['penalty'])} | {_ops(r['l2_penalty_grad'])} |"
    )
  return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2M parameters, 20 repeats")
  parser.add_argument("--params", type=int, default=None, help="total parameters (25M)")
  parser.add_argument("--leaves", type=int, default=4, help="number of kernels (4)")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls, >= 20 (30)")
  parser.add_argument(
    "--devices",
    type=lambda s: [int(n) for n in s.split(",")],
    default=[1, 2, 4, 8],
    help="device counts, comma-separated; the first is the baseline (1,2,4,8)",
  )
  parser.add_argument(
    "--platform",
    default="cpu",
    help="'cpu' simulates the devices (default); anything else uses the host's real devices",
  )
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON results path")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--max-devices", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.params is None:
    args.params = 2_000_000 if args.quick else 25_000_000
  if args.repeats is None:
    args.repeats = 20 if args.quick else 30
  if args.repeats < 20:
    parser.error(f"--repeats must be >= 20 (a median of fewer is too noisy); got {args.repeats}")
  if args.devices[0] != 1:
    parser.error(f"--devices must start with 1, the baseline; got {args.devices}")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark (or, with ``--worker N``, one device count); returns the results."""
  args = _parse(argv)
  max_devices = args.max_devices or max(args.devices)
  shapes = leaf_shapes(args.params, args.leaves, max_devices)
  if args.worker is not None:
    result = run_worker(args.worker, shapes, args.repeats)
    print(json.dumps(result))
    return result

  results = []
  for n in args.devices:
    print(f"{n} device(s)...", file=sys.stderr, flush=True)
    results.append(_spawn(n, args))
  base = results[0]
  for r in results:
    r["penalty_ratio"] = r["penalty"]["median_s"] / base["penalty"]["median_s"]
    r["grad_ratio"] = r["l2_penalty_grad"]["median_s"] / base["l2_penalty_grad"]["median_s"]

  import jax

  out = {
    "benchmark": "sharding",
    "what": "jit(l2_penalty) and jit(l2_penalty_grad) over float32 kernels sharded along "
    "their rows (PartitionSpec('data', None)) on a one-axis mesh of N devices",
    "note": (
      "CPU devices are simulated (--xla_force_host_platform_device_count): they share "
      "the host's cores, so ratios are informational, not a scaling result."
      if results[0]["platform"] == "cpu"
      else "real devices"
    ),
    "method": f"compile and one warm-up call excluded; block_until_ready; median of "
    f"{args.repeats} calls; ratio to the 1-device median of the same run",
    "params": sum(r * c for r, c in shapes),
    "leaf_shapes": [list(s) for s in shapes],
    "dtype": "float32",
    "repeats": args.repeats,
    "machine": {
      "platform": results[0]["platform"],
      "cores": os.cpu_count(),
      "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "python": platform.python_version(),
      "jax": jax.__version__,
      "date": datetime.date.today().isoformat(),
    },
    "results": results,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
  n_params = out["params"]
  print(
    f"L2 penalty over {n_params / 1e6:.1f}M float32 parameters in {len(shapes)} sharded kernels"
  )
  print(f"({out['note']})\n")
  print(_table(results))
  print(f"\nJSON: {args.out}")
  return out


if __name__ == "__main__":
  main()
