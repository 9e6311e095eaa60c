"""Flattening parameter pytrees into named leaves, with what owns each one.

Every API that reports or selects leaves by name goes through `flatten`, so a
path means the same thing in a mask, in `describe` and in an error message.
Besides the path, a leaf carries what a role-based mask needs and a bare
pytree flattening forgets: the class of the module that holds it (an Equinox
``LayerNorm``'s ``weight`` is a norm scale), its Flax NNX Variable type, and
whether it is a second reference to an NNX Variable already seen (tied
weights are one parameter).
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["Leaf", "flatten", "path_str"]


class Leaf(NamedTuple):
  """One leaf of a parameter pytree.

  Attributes:
    path: the parameter's name, keys joined with ``/`` (``params/Dense_0/kernel``).
    value: the array (or Python number, or an Equinox module's non-array field).
    variable: for Flax NNX, the `nnx.Variable` subclass that holds the array
      (``Param``, ``BatchStat``, ``RngKey``...); ``None`` for plain pytrees.
    owner: the class name of the innermost object (not a dict, list, tuple or
      NNX Variable) that holds the leaf: ``"Linear"``, ``"LayerNorm"``; ``None``
      in plain containers.
    shared_with: for a second (third...) reference to one NNX Variable, the
      path of its first reference; ``None`` otherwise.
    not_array: inside an Equinox module, a leaf that `equinox.is_array` would
      reject (an activation function, a string, a bool, a Python float): not
      a parameter.
  """

  path: str
  value: Any
  variable: type | None = None
  owner: str | None = None
  shared_with: str | None = None
  not_array: bool = False


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


def _loaded(module: str, name: str) -> type | None:
  # Only look for a framework the user already imported: jaxl2 must not pay
  # Flax's or Equinox's import time on plain pytrees.
  mod = sys.modules.get(module)
  return getattr(mod, name, None) if mod is not None else None


_PLAIN = (dict, list, tuple)
_ARRAYS = (jax.Array, np.ndarray, np.generic)


class _Walk:
  """One depth-first pass in `jax.tree_util` order, recording each leaf's context."""

  def __init__(self) -> None:
    self.variable_cls = _loaded("flax.nnx", "Variable")
    self.state_cls = _loaded("flax.nnx", "State")
    self.eqx_module = _loaded("equinox", "Module")
    self.seen: dict[int, tuple[Any, ...]] = {}  # a Variable's id -> its first key path
    self.leaves: list[Leaf] = []

  def _container(self, node: Any) -> bool:
    return isinstance(node, _PLAIN) or (
      self.state_cls is not None and isinstance(node, self.state_cls)
    )

  def visit(self, node: Any, keys: tuple[Any, ...], context: dict[str, Any]) -> None:
    if node is None:
      return
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    if len(children) == 1 and children[0][1] is node:  # a leaf
      self._emit(node, keys, context)
      return
    context = dict(context)
    if self.variable_cls is not None and isinstance(node, self.variable_cls):
      context["variable"] = type(node)
      context["variable_keys"] = keys
      context["first_keys"] = self.seen.setdefault(id(node), keys)
    elif not self._container(node):
      context["owner"] = type(node).__name__
      if self.eqx_module is not None and isinstance(node, self.eqx_module):
        context["equinox"] = True
    for key_path, child in children:
      self.visit(child, (*keys, *key_path), context)

  def _emit(self, value: Any, keys: tuple[Any, ...], context: dict[str, Any]) -> None:
    shared_with = None
    if "variable_keys" in context:
      # Inside a Variable: name the leaf by the Variable's path and the leaf's place
      # in its value (a Variable may hold a pytree), without the `.value` between.
      inner = keys[len(context["variable_keys"]) :]
      if inner and isinstance(inner[0], jax.tree_util.GetAttrKey) and inner[0].name == "value":
        inner = inner[1:]
      keys = (*context["variable_keys"], *inner)
      if context["first_keys"] != context["variable_keys"]:
        shared_with = path_str((*context["first_keys"], *inner))
    self.leaves.append(
      Leaf(
        path=path_str(keys),
        value=value,
        variable=context.get("variable"),
        owner=context.get("owner"),
        shared_with=shared_with,
        not_array=bool(context.get("equinox")) and not isinstance(value, _ARRAYS),
      )
    )


def flatten(params: Any) -> tuple[list[Leaf], jax.tree_util.PyTreeDef]:
  """Flattens ``params`` into named leaves, in `jax.tree_util` order.

  ``None`` entries are empty subtrees (JAX's convention) and yield no leaf.

  Returns:
    The leaves and the treedef that `jax.tree_util.tree_unflatten` takes to
    rebuild a pytree of the same structure.
  """
  walk = _Walk()
  walk.visit(params, (), {})
  treedef = jax.tree_util.tree_structure(params)
  if len(walk.leaves) != treedef.num_leaves:  # pragma: no cover - a pytree that flattens oddly
    raise TypeError(
      f"`params` flattened to {treedef.num_leaves} leaves but {len(walk.leaves)} were found "
      "walking it; jaxl2 needs a pytree whose nodes flatten consistently."
    )
  return walk.leaves, treedef
