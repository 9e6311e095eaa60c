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
