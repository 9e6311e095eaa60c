"""Penalty suite: jaxl2.l2_penalty vs the naive form, optax, and the memory-bandwidth limit.

The *limit* is one `jnp.vdot` over a contiguous array holding as many floats
as the penalized leaves: the least any implementation must read. For trees of
many small leaves the *floor* adds what a jitted call costs merely to receive
that many buffers (a function of the tree that does no work).

Per case, the limit, the receive function and the three implementations are
timed interleaved (`bench.timing.compare`): each round times every variant
in turn, so the limit and jaxl2 are measured seconds apart, and a figure is
the median over rounds of each round's median.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxl2
from bench import trees
from bench.timing import compare


def _kernels(tree: dict) -> list:
  return [w for w in jax.tree_util.tree_leaves(tree) if w.ndim >= 2]


def naive(tree: dict) -> jax.Array:
  """What most code writes: a Python sum of per-leaf `vdot`s."""
  return 0.5 * sum(jnp.vdot(w, w) for w in _kernels(tree))


def optax_tree_norm(tree: dict) -> jax.Array:
  return 0.5 * optax.tree_utils.tree_norm(_kernels(tree), squared=True)


def jaxl2_penalty(tree: dict) -> jax.Array:
  return jaxl2.l2_penalty(tree, 1.0, 1.0)


def receive_only(tree: dict) -> jax.Array:
  # Touches one element of each buffer so no argument is pruned, and does no real work.
  return sum(w.reshape(-1)[0] for w in jax.tree_util.tree_leaves(tree))


def cases(quick: bool) -> dict[str, dict]:
  if quick:
    return {
      "mlp-small": trees.mlp_shapes((64, 128, 128, 10)),
      "leaves-50": trees.many_leaves_shapes(50),
    }
  out = {"mlp-37M": trees.mlp_shapes(), "resnet50-like": trees.resnet50_shapes()}
  for n in (200, 500, 1000, 2000):
    out[f"leaves-{n}x1000"] = trees.many_leaves_shapes(n)
  return out


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  rows = []
  for name, shapes in cases(quick).items():
    tree = trees.make_tree(shapes)
    n_selected = sum(int(w.size) for w in _kernels(tree))
    flat = jnp.ones((n_selected,), jnp.float32)
    variants = {"jaxl2": jaxl2_penalty, "naive": naive, "optax": optax_tree_norm}
    fns = {"limit": lambda x: jnp.vdot(x, x), **variants}
    args = {"limit": (flat,), **{v: (tree,) for v in variants}}
    many = name.startswith("leaves")
    if many:
      fns["receive"], args["receive"] = receive_only, (tree,)
    timed = compare(fns, args, repeats=repeats)
    limit_s = timed["limit"]["median_s"]
    floor_s = limit_s + (timed["receive"]["median_s"] if many else 0.0)
    row = {
      "case": name,
      "leaves": len(shapes),
      "params": trees.n_params(tree),
      "limit_ms": 1e3 * limit_s,
      "floor_ms": 1e3 * floor_s,
    }
    for variant in variants:
      m = timed[variant]
      row[f"{variant}_ms"] = 1e3 * m["median_s"]
      row[f"{variant}_compile_s"] = m["compile_s"]
      row[f"{variant}_vs_limit"] = m["median_s"] / limit_s
      row[f"{variant}_vs_floor"] = m["median_s"] / floor_s
    rows.append(row)
    print(
      f"  penalty {name:>18}: jaxl2 {row['jaxl2_vs_floor']:.2f}x floor "
      f"({row['jaxl2_vs_limit']:.2f}x limit), naive {row['naive_vs_floor']:.2f}x, "
      f"optax {row['optax_vs_floor']:.2f}x; compile jaxl2 {row['jaxl2_compile_s']:.2f}s "
      f"naive {row['naive_compile_s']:.2f}s",
      flush=True,
    )
  return rows
