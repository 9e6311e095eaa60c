"""Train-step suite: what L2 costs inside a real jitted SGD step, as a ratio to no L2.

Variants: unregularized; the jaxl2 penalty in the loss (`regularized`); the
jaxl2 transform (`add_l2_grad`); `optax.add_decayed_weights` (the same update
under SGD), timed interleaved round by round (`bench.timing.compare`). Cases:
a Flax MLP 784-1024-1024-10 at batch 256, and a step over 2,000 parameter
leaves of 1,000 floats (the many-leaves regime).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxl2
from bench import trees
from bench.timing import compare

LAM, M, LR = 1e-2, 60_000, 1e-2


class MLP(nn.Module):
  widths: tuple[int, ...] = (1024, 1024, 10)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, w in enumerate(self.widths):
      x = nn.Dense(w)(x)
      x = nn.relu(x) if i < len(self.widths) - 1 else x
    return x


def _variants(loss: Any, params: Any) -> dict[str, tuple[Any, optax.GradientTransformation]]:
  kernels = jax.tree_util.tree_map(lambda w: w.ndim >= 2, params)
  return {
    "unregularized": (loss, optax.sgd(LR)),
    "jaxl2_penalty": (jaxl2.regularized(loss, LAM, M), optax.sgd(LR)),
    "jaxl2_add_l2_grad": (loss, optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(LR))),
    "optax_add_decayed_weights": (
      loss,
      optax.chain(optax.add_decayed_weights(jaxl2.to_weight_decay(LAM, M), kernels), optax.sgd(LR)),
    ),
  }


def _step(loss: Any, tx: optax.GradientTransformation):
  def step(params: Any, opt_state: Any, *batch: Any) -> tuple[Any, Any]:
    grads = jax.grad(loss)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _mlp_case(quick: bool):
  widths, batch = ((64, 64, 10), 32) if quick else ((1024, 1024, 10), 256)
  in_dim = 32 if quick else 784
  model = MLP(widths)
  params = model.init(jax.random.key(0), jnp.ones((1, in_dim)))["params"]
  x = jax.random.normal(jax.random.key(1), (batch, in_dim))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

  def loss(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  name = f"mlp-{in_dim}-{'-'.join(map(str, widths))}-batch{batch}"
  return name, params, loss, (x, y)


def _many_leaves_case(quick: bool):
  n = 50 if quick else 2000
  params = trees.make_tree(trees.many_leaves_shapes(n), scale=0.1)
  x = jax.random.normal(jax.random.key(1), (25,))

  def loss(p: Any, x: jax.Array) -> jax.Array:
    # A cheap data loss touching every leaf, so the step is mostly the update.
    return sum(jnp.mean(w @ x) for w in jax.tree_util.tree_leaves(p))

  return f"leaves-{n}x1000", params, loss, (x,)


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  rows = []
  for name, params, loss, batch in (_mlp_case(quick), _many_leaves_case(quick)):
    row: dict[str, Any] = {"case": name, "params": trees.n_params(params)}
    variants = _variants(loss, params)
    timed = compare(
      {v: _step(objective, tx) for v, (objective, tx) in variants.items()},
      {v: (params, tx.init(params), *batch) for v, (_, tx) in variants.items()},
      repeats=repeats,
    )
    for variant, m in timed.items():
      row[f"{variant}_ms"] = 1e3 * m["median_s"]
      row[f"{variant}_compile_s"] = m["compile_s"]
    base_ms, base_c = row["unregularized_ms"], row["unregularized_compile_s"]
    for variant in ("jaxl2_penalty", "jaxl2_add_l2_grad", "optax_add_decayed_weights"):
      row[f"{variant}_ratio"] = row[f"{variant}_ms"] / base_ms
      row[f"{variant}_compile_ratio"] = row[f"{variant}_compile_s"] / base_c
    rows.append(row)
    print(
      f"  train {name}: penalty {row['jaxl2_penalty_ratio']:.3f}x, add_l2_grad "
      f"{row['jaxl2_add_l2_grad_ratio']:.3f}x, optax {row['optax_add_decayed_weights_ratio']:.3f}x "
      f"of {base_ms:.2f} ms; compile penalty {row['jaxl2_penalty_compile_ratio']:.2f}x",
      flush=True,
    )
  return rows
