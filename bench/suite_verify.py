"""Verify suite: what one `verify_update` / `verify_penalty` call costs, as a ratio.

A verify call traces and compiles the user's loss or optax chain once and runs
it, so its baseline is what a user pays for the same loss anyway: a fresh
``jax.jit(jax.grad(loss))`` compiled and called once. Both are timed from a
new closure each repeat (nothing cached), as users call them, on a Flax MLP
784-1024-1024-1024-10 (2.9M parameters) at batch 256 under Adam. Medians of
``repeats`` calls, interleaved (grad, verify_update, verify_penalty, ...).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxl2
from bench.suite_train import MLP

LAM, M, LR = 1e-2, 60_000, 1e-3


def _problem(quick: bool) -> tuple[Any, Any]:
  widths, batch = ((64, 64, 64, 10), 32) if quick else ((1024, 1024, 1024, 10), 256)
  model = MLP(widths)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=batch))
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p: Any) -> jax.Array:
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def _calls(params: Any, loss: Any) -> dict[str, Any]:
  def grad_once() -> Any:
    return jax.jit(jax.grad(lambda p: loss(p)))(params)

  def update_once() -> Any:
    tx = optax.chain(jaxl2.add_l2_grad(LAM, M), optax.adam(LR))
    return jaxl2.verify_update(tx, optax.adam(LR), params, LAM, M)

  def penalty_once() -> Any:
    return jaxl2.verify_penalty(
      lambda p, lam: loss(p) + jaxl2.l2_penalty(p, lam, M), params, LAM, M
    )

  return {"jit_grad": grad_once, "verify_update": update_once, "verify_penalty": penalty_once}


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  params, loss = _problem(quick)
  calls = _calls(params, loss)
  assert calls["verify_update"]().ok and calls["verify_penalty"]().ok  # correct setups
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(max(3, min(repeats, 7))):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())  # a report is host data already; grads are waited on
      times[name].append(time.perf_counter() - start)
  base = statistics.median(times["jit_grad"])
  n_params = sum(w.size for w in jax.tree_util.tree_leaves(params))
  return [
    {
      "case": name,
      "params": n_params,
      "median_s": statistics.median(t),
      "x_jit_grad": statistics.median(t) / base,
      "repeats": len(t),
    }
    for name, t in times.items()
  ]
