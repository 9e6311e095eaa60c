"""Which leaves are weights, and with what multiplier on λ.

A mask is one of:

* ``None``: the default, `by_role` (the weight matrices of layers, decided by
  each leaf's name, module and type; see `jaxl2.by_role`);
* a callable ``(path: str, leaf) -> bool | float`` such as `by_name`;
* a pytree of bools/floats with the structure of ``params`` or a prefix of it
  (optax's convention); a callable ``params -> such pytree`` is accepted too.

A float is a multiplier on λ for that leaf; ``True`` is 1 and ``False`` is 0.
Whatever the mask, some leaves are never parameters: the non-array fields of
Equinox modules, Flax NNX Variables that are not ``nnx.Param``, and second
references to one NNX Variable (tied weights count once, at their first path).
`resolve` is the one place that turns any of these into per-leaf multipliers
and reasons; every API that takes ``mask=`` goes through it. The builders
(`by_role`, `by_regex`, ...) are in `jaxl2.masks._mask_builders`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax

from jaxl2.core._dtypes import ARRAY_TYPES, is_inexact
from jaxl2.core._paths import Leaf, flatten
from jaxl2.masks._mask_builders import Rule, by_role, to_multiplier

__all__ = ["MaskSpec", "Selection", "resolve"]

LeafMask: TypeAlias = Callable[[str, Any], "bool | float"]
MaskSpec: TypeAlias = "LeafMask | Callable[[Any], Any] | Any | None"


class Selection(NamedTuple):
  """The resolved mask: every leaf with its multiplier (0.0 = not selected) and why.

  Attributes:
    leaves: every leaf of the params, in pytree order.
    multipliers: each leaf's multiplier on λ; 0.0 for a leaf not penalized.
    treedef: the params' structure, to rebuild a params-shaped tree.
    reasons: for each leaf, the rule that decided ("kernel", "bias",
      "not an nnx.Param (BatchStat)", "pattern '.*/kernel'", "mask"...).
  """

  leaves: list[Leaf]
  multipliers: list[float]
  treedef: jax.tree_util.PyTreeDef
  reasons: list[str]

  @property
  def selected(self) -> list[tuple[Leaf, float]]:
    """The selected leaves with their multipliers, in pytree order."""
    return [(leaf, w) for leaf, w in zip(self.leaves, self.multipliers, strict=True) if w != 0.0]


def _check_leaf_types(leaves: list[Leaf]) -> None:
  for leaf in leaves:
    if not leaf.not_array and not isinstance(leaf.value, ARRAY_TYPES):
      raise TypeError(
        f"leaf at {leaf.path!r} is a {type(leaf.value).__name__} ({leaf.value!r:.60}); "
        "parameter pytrees may hold only arrays and numbers. Remove it, or store it "
        "outside the params. (Equinox modules may hold functions and strings: their "
        "non-array fields are skipped.)"
      )


def _takes_path_and_leaf(fn: Callable[..., Any]) -> bool:
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  positional = [
    p
    for p in signature.parameters.values()
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
  ]
  has_varargs = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
  return len(positional) >= 2 or has_varargs


def _never_a_parameter(leaf: Leaf) -> str | None:
  """Why a leaf can never be penalized, whatever the mask; None if it can be."""
  if leaf.not_array:
    return "not an array (Equinox field)"
  if leaf.variable is not None:
    from flax import nnx  # Only reached when the params hold NNX variables.

    if not issubclass(leaf.variable, nnx.Param):
      return f"not an nnx.Param ({leaf.variable.__name__})"
  return None


_DEFAULT = by_role()


def _values_from_tree(mask_tree: Any, params: Any) -> list[Any]:
  """The mask pytree's value for each leaf of ``params`` (a prefix value repeated)."""
  mask_leaves, mask_def = jax.tree_util.tree_flatten(mask_tree)
  try:
    subtrees = mask_def.flatten_up_to(params)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "`mask` pytree must have the structure of `params` or of a prefix of it.\n"
      f"  mask:   {mask_def}\n  params: {jax.tree_util.tree_structure(params)}\n"
      f"  ({err})"
    ) from None
  values: list[Any] = []
  for value, subtree in zip(mask_leaves, subtrees, strict=True):
    values.extend([value] * jax.tree_util.tree_structure(subtree).num_leaves)
  return values


