"""Which leaves are weights, and with what multiplier on λ.

A mask is one of:

* ``None``: the default, `by_ndim` (floating leaves with ``ndim >= 2``),
  restricted to trainable parameters when given Flax NNX variables;
* a callable ``(path: str, leaf) -> bool | float`` such as `by_name`;
* a pytree of bools/floats with the structure of ``params`` or a prefix of it
  (optax's convention); a callable ``params -> such pytree`` is accepted too.

A float is a multiplier on λ for that leaf; ``True`` is 1 and ``False`` is 0.
`resolve` is the one place that turns any of these into per-leaf multipliers;
every API that takes ``mask=`` goes through it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2._paths import Leaf, flatten

__all__ = [
  "LeafMask",
  "MaskSpec",
  "Selection",
  "all_floating",
  "by_name",
  "by_ndim",
  "by_regex",
  "resolve",
]

LeafMask: TypeAlias = Callable[[str, Any], "bool | float"]
MaskSpec: TypeAlias = "LeafMask | Callable[[Any], Any] | Any | None"

_HOW_TO_CHECK = "Check what is selected with `jaxl2.describe(params, mask=...)`."


def is_inexact(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    return isinstance(leaf, (float, complex)) and not isinstance(leaf, bool)
  return jnp.issubdtype(dtype, jnp.inexact)


def by_ndim(min_ndim: int = 2) -> LeafMask:
  """Selects floating (or complex) leaves with ``ndim >= min_ndim``.

  The default mask is ``by_ndim(2)``: Dense and Conv kernels and embeddings
  are penalized; biases, norm scales and scalars are not.

  Example:
    >>> import jax.numpy as jnp
    >>> mask = by_ndim(2)
    >>> mask("dense/kernel", jnp.ones((3, 4))), mask("dense/bias", jnp.ones(4))
    (True, False)
  """
  if isinstance(min_ndim, bool) or not isinstance(min_ndim, numbers.Integral) or min_ndim < 0:
    raise ValueError(f"`min_ndim` must be an integer >= 0; got {min_ndim!r}.")

  def mask(path: str, leaf: Any) -> bool:
    del path
    return is_inexact(leaf) and np.ndim(leaf) >= min_ndim

  mask.__qualname__ = f"by_ndim({min_ndim})"
  return mask


def all_floating(path: str, leaf: Any) -> bool:
  """Selects every floating (or complex) leaf, biases and norm scales included.

  Example:
    >>> all_floating("dense/bias", 1.5), all_floating("step", 3)
    (True, False)
  """
  del path
  return is_inexact(leaf)


def by_name(*names: str) -> LeafMask:
  """Selects leaves whose last path key is one of ``names``.

  Example:
    >>> mask = by_name("kernel", "embedding")
    >>> mask("params/Dense_0/kernel", None), mask("params/Dense_0/bias", None)
    (True, False)
  """
  if not names or not all(isinstance(n, str) for n in names):
    raise TypeError(f"`by_name` takes one or more key names as strings; got {names!r}.")
  wanted = frozenset(names)

  def mask(path: str, leaf: Any) -> bool:
    del leaf
    return path.rsplit("/", 1)[-1] in wanted

  mask.__qualname__ = f"by_name{tuple(names)!r}"
  return mask


def by_regex(patterns: str | Mapping[str, float]) -> LeafMask:
  """Selects leaves whose path matches a regex (`re.fullmatch`).

  With a mapping ``{pattern: multiplier}`` the first matching pattern (in
  insertion order) gives the leaf's multiplier on λ; unmatched leaves get 0.

  Example:
    >>> mask = by_regex({r".*/embedding": 0.1, r".*/kernel": 1.0})
    >>> mask("embed/embedding", None), mask("Dense_0/kernel", None), mask("Dense_0/bias", None)
    (0.1, 1.0, 0.0)
  """
  if isinstance(patterns, str):
    table = {patterns: 1.0}
  elif isinstance(patterns, Mapping):
    table = dict(patterns)
  else:
    raise TypeError(
      f"`by_regex` takes a pattern string or a {{pattern: multiplier}} mapping; got {patterns!r}."
    )
  compiled: list[tuple[re.Pattern[str], float]] = []
  for pattern, multiplier in table.items():
    if not isinstance(pattern, str):
      raise TypeError(f"`by_regex` patterns must be strings; got {pattern!r}.")
    try:
      regex = re.compile(pattern)
    except re.error as err:
      raise ValueError(f"`by_regex` pattern {pattern!r} is not a valid regex: {err}.") from None
    compiled.append((regex, to_multiplier(multiplier, f"by_regex pattern {pattern!r}")))
  single = isinstance(patterns, str)

  def mask(path: str, leaf: Any) -> bool | float:
    del leaf
    for regex, multiplier in compiled:
      if regex.fullmatch(path):
        return True if single else multiplier
    return False if single else 0.0

  mask.__qualname__ = f"by_regex({patterns!r})"
  return mask


def to_multiplier(value: Any, where: str) -> float:
  """Turns a mask value (bool or non-negative number) into a float multiplier."""
  if isinstance(value, (bool, np.bool_)):
    return 1.0 if value else 0.0
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"mask value for {where} is a traced array; masks decide the structure of the "
      "computation and must be concrete. Build the mask outside `jax.jit`."
    )
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
    if jnp.issubdtype(value.dtype, jnp.bool_):
      return 1.0 if bool(value) else 0.0
    if jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer):
      value = float(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    if not math.isfinite(value) or value < 0:
      raise ValueError(
        f"mask multiplier for {where} must be a finite number >= 0; got {value!r}. "
        "Use 0 or False to leave a leaf out."
      )
    return value
  raise TypeError(
    f"mask value for {where} must be a bool or a number (a multiplier on `lam`); "
    f"got {value!r} ({type(value).__name__})."
  )


class Selection(NamedTuple):
  """The resolved mask: every leaf with its multiplier (0.0 = not selected)."""

  leaves: list[Leaf]
  multipliers: list[float]
  treedef: jax.tree_util.PyTreeDef

  @property
  def selected(self) -> list[tuple[Leaf, float]]:
    """The selected leaves with their multipliers, in pytree order."""
    return [(leaf, w) for leaf, w in zip(self.leaves, self.multipliers, strict=True) if w != 0.0]


# What a parameter leaf may be; anything else is a TypeError naming its path.
ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, numbers.Number)


def _check_leaf_types(leaves: list[Leaf]) -> None:
  for leaf in leaves:
    if not isinstance(leaf.value, ARRAY_TYPES):
      raise TypeError(
        f"leaf at {leaf.path!r} is a {type(leaf.value).__name__} ({leaf.value!r:.60}); "
        "parameter pytrees may hold only arrays and numbers. Remove it, or store it "
        "outside the params."
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


def _is_trainable(leaf: Leaf) -> bool:
  if leaf.variable is None:
    return True
  from flax import nnx  # Only reached when the params hold NNX variables.

  return issubclass(leaf.variable, nnx.Param)


_DEFAULT = by_ndim(2)


def _multipliers_from_tree(mask_tree: Any, params: Any, n_leaves: int) -> list[float]:
  mask_leaves, mask_def = jax.tree_util.tree_flatten(mask_tree)
  try:
    subtrees = mask_def.flatten_up_to(params)
  except (ValueError, TypeError) as err:
    raise ValueError(
      "`mask` pytree must have the structure of `params` or of a prefix of it.\n"
      f"  mask:   {mask_def}\n  params: {jax.tree_util.tree_structure(params)}\n"
      f"  ({err})"
    ) from None
  multipliers: list[float] = []
  for value, subtree in zip(mask_leaves, subtrees, strict=True):
    count = jax.tree_util.tree_structure(subtree).num_leaves
    multipliers.extend([to_multiplier(value, "a mask pytree leaf")] * count)
  if len(multipliers) != n_leaves:  # pragma: no cover - guarded by flatten_up_to
    raise ValueError("`mask` pytree does not line up with `params`.")
  return multipliers


def resolve(params: Any, mask: MaskSpec = None, *, allow_empty: bool = False) -> Selection:
  """Resolves ``mask`` against ``params`` into per-leaf multipliers.

  Runs in Python on the pytree structure (shapes, dtypes, paths), so it works
  on tracers and costs nothing at run time under `jax.jit`.

  Raises:
    TypeError: a leaf that is not an array or number; a mask value that is
      not a bool or number; a selected integer, boolean or key leaf.
    ValueError: a mask pytree that does not match ``params``; a negative or
      non-finite multiplier; a mask that selects nothing from non-empty params
      (unless ``allow_empty``).
  """
  leaves, treedef = flatten(params)
  _check_leaf_types(leaves)
  if mask is None:
    multipliers = [
      1.0 if _DEFAULT(leaf.path, leaf.value) and _is_trainable(leaf) else 0.0 for leaf in leaves
    ]
  elif callable(mask) and _takes_path_and_leaf(mask):
    multipliers = [to_multiplier(mask(leaf.path, leaf.value), repr(leaf.path)) for leaf in leaves]
  else:
    mask_tree = mask(params) if callable(mask) else mask
    multipliers = _multipliers_from_tree(mask_tree, params, len(leaves))

  for leaf, multiplier in zip(leaves, multipliers, strict=True):
    if multiplier != 0.0 and not is_inexact(leaf.value):
      dtype = getattr(leaf.value, "dtype", type(leaf.value).__name__)
      raise TypeError(
        f"leaf at {leaf.path!r} has dtype {dtype}; only floating or complex leaves can be "
        "penalized. Leave it out of the `mask`."
      )
  if leaves and not allow_empty and not any(multipliers):
    raise ValueError(
      f"`mask` selected no parameters out of {len(leaves)} leaves, so the penalty would be "
      "a silent 0. The default keeps floating leaves with ndim >= 2; pass "
      f"`mask=jaxl2.all_floating` or a mask that matches your paths, which look like "
      f"{', '.join(repr(leaf.path) for leaf in leaves[:3])}. {_HOW_TO_CHECK}"
    )
  return Selection(leaves, multipliers, treedef)
