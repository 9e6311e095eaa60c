"""How every figure in the suite is measured: compile once, warm up, median of repeats."""

from __future__ import annotations

import functools
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


def _cold_compile_s(fn: Callable[..., Any], args: tuple) -> tuple[float, float]:
  """(wall, process CPU) seconds to trace, lower and compile ``fn``, every JAX cache emptied.

  `jax.clear_caches` drops the traces, lowerings and executables of every
  jitted function (inner ones too: jnp's, optax's, jaxl2's kernels), and a new
  wrapper defeats the tracing cache keyed on ``fn``: each call pays what the
  first compile in a fresh process pays, bar Python imports and XLA's start-up.
  CPU time moves less than wall time when other jobs load the machine.
  """
  jax.clear_caches()
  fresh = functools.wraps(fn)(lambda *a: fn(*a))
  start, start_cpu = time.perf_counter(), time.process_time()
  jax.jit(fresh).lower(*args).compile()
  return time.perf_counter() - start, time.process_time() - start_cpu


def compare(
  fns: dict[str, Callable[..., Any]],
  args: dict[str, tuple],
  *,
  repeats: int = 20,
  rounds: int = 5,
  compile_rounds: int = 1,
  evict_bytes: int = 0,
) -> dict[str, dict[str, float]]:
  """`measure` for several variants, interleaved.

  Timing variants one after the other lets drift (frequency, cache, other
  jobs) favour whichever runs last. Without ``evict_bytes``, every round times
  each variant in turn, ``repeats`` calls in a row (each warm from its own
  previous call), starting one variant later each round. With it, the
  variants take turns call by call, so each sees the same load even when the
  load comes and goes within a round, and before every timed call a buffer
  of ``evict_bytes`` is read (untimed), so that no variant finds in the cache
  what the previous one read: read right after another variant, the same
  100 MB tree ran 1.8x faster. Steady time is the median over rounds of each
  round's median, with the smallest and largest round medians beside it
  (``min_round_s``, ``max_round_s``) and every round's (``round_s``, for
  ratios taken round by round).

  Compile time: ``compile_rounds`` rounds of one cold compile per variant
  (`_cold_compile_s`); the median, with the fastest and slowest
  (``compile_min_s``, ``compile_max_s``), and the median process CPU time
  (``compile_cpu_s``).
  """
  compiles: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
  for _ in range(compile_rounds):
    for name, fn in fns.items():
      compiles[name].append(_cold_compile_s(fn, args[name]))
  jitted = {name: jax.jit(fn) for name, fn in fns.items()}
  for name, fn in jitted.items():
    jax.block_until_ready(fn(*args[name]))  # compile and warm up, excluded
  evict = _evictor(evict_bytes)
  names = list(jitted)
  per_round: dict[str, list[float]] = {name: [] for name in fns}
  for r in range(rounds):
    order = names[r % len(names) :] + names[: r % len(names)]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for turn in [[n] * repeats for n in order] if evict is None else [order] * repeats:
      for name in turn:
        if evict is not None:
          evict()
        start = time.perf_counter()
        jax.block_until_ready(jitted[name](*args[name]))
        times[name].append(time.perf_counter() - start)
    for name in fns:
      per_round[name].append(statistics.median(times[name]))
  walls = {name: [wall for wall, _ in times] for name, times in compiles.items()}
  return {
    name: {
      "compile_s": statistics.median(walls[name]),
      "compile_min_s": min(walls[name]),
      "compile_max_s": max(walls[name]),
      "compile_cpu_s": statistics.median(cpu for _, cpu in compiles[name]),
      "median_s": statistics.median(per_round[name]),
      "min_round_s": min(per_round[name]),
      "max_round_s": max(per_round[name]),
      "round_s": per_round[name],
      "repeats": repeats * rounds,
    }
    for name in fns
  }


def _evictor(n_bytes: int) -> Callable[[], None] | None:
  """A function that reads ``n_bytes`` of its own (a jitted sum), or None for 0."""
  if n_bytes <= 0:
    return None
  buffer = jax.numpy.ones((n_bytes // 4,), jax.numpy.float32)
  total = jax.jit(jax.numpy.sum)
  jax.block_until_ready(total(buffer))
  return lambda: jax.block_until_ready(total(buffer))
