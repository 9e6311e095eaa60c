"""How every figure in the suite is measured: compile once, warm up, median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def measure(fn: Callable[..., Any], *args: Any, repeats: int = 20) -> dict[str, float]:
  """Compile time and steady time of ``jax.jit(fn)(*args)``.

  Compile time is lowering plus XLA compilation. Steady time is the median of
  ``repeats`` calls after one warm-up call, each waited on with
  `jax.block_until_ready`, so no call is timed while it still runs
  asynchronously or while it still compiles. Steady calls go through the
  jitted function (its C++ fast path), as users call it: a `Compiled` object
  dispatches through Python, ~1.4 ms more for 2,000 argument buffers.
  """
  jitted = jax.jit(fn)
  start = time.perf_counter()
  jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(jitted(*args))  # warm-up (and the fast path's cache), excluded
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return {
    "compile_s": compile_s,
    "median_s": statistics.median(times),
    "min_s": min(times),
    "repeats": repeats,
  }


def measure_call(fn: Callable[[], Any], *, repeats: int) -> dict[str, float]:
  """Median wall time of an already-compiled Python-level call (first call excluded)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def compare(
  fns: dict[str, Callable[..., Any]], args: dict[str, tuple], *, repeats: int = 20, rounds: int = 5
) -> dict[str, dict[str, float]]:
  """`measure` for several variants, their steady calls interleaved round by round.

  Timing variants one after the other lets drift (frequency, cache, other
  jobs) favour whichever runs last; here every round times each variant for
  ``repeats`` calls in turn, and the figure is the median over rounds of each
  round's median.
  """
  jitted = {name: jax.jit(fn) for name, fn in fns.items()}
  out: dict[str, dict[str, float]] = {}
  for name, fn in jitted.items():
    start = time.perf_counter()
    fn.lower(*args[name]).compile()
    out[name] = {"compile_s": time.perf_counter() - start}
    jax.block_until_ready(fn(*args[name]))  # warm-up, excluded
  per_round: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in jitted.items():
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args[name]))
        times.append(time.perf_counter() - start)
      per_round[name].append(statistics.median(times))
  for name in fns:
    out[name].update(median_s=statistics.median(per_round[name]), repeats=repeats * rounds)
  return out
