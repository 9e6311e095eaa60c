"""Penalty suite: jaxl2.l2_penalty vs the naive form, optax, and the memory-bandwidth limit.

Trees: synthetic ones (`bench.trees`: few large leaves, thousands of small
ones, one of every regime) and trees with the leaf names and shapes of public
models (`bench.real_trees`). jaxl2 uses its default mask (`jaxl2.by_role`);
the peers sum exactly the leaves it selects, so every variant computes the
same number.

The *limit* is one `jnp.vdot` over a contiguous array holding as many floats
as the penalized leaves: the least any implementation must read. For trees of
many small leaves the *floor* adds what a jitted call costs merely to receive
that many buffers (a function of the tree that does no work).

Per case, the limit, the receive function and the three implementations are
timed interleaved call by call, each call after an untimed read of ``EVICT``
bytes so that none finds the tree in cache (`bench.timing.compare`). Steady
time: the median over ``ROUNDS`` rounds of each round's median (the smallest
and largest round beside it); jaxl2's ratio to the faster peer is taken round
by round (pairs timed seconds apart), the median over rounds with its spread,
and the ratio of the two fastest rounds beside it. Compile time: the median of
``COMPILE_ROUNDS`` cold compiles each (3 for trees of 1,000 leaves or more,
whose naive compile takes seconds), taken in turn (fastest and slowest
beside it); jaxl2's ratio to the naive sum is in process CPU seconds
(``jaxl2_compile_vs_naive``: the machine is shared, and wall time counts
other jobs too), the wall-time ratio beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxl2
from bench import real_trees, trees
from bench.timing import compare

ROUNDS, COMPILE_ROUNDS = 11, 5
EVICT = 64 << 20  # bytes read between timed calls: twice this machine's 32 MB L3
BIG = 50_000_000  # selected floats above which a round times fewer calls


def cases(quick: bool) -> dict[str, dict[str, tuple[int, ...]]]:
  """Case name -> {path: shape}. Quick: the same structures, tiny."""
  if quick:
    return {
      "mlp-small": trees.mlp_shapes((64, 128, 128, 10)),
      "leaves-50": trees.many_leaves_shapes(50),
      "vit-tiny": real_trees.vit_b16_shapes(width=16, depth=2, mlp=32, heads=2, classes=10),
      "gemma-stacked-tiny": real_trees.gemma_2b_shapes(
        layers=2, vocab=64, width=16, heads=2, head_dim=8, hidden=32
      ),
    }
  out = {
    "mlp-37M": trees.mlp_shapes(),
    "resnet50-like": trees.resnet50_shapes(),
    "mixed-602": trees.mixed_shapes(),
  }
  for n in (200, 500, 1000, 2000):
    out[f"leaves-{n}x1000"] = trees.many_leaves_shapes(n)
  out["vit-b16"] = real_trees.vit_b16_shapes()
  out["resnet152"] = real_trees.resnet152_shapes()
  out["bert-base"] = real_trees.bert_base_shapes()
  out["gpt2-small"] = real_trees.gpt2_small_shapes()
  # Every Gemma-2B leaf shape, 2 of the 18 layers and 16,384 of the 256,128 tokens: 254M floats.
  out["gemma-2b-stacked"] = real_trees.gemma_2b_shapes(layers=2, vocab=16_384)
  return out


def build(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, Callable[[dict], list]]:
  """The tree (nested dicts, random normal values) and the peers' leaf selection."""
  tree = real_trees.nest(trees.make_tree(shapes))
  mask = jax.tree_util.tree_leaves(real_trees.nest(trees.selected(shapes)))

  def kernels(t: dict) -> list:
    return [w for w, keep in zip(jax.tree_util.tree_leaves(t), mask, strict=True) if keep]

  return tree, kernels


def peers(kernels: Callable[[dict], list]) -> dict[str, Callable[[dict], jax.Array]]:
  """½·Σ‖W‖² three ways: jaxl2's default mask; per-leaf `vdot`s; optax's tree norm."""
  return {
    "jaxl2": lambda t: jaxl2.l2_penalty(t, 1.0, 1.0),
    # What most code writes: a Python sum of per-leaf `vdot`s.
    "naive": lambda t: 0.5 * sum(jnp.vdot(w, w) for w in kernels(t)),
    "optax": lambda t: 0.5 * optax.tree_utils.tree_norm(kernels(t), squared=True),
  }


def receive_only(tree: dict) -> jax.Array:
  # Touches one element of each buffer so no argument is pruned, and does no real work.
  return sum(w.reshape(-1)[0] for w in jax.tree_util.tree_leaves(tree))


