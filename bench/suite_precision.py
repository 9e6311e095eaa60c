"""Precision suite: relative error of Σw² against float64 for bf16/fp16 trees of 1e7 elements.

fp16 weights of magnitude up to ~1800 square past fp16's largest value
(65504): a sum in the leaf's own dtype overflows to inf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import suite_penalty


def _tree(dtype: Any, n: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  leaves = 10
  shape = (n // leaves // 1000, 1000)
  tree = {}
  for i in range(leaves):
    w = rng.uniform(-1800, 1800, size=shape) if dtype == jnp.float16 else rng.normal(size=shape)
    tree[f"layer{i}/kernel"] = jnp.asarray(w, dtype)
  return tree


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  del repeats  # accuracy, not time
  n = 10**5 if quick else 10**7
  rows = []
  for dtype in (jnp.bfloat16, jnp.float16):
    tree = _tree(dtype, n, seed=0)
    exact = 0.5 * sum(
      float(np.sum(np.asarray(w, np.float64) ** 2)) for w in jax.tree_util.tree_leaves(tree)
    )
    row: dict[str, Any] = {"case": f"{jnp.dtype(dtype).name}-{n:.0e}", "exact": exact}
    # Every leaf is a kernel: the peers sum them all, as jaxl2's default mask does.
    for variant, fn in suite_penalty.peers(jax.tree_util.tree_leaves).items():
      got = float(jax.jit(fn)(tree))
      row[f"{variant}_rel_error"] = abs(got - exact) / exact if np.isfinite(got) else float("inf")
    rows.append(row)
    print(
      f"  precision {row['case']}: jaxl2 {row['jaxl2_rel_error']:.1e}, naive "
      f"{row['naive_rel_error']:.1e}, optax {row['optax_rel_error']:.1e}",
      flush=True,
    )
  return rows
