"""Flattening parameter pytrees into named leaves.

Every API that reports or selects leaves by name goes through `flatten`, so a
path means the same thing in a mask, in `describe` and in an error message.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax

__all__ = ["Leaf", "flatten", "path_str"]


class Leaf(NamedTuple):
  """One leaf of a parameter pytree.

  Attributes:
    path: the parameter's name, keys joined with ``/`` (``params/Dense_0/kernel``).
    value: the array (or Python number) stored there.
    variable: for Flax NNX, the `nnx.Variable` subclass that holds the array
      (``Param``, ``BatchStat``, ``RngKey``...); ``None`` for plain pytrees.
  """

  path: str
  value: Any
  variable: type | None


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(key_path: tuple[Any, ...]) -> str:
  """Turns a JAX key path into ``a/b/0/kernel``.

  A trailing ``.value`` attribute is dropped: Flax NNX stores each array in a
  Variable whose key path ends there, and the path should name the parameter,
  not its container.

  Example:
    >>> import jax
    >>> (kp, _), = jax.tree_util.tree_flatten_with_path({"layers": [{"w": 1.0}]})[0]
    >>> path_str(kp)
    'layers/0/w'
  """
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys.pop()
  return "/".join(_key_str(k) for k in keys)


def _nnx_variable_class() -> type | None:
  # Only look for Flax if the user already imported it: jaxl2 must not pay
  # Flax's import time on plain pytrees.
  nnx = sys.modules.get("flax.nnx")
  return getattr(nnx, "Variable", None) if nnx is not None else None


def flatten(params: Any) -> tuple[list[Leaf], jax.tree_util.PyTreeDef]:
  """Flattens ``params`` into named leaves, in `jax.tree_util` order.

  ``None`` entries are empty subtrees (JAX's convention) and yield no leaf.

  Returns:
    The leaves and the treedef that `jax.tree_util.tree_unflatten` takes to
    rebuild a pytree of the same structure.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  variables = _variable_types(params, len(with_path))
  leaves = [
    Leaf(path_str(kp), value, var) for (kp, value), var in zip(with_path, variables, strict=True)
  ]
  return leaves, treedef


def _variable_types(params: Any, n_leaves: int) -> list[type | None]:
  variable_cls = _nnx_variable_class()
  if variable_cls is None:
    return [None] * n_leaves
  outer = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, variable_cls))
  types: list[type | None] = []
  for node in outer:
    if isinstance(node, variable_cls):
      types.extend([type(node)] * len(jax.tree_util.tree_leaves(node)))
    else:
      types.append(None)
  return types