def _raw_decisions(params: Any, leaves: list[Leaf], mask: MaskSpec) -> list[tuple[Any, str]]:
  """(mask value, reason) per leaf, before the rules that hold for every mask."""
  rule = _DEFAULT if mask is None else mask
  if isinstance(rule, Rule):
    return [rule.explain(leaf) for leaf in leaves]
  if callable(rule) and _takes_path_and_leaf(rule):
    # A user's callable expects arrays: an Equinox module's functions and strings never reach it.
    return [
      (False, "") if leaf.not_array else (rule(leaf.path, leaf.value), "mask") for leaf in leaves
    ]
  mask_tree = rule(params) if callable(rule) else rule
  return [(value, "mask") for value in _values_from_tree(mask_tree, params)]


def _nothing_selected(leaves: list[Leaf]) -> ValueError:
  return ValueError(
    f"`mask` selected no parameters out of {len(leaves)} leaves, so the penalty would be "
    "a silent 0. The default (`jaxl2.by_role()`) keeps the weight matrices of layers "
    "(kernels, token embeddings), not biases, norm scales or state; pass "
    f"`mask=jaxl2.all_floating` or a mask that matches your paths, which look like "
    f"{', '.join(repr(leaf.path) for leaf in leaves[:3])}. "
    "Check what is selected with `jaxl2.describe(params, mask=...)`."
  )


def resolve(params: Any, mask: MaskSpec = None, *, allow_empty: bool = False) -> Selection:
  """Resolves ``mask`` against ``params`` into per-leaf multipliers and reasons.

  Runs in Python on the pytree structure (shapes, dtypes, paths), so it works
  on tracers and costs nothing at run time under `jax.jit`. Whatever the
  mask, Equinox non-array fields and non-``nnx.Param`` Variables get 0, and a
  Variable referenced at several paths is counted once, at its first path,
  with the largest multiplier any of its paths gets.

  Args:
    params: any parameter pytree (Flax linen/NNX, Haiku, Equinox, dicts).
    mask: a mask as the module docstring lists; ``None`` is `by_role`.
    allow_empty: a mask that selects nothing is no error (`describe` shows it).

  Returns:
    Every leaf with its multiplier and the reason that decided it.

  Raises:
    TypeError: a leaf that is not an array or number (outside Equinox
      modules); a mask value that is not a bool or number; a selected
      integer, boolean or key leaf.
    ValueError: a mask pytree that does not match ``params``; a negative or
      non-finite multiplier; a `by_regex`/`by_name` pattern that matches no
      path (when strict); a mask that selects nothing from non-empty params
      (unless ``allow_empty``).
  """
  leaves, treedef = flatten(params)
  _check_leaf_types(leaves)
  if isinstance(mask, Rule):
    mask.check([leaf.path for leaf in leaves])
  multipliers: list[float] = []
  reasons: list[str] = []
  first_index: dict[str, int] = {}
  for i, (leaf, (value, reason)) in enumerate(
    zip(leaves, _raw_decisions(params, leaves, mask), strict=True)
  ):
    never = _never_a_parameter(leaf)
    multiplier = 0.0 if never else to_multiplier(value, repr(leaf.path))
    if not never and multiplier != 0.0 and not is_inexact(leaf.value):
      dtype = getattr(leaf.value, "dtype", type(leaf.value).__name__)
      raise TypeError(
        f"leaf at {leaf.path!r} has dtype {dtype}; only floating or complex leaves can be "
        "penalized. Leave it out of the `mask`."
      )
    if leaf.shared_with is not None and leaf.shared_with in first_index:
      j = first_index[leaf.shared_with]
      multipliers[j] = max(multipliers[j], multiplier)
      multiplier, never = 0.0, f"same Variable as {leaf.shared_with!r}"
    elif leaf.variable is not None:
      first_index[leaf.path] = i
    multipliers.append(multiplier)
    reasons.append(never or reason)

  if leaves and not allow_empty and not any(multipliers):
    raise _nothing_selected(leaves)
  return Selection(leaves, multipliers, treedef, reasons)
