"""Parameter pytrees with realistic leaf shapes, filled with random normal values."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _fill(shapes: dict[str, tuple[int, ...]], dtype: Any, seed: int, scale: float) -> dict:
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
    name: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    for k, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


def mlp_shapes(widths: tuple[int, ...] = (784, 4096, 4096, 4096, 10)) -> dict[str, tuple]:
  """Dense kernels and biases: the 784-4096-4096-4096-10 MLP has 37M params in 8 leaves."""
  shapes = {}
  for i, (a, b) in enumerate(itertools.pairwise(widths)):
    shapes[f"Dense_{i}/kernel"] = (a, b)
    shapes[f"Dense_{i}/bias"] = (b,)
  return shapes


def resnet50_shapes() -> dict[str, tuple]:
  """ResNet-50's leaves: 53 convs + BatchNorm scale/bias + the classifier, ~25.6M params."""
  shapes: dict[str, tuple] = {}

  def conv_bn(name: str, k: int, cin: int, cout: int) -> None:
    shapes[f"{name}/conv/kernel"] = (k, k, cin, cout)
    shapes[f"{name}/bn/scale"] = (cout,)
    shapes[f"{name}/bn/bias"] = (cout,)

  conv_bn("stem", 7, 3, 64)
  cin = 64
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
    for block in range(blocks):
      name = f"stage{stage}/block{block}"
      if block == 0:
        conv_bn(f"{name}/proj", 1, cin, 4 * width)
      conv_bn(f"{name}/a", 1, cin, width)
      conv_bn(f"{name}/b", 3, width, width)
      conv_bn(f"{name}/c", 1, width, 4 * width)
      cin = 4 * width
  shapes["head/kernel"] = (2048, 1000)
  shapes["head/bias"] = (1000,)
  return shapes


def many_leaves_shapes(n_leaves: int, size: int = 1000) -> dict[str, tuple]:
  """``n_leaves`` matrices of ``size`` floats each (40 x 25 for 1,000)."""
  return {f"layer{i:05d}/kernel": (size // 25, 25) for i in range(n_leaves)}


def mixed_shapes() -> dict[str, tuple]:
  """Every regime of the penalty's plan in one tree: 13.9M params in 602 leaves, 502 kernels.

  Two large kernels; 100 mid-size kernels of 25 shapes (4,096 to 17,856 floats)
  with their biases; 200 small kernels of one shape (8 x 64); 200 small
  kernels of 40 shapes (up to 24 x 63).
  """
  shapes: dict[str, tuple] = {"embed/kernel": (8192, 1024), "head/kernel": (1024, 4096)}
  for i in range(100):
    shapes[f"mid{i:03d}/kernel"] = (64 + 4 * (i % 25), 64 + (i % 25) * 3 % 61)
    shapes[f"mid{i:03d}/bias"] = (64 + (i % 25) * 3 % 61,)
  for i in range(200):
    shapes[f"same{i:03d}/kernel"] = (8, 64)
    shapes[f"rare{i:03d}/kernel"] = (4 + i % 20, 24 + i % 40)
  return shapes


def selected(shapes: dict[str, tuple]) -> dict[str, bool]:
  """Which paths `jaxl2`'s default mask selects: the leaves the peers must sum too.

  Decided on stand-ins of one element per axis: `jaxl2.by_role` reads names,
  module names and ndim, never values.
  """
  import jaxl2

  stand_ins = {path: np.zeros((1,) * len(shape), np.float32) for path, shape in shapes.items()}
  rows = jaxl2.describe(stand_ins).rows
  return {row.path: row.selected for row in rows}


def make_tree(
  shapes: dict[str, tuple], *, dtype: Any = jnp.float32, seed: int = 0, scale: float = 1.0
) -> dict:
  """A flat {path: array} tree; paths use '/' as jaxl2 would print them."""
  return _fill(shapes, dtype, seed, scale)


def n_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
