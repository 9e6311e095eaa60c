"""Gradient suite: the L2 gradient and the L2 update, jaxl2 vs naive and optax.

Two steps per tree (`bench.suite_penalty.cases`, fewer of the many-leaves
ones), each a jitted function, the peers on exactly the leaves jaxl2's
default mask selects:

* ``grad``: the gradient of (λ/2m)·Σ‖W‖² with respect to the whole tree:
  ``jax.grad`` of `jaxl2.l2_penalty`, of the naive per-leaf ``vdot`` sum, and
  of optax's squared tree norm.
* ``update``: one SGD update with coupled L2, given the data gradients:
  ``optax.chain(jaxl2.add_l2_grad(λ, m), optax.sgd(lr))``;
  ``optax.chain(optax.add_decayed_weights(λ/m, mask), optax.sgd(lr))``; and
  by hand, ``w - lr·(g + (λ/m)·w)`` on the selected leaves.

Timed as the penalty suite times (`bench.timing.compare`, interleaved call by
call after a cache-evicting read; steady the median of ``ROUNDS`` round
medians, jaxl2's ratio to the faster peer round by round; compile the median
of ``COMPILE_ROUNDS`` cold compiles; spreads beside them; compile ratios in
process CPU seconds, wall-time ratios beside them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxl2
from bench import real_trees, suite_penalty, trees
from bench.timing import compare

LAM, M, LR = 1e-2, 60_000, 1e-2
# The penalty suite covers the many-leaves range; one case of it here.
_SKIPPED = ("leaves-200x1000", "leaves-500x1000", "leaves-2000x1000")
ROUNDS, COMPILE_ROUNDS = 7, 3  # fewer than the penalty suite's: each compile takes longer


def _grads(kernels: Callable[[dict], list]) -> dict[str, Callable[[dict], Any]]:
  scale = LAM / (2 * M)
  return {
    "jaxl2": jax.grad(lambda t: jaxl2.l2_penalty(t, LAM, M)),
    "naive": jax.grad(lambda t: scale * sum(jnp.vdot(w, w) for w in kernels(t))),
    "optax": jax.grad(lambda t: scale * optax.tree_utils.tree_norm(kernels(t), squared=True)),
  }


def _updates(mask: dict) -> tuple[dict[str, Callable[..., Any]], dict[str, Any]]:
  """Each variant's ``step(params, grads, state) -> (params, state)``, and its initial state."""
  rate = jaxl2.to_weight_decay(LAM, M)
  txs = {
    "jaxl2": optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(LR)),
    "optax": optax.chain(optax.add_decayed_weights(rate, mask), optax.sgd(LR)),
  }

  def with_tx(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, grads: Any, state: Any) -> tuple[Any, Any]:
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  def by_hand(params: Any, grads: Any, state: None) -> tuple[Any, None]:
    def one(w: jax.Array, g: jax.Array, keep: bool) -> jax.Array:
      return w - LR * (g + rate * w) if keep else w - LR * g

    return jax.tree_util.tree_map(one, params, grads, mask), state

  return {"jaxl2": with_tx(txs["jaxl2"]), "naive": by_hand, "optax": with_tx(txs["optax"])}, txs


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  rows = []
  rounds, compile_rounds = (2, 1) if quick else (ROUNDS, COMPILE_ROUNDS)
  suite_penalty.warm_up()
  for name, shapes in suite_penalty.cases(quick).items():
    if name in _SKIPPED:
      continue
    tree, kernels = suite_penalty.build(shapes)
    n_selected = sum(int(w.size) for w in kernels(tree))
    calls, compiles = suite_penalty.plan_rounds(
      repeats, n_selected, len(kernels(tree)), compile_rounds
    )
    data_grads = jax.tree_util.tree_map(lambda w: 0.01 * w, tree)
    mask = real_trees.nest(trees.selected(shapes))
    steps, txs = _updates(mask)
    states = {v: txs[v].init(tree) if v in txs else None for v in steps}
    for what, fns, args in (
      ("grad", _grads(kernels), dict.fromkeys(steps, (tree,))),
      ("update", steps, {v: (tree, data_grads, states[v]) for v in steps}),
    ):
      timed = compare(
        fns,
        args,
        repeats=calls,
        rounds=rounds,
        compile_rounds=compiles,
        evict_bytes=suite_penalty.EVICT,
      )
      row: dict[str, Any] = {"case": name, "step": what, "params": trees.n_params(tree)}
      suite_penalty.timing_columns(row, timed, list(fns))
      rows.append(row)
      print(
        f"  grad {name:>18} {what:>6}: jaxl2 {row['jaxl2_vs_best_peer']:.3f}x best peer "
        f"({row['jaxl2_ms']:.3g} ms); compile {row['jaxl2_compile_s']:.3f}s = "
        f"{row['jaxl2_compile_vs_naive']:.3f}x naive",
        flush=True,
      )
  return rows