def timing_columns(
  row: dict[str, Any], timed: dict[str, dict[str, float]], variants: list[str]
) -> None:
  """Each variant's steady ms (round spread) and compile s (spread), then jaxl2's ratios."""
  for variant in variants:
    m = timed[variant]
    row[f"{variant}_ms"] = 1e3 * m["median_s"]
    row[f"{variant}_ms_spread"] = f"{1e3 * m['min_round_s']:.3g}-{1e3 * m['max_round_s']:.3g}"
    row[f"{variant}_compile_s"] = m["compile_s"]
    row[f"{variant}_compile_spread"] = f"{m['compile_min_s']:.3g}-{m['compile_max_s']:.3g}"
    row[f"{variant}_compile_cpu_s"] = m["compile_cpu_s"]
  # Against the faster peer, round by round (each pair timed seconds apart, so load
  # that comes and goes cancels), then the median over rounds and its spread.
  best = min((v for v in variants if v != "jaxl2"), key=lambda v: timed[v]["median_s"])
  ratios = [a / b for a, b in zip(timed["jaxl2"]["round_s"], timed[best]["round_s"], strict=True)]
  row["best_peer"] = best
  row["jaxl2_vs_best_peer"] = statistics.median(ratios)
  row["jaxl2_vs_best_peer_spread"] = f"{min(ratios):.3g}-{max(ratios):.3g}"
  # The fastest round of each: the least disturbed when other jobs come and go.
  row["jaxl2_vs_best_peer_fastest"] = timed["jaxl2"]["min_round_s"] / timed[best]["min_round_s"]
  # Process CPU seconds: on a shared machine wall time also counts other jobs.
  row["jaxl2_compile_vs_naive"] = timed["jaxl2"]["compile_cpu_s"] / timed["naive"]["compile_cpu_s"]
  row["jaxl2_compile_wall_vs_naive"] = timed["jaxl2"]["compile_s"] / timed["naive"]["compile_s"]
  row["optax_compile_vs_naive"] = timed["optax"]["compile_cpu_s"] / timed["naive"]["compile_cpu_s"]


def plan_rounds(repeats: int, floats: int, leaves: int, compile_rounds: int) -> tuple[int, int]:
  """(calls per steady round, cold compiles): fewer where one call or one compile is long."""
  calls = repeats if floats < BIG else max(5, repeats // 4)
  return calls, min(compile_rounds, 3) if leaves >= 1000 else compile_rounds


def warm_up() -> None:
  """Compiles each variant once on a tiny tree: one-time costs (lazy imports, first
  traces of library helpers) would otherwise land on whichever case comes first."""
  tree, kernels = build(trees.mlp_shapes((8, 16, 4)))
  for fn in peers(kernels).values():
    jax.jit(fn).lower(tree).compile()


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  rows = []
  rounds, compile_rounds = (2, 1) if quick else (ROUNDS, COMPILE_ROUNDS)
  warm_up()
  for name, shapes in cases(quick).items():
    tree, kernels = build(shapes)
    n_selected = sum(int(w.size) for w in kernels(tree))
    flat = jnp.ones((n_selected,), jnp.float32)
    variants = peers(kernels)
    fns = {"limit": lambda x: jnp.vdot(x, x), **variants}
    args = {"limit": (flat,), **{v: (tree,) for v in variants}}
    many = name.startswith("leaves")
    if many:
      fns["receive"], args["receive"] = receive_only, (tree,)
    calls, compiles = plan_rounds(repeats, n_selected, len(kernels(tree)), compile_rounds)
    timed = compare(
      fns, args, repeats=calls, rounds=rounds, compile_rounds=compiles, evict_bytes=EVICT
    )
    limit_s = timed["limit"]["median_s"]
    floor_s = limit_s + (timed["receive"]["median_s"] if many else 0.0)
    row: dict[str, Any] = {
      "case": name,
      "leaves": len(shapes),
      "selected": len(kernels(tree)),
      "params": trees.n_params(tree),
      "limit_ms": 1e3 * limit_s,
      "floor_ms": 1e3 * floor_s,
    }
    timing_columns(row, timed, list(variants))
    for variant in variants:
      row[f"{variant}_vs_limit"] = timed[variant]["median_s"] / limit_s
      row[f"{variant}_vs_floor"] = timed[variant]["median_s"] / floor_s
    rows.append(row)
    print(
      f"  penalty {name:>18}: jaxl2 {row['jaxl2_vs_best_peer']:.3f}x best peer, "
      f"{row['jaxl2_vs_floor']:.2f}x floor; compile {row['jaxl2_compile_s']:.3f}s = "
      f"{row['jaxl2_compile_vs_naive']:.3f}x naive",
      flush=True,
    )
  return rows
