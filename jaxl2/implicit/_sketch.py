"""Random ±1 vectors for sketches and trace estimates, cheap to compile.

The Nyström preconditioner's test vectors and Hutchinson's probes need only be
random signs, independent across entries and vectors. `jax.random` draws them
with threefry, whose code costs XLA on CPU about a second to compile per
call site and shape; here each sign is the top bit of a 32-bit integer hash
(``lowbias32``, Wellons 2018) of (seed, vector, leaf, entry): a handful of
integer operations, elementwise, so sharded params give sharded signs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["signs_like"]


def _hash(x: jax.Array) -> jax.Array:
  """lowbias32: a well-mixed bijection of uint32."""
  x ^= x >> 16
  x *= np.uint32(0x7FEB352D)
  x ^= x >> 15
  x *= np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def signs_like(like: Any, count: int, seed: jax.Array) -> Any:
  """``count`` vectors of random ±1 shaped like ``like``: each leaf gets a leading axis.

  ``seed`` is a uint32 scalar (traced or not); the dtype is each leaf's.
  """
  leaves, treedef = jax.tree_util.tree_flatten(like)
  out = []
  for index, leaf in enumerate(leaves):
    shape = (count, *leaf.shape)
    entry = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, 0, -1):  # the entry's flat index within its vector
      entry += jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
      stride = stride * shape[axis] % (1 << 32)
    vector = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
    mixed = _hash(_hash(_hash(seed.astype(jnp.uint32) ^ np.uint32(index)) + vector) + entry)
    out.append(jnp.where(mixed >> 31 == 1, 1.0, -1.0).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)
