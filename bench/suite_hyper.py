"""Hypergradient suite: one `jaxl2.lam_hypergradient` as a ratio to one training step.

Same model, same training data, same run: the step is `jaxl2.make_train_step`'s
full-batch step (``step_fn`` under `jax.jit`, compile and a warm-up call
excluded, `block_until_ready`, median of ``repeats``); the hypergradient is the
public call as users make it (compiled on a warm-up call, then the median of
``repeats`` calls, each reading its diagnostics back to the host). The params
are first trained at λ for a few hundred Adam steps, so the conjugate-gradient
solve sees the curvature it sees in use; its iteration count is reported, as
the ratio scales with it (each iteration is one Hessian-vector product, about
two to three gradients).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxl2
from bench.timing import measure, measure_call

LAM = 4.0


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _cases(quick: bool):
  def linear(p: Any, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]

  yield "logistic 64-10, 200 digits", linear, {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  hidden = 32 if quick else 256
  k1, k2 = jax.random.split(jax.random.key(0))

  def mlp(p: Any, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  params = {
    "w1": jax.random.normal(k1, (64, hidden)) / 8, "b1": jnp.zeros(hidden),
    "w2": jax.random.normal(k2, (hidden, 10)) / jnp.sqrt(hidden), "b2": jnp.zeros(10),
  }  # fmt: skip
  yield f"MLP 64-{hidden}-10, 200 digits", mlp, params


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  data = jaxl2.load_digits(train_size=200, val_size=500, seed=0)
  xt, yt, xv, yv = map(jnp.asarray, data)
  m = xt.shape[0]
  rows = []
  for name, apply, params in _cases(quick):
    mask = jax.tree_util.tree_map(lambda w: w.ndim >= 2, params)
    train = jaxl2.make_train_step(apply, _xent, optax.adam(1e-2), lam=LAM, m=m, mask=mask)
    state = train.init(params)
    for _ in range(50 if quick else 2000):
      state, _ = train(state, (xt, yt))
    step = measure(train.step_fn, state, (xt, yt), repeats=repeats)

    def hypergradient(state: Any = state, train: Any = train) -> Any:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # approximate W* is the usual case
        return jaxl2.lam_hypergradient(train, state, (xt, yt), (xv, yv))

    hg = hypergradient()
    timed = measure_call(hypergradient, repeats=repeats)
    row = {
      "case": name,
      "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
      "train_step_ms": 1e3 * step["median_s"],
      "hypergradient_ms": 1e3 * timed["median_s"],
      "cg_iterations": hg.iterations,
      "residual": hg.residual,
      "negative_curvature": hg.negative_curvature,
    }
    row["ratio"] = row["hypergradient_ms"] / row["train_step_ms"]
    row["ratio_per_iteration"] = row["ratio"] / max(hg.iterations, 1)
    rows.append(row)
    print(
      f"  hyper {name}: one hypergradient = {row['ratio']:.1f} training steps "
      f"({row['hypergradient_ms']:.2f} ms vs {row['train_step_ms']:.3f} ms; "
      f"{hg.iterations} CG iterations, {row['ratio_per_iteration']:.2f} steps each)",
      flush=True,
    )
  return rows
