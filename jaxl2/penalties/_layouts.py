"""Layouts: which leaves may share a reduction kernel when there are several devices.

A kernel that sums or concatenates leaves laid out differently would move
weights between devices; a penalty must reduce each shard where it lives and
all-reduce scalars only. So `jaxl2.penalties._reduce` makes its one-device plan for each
layout on its own, and a leaf's layout is what is known of its sharding:

* A concrete array: its ``sharding``. Replicated (every device holds all of it,
  one device included): the same layout as every replicated leaf on the same
  mesh (or device set). Otherwise: its mesh and `PartitionSpec` (mesh axes of
  size 1 dropped, dimensions padded), so equal specs on one mesh are one layout.
* A traced leaf (under `jax.jit`, `jax.vmap`, ...): ``jax.typeof(x).sharding``.
  No mesh, or a mesh of one device: one device's program, one layout (the
  one-device plan). A mesh whose axes are all Explicit (or Manual, inside
  `jax.shard_map`): the spec is the layout, exactly as for concrete arrays.
  A mesh with Auto axes (the default of `jax.make_mesh`): JAX does not put an
  argument's sharding into its type, so the spec (``P(None, ...)``) says nothing;
  these leaves are one layout per mesh and spec, and *unknown*.

Only leaves known to be replicated or on one device may be concatenated
(*poolable*): flattening and concatenating sharded leaves gathers them, even
when they share a spec.

What that guarantees, checked in the optimized HLO by
``tests/sharded_checks.py``. Known layouts: every kernel reads leaves of one
layout, so it is elementwise on each shard, then reduced locally; the only
collective is an all-reduce of its scalar. Unknown layouts (Auto axes):
concatenation never happens, and a group of same-shape leaves stays local when
its leaves share one sharding, or when each is either replicated or in one
common sharding (XLA slices the replicated ones where they are). That covers
replicated (data-parallel) params, one `NamedSharding` for the whole tree, and
rules that shard by shape or role (FSDP, tensor-parallel kernels and
replicated biases). It does not cover 64 or more leaves of one small shape
(< 2**14 elements) split between two or more *different* non-replicated specs
under Auto axes: XLA would then reshard some of them. Explicit axes make every
layout known, and then the guarantee holds without that condition.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["layouts"]

_ONE_DEVICE = ("one device",)


def _spec_key(spec: P, ndim: int, mesh: Any) -> tuple[Any, ...] | None:
  """The spec as one tuple of axis names per dimension (size-1 axes dropped); None if unknown."""
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  key = []
  for entry in entries:
    if entry is P.UNCONSTRAINED:
      return None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    key.append(tuple(n for n in names if mesh.shape[n] > 1))
  return tuple(key)


def _layout(x: jax.Array) -> tuple[Hashable, bool]:
  """(layout key, whether leaves of that layout may be concatenated); see the module doc."""
  sharding = None if isinstance(x, jax.core.Tracer) else getattr(x, "sharding", None)
  if sharding is not None:  # a concrete array: its layout is known
    if isinstance(sharding, NamedSharding):
      spec = _spec_key(sharding.spec, x.ndim, sharding.mesh)
      if spec is not None and not any(spec):
        return ("replicated", sharding.mesh), True
      return ("sharded", sharding.mesh, spec if spec is not None else sharding), False
    if sharding.is_fully_replicated:
      return ("replicated", frozenset(sharding.device_set)), True
    return ("sharded", sharding), False
  sharding = jax.typeof(x).sharding
  mesh = sharding.mesh
  if mesh.empty or mesh.size == 1:
    return _ONE_DEVICE, True
  spec = _spec_key(sharding.spec, x.ndim, mesh)
  unknown = spec is None or any(
    t == AxisType.Auto and mesh.shape[n] > 1
    for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
  )
  if unknown:
    return ("unknown", mesh, spec), False
  if not any(spec):
    return ("replicated", mesh), True
  return ("sharded", mesh, spec), False


def layouts(xs: Sequence[jax.Array]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
  """Each leaf's layout numbered in order of appearance, and each layout's poolability."""
  if jax.device_count() == 1:  # one device: nothing can move; the one-device plan
    return (0,) * len(xs), (True,)
  numbers: dict[Hashable, int] = {}
  poolable: list[bool] = []
  numbered = []
  for x in xs:
    key, can_pool = _layout(x)
    if key not in numbers:
      numbers[key] = len(poolable)
      poolable.append(can_pool)
    numbered.append(numbers[key])
  return tuple(numbered), tuple(poolable)
