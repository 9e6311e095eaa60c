"""Where a training state and its batches live: shardings, placement, the params' mesh.

Sharded training is JAX's own SPMD: the params (and batch) are placed on a
`jax.sharding.Mesh` and the compiled step follows them. This module makes the
placement survive the step: ``init`` copies the params onto their shardings,
replicates the state's scalars over the params' mesh, and spells every
leaf's sharding as compiled programs spell their outputs, so that a step
returns each leaf exactly as it came in.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from jaxl2.core._hosts import from_host
from jaxl2.core._paths import path_str

__all__ = ["ShardingSpec", "check_sharding_spec", "place", "place_like", "settle"]

# A `jax.sharding.Sharding`, or a pytree of them that is a prefix of the tree it places.
ShardingSpec = Any


def check_sharding_spec(spec: ShardingSpec, name: str, what: str) -> None:
  """``spec`` is None, a `Sharding`, or a non-empty pytree of them."""
  if spec is None:
    return
  leaves = jax.tree_util.tree_leaves(spec)
  bad = [x for x in leaves if not isinstance(x, Sharding)]
  if not leaves or bad:
    got = repr(bad[0]) if bad else f"{spec!r}, which holds no sharding"
    raise TypeError(
      f"`{name}` must be a jax.sharding.Sharding, or a pytree of them that is a prefix of the "
      f"{what}; got {got}. Wrap a PartitionSpec with its mesh: "
      "`NamedSharding(mesh, P('data'))`."
    )


def _broadcast(spec: ShardingSpec, tree: Any, name: str, what: str) -> list[Sharding]:
  """One sharding per leaf of ``tree`` from the prefix pytree ``spec``."""
  try:
    full = jax.tree_util.tree_map(
      lambda s, sub: jax.tree_util.tree_map(lambda _: s, sub), spec, tree
    )
  except ValueError as err:
    raise ValueError(
      f"`{name}` must be a Sharding or a pytree prefix of the {what}; its structure "
      f"{jax.tree_util.tree_structure(spec)} does not match that of the {what}, "
      f"{jax.tree_util.tree_structure(tree)}."
    ) from err
  return jax.tree_util.tree_leaves(full)


def _place_leaves(tree: Any, spec: ShardingSpec, name: str, what: str) -> Any:
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for (key_path, leaf), sharding in zip(with_path, _broadcast(spec, tree, name, what), strict=True):
    try:
      out.append(jax.device_put(leaf, sharding))
    except ValueError as err:
      raise ValueError(
        f"`{name}` does not fit the {what} leaf at '{path_str(key_path)}' of shape "
        f"{tuple(getattr(leaf, 'shape', ()))}: the spec may name at most as many dimensions "
        f"as the leaf has, and each sharded dimension must be a multiple of the number of "
        f"devices along its mesh axes; got {sharding}. JAX says: {err}"
      ) from err
  return jax.tree_util.tree_unflatten(treedef, out)


def place(tree: Any, spec: ShardingSpec, name: str, what: str) -> Any:
  """``tree`` put onto the shardings in ``spec`` (a no-op for leaves already there).

  Raises:
    ValueError: ``spec`` does not match the tree, or does not fit a leaf
      (the error names the leaf's path).
  """
  try:
    return jax.device_put(tree, spec)
  except (ValueError, TypeError):
    return _place_leaves(tree, spec, name, what)  # raises, naming the leaf


def _mesh_of(tree: Any) -> Mesh | None:
  """The mesh of the first leaf of ``tree`` that is spread over several devices."""
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
      return sharding.mesh
  return None


@jax.jit
def _copied(tree: Any) -> Any:
  # Compiled, for two reasons. The copy: the state is donated to each step, and the caller's
  # arrays must stay valid (an eager `device_put` may reuse the caller's buffer for one shard
  # of a replicated leaf). The spelling: a compiled program spells the sharding of an output
  # that differs from its first input's in JAX's canonical form (P('data', None) comes back
  # as P('data',)); a state spelled so comes back from every step as it went in.
  return jax.tree_util.tree_map(lambda x: x.copy(), tree)


def settle(state: Any, params: Any) -> Any:
  """A copy of ``state`` that steps return as they receive it, leaf for leaf.

  When ``params`` are spread over a mesh, the array leaves not already on its
  devices (step, λ, optimizer counters, a PRNG key) are replicated there:
  left on one device they would come back from the first step replicated,
  and the second step would compile again.
  """
  mesh = _mesh_of(params)
  if mesh is not None:
    replicated = NamedSharding(mesh, P())
    devices = set(mesh.devices.flat)
    state = jax.tree_util.tree_map(
      lambda x: (
        from_host(x, replicated)
        if isinstance(x, jax.Array) and x.sharding.device_set != devices
        else x
      ),
      state,
    )
  return _copied(state)


def place_like(value: jax.Array, old: Any) -> jax.Array:
  """``value`` placed as the array ``old`` (replicated over a mesh, or left where it is)."""
  sharding = getattr(old, "sharding", None)
  if sharding is not None and len(sharding.device_set) > 1:
    return from_host(value, sharding)
  return value
