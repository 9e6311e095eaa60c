"""The mask builders: `Rule` and the masks jaxl2 builds for ``mask=`` arguments.

A `Rule` is a plain ``(path, leaf) -> bool | float`` callable that can also say
why it decided (`describe`'s "why" column) and check its name patterns against
the params (a typo in `by_regex` or `by_name` is an error, not an empty group).
`to_multiplier` turns any mask value into a multiplier on λ; the builders
validate with it, and so does the resolver, `jaxl2.masks._masks.resolve`.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.core._dtypes import is_inexact
from jaxl2.core._paths import Leaf
from jaxl2.masks._roles import Role, role_of, role_selected

__all__ = [
  "Rule",
  "all_floating",
  "by_name",
  "by_ndim",
  "by_regex",
  "by_role",
  "to_multiplier",
]


class Rule:
  """A mask from jaxl2's builders: ``(path, leaf) -> bool | float``, and why.

  `describe` shows the reason `explain` gives for each leaf, and the resolver
  calls `check` to reject name patterns that match nothing.
  """

  def __init__(
    self,
    name: str,
    explain: Callable[[Leaf], tuple[bool | float, str]],
    check: Callable[[Sequence[str]], None] | None = None,
  ) -> None:
    self._name = name
    self._explain = explain
    self._check = check

  def __call__(self, path: str, leaf: Any) -> bool | float:
    return self._explain(Leaf(path, leaf))[0]

  def explain(self, leaf: Leaf) -> tuple[bool | float, str]:
    """The value for ``leaf`` (bool or multiplier) and the rule that decided it."""
    return self._explain(leaf)

  def check(self, paths: Sequence[str]) -> None:
    """Raises ValueError if a pattern or name of this mask matches none of ``paths``."""
    if self._check is not None:
      self._check(paths)

  def __repr__(self) -> str:
    return self._name


def by_role(*, embeddings: bool = True, positional: bool = False) -> Rule:
  """Selects the weight matrices of layers by their role: the default mask.

  A leaf's role comes from its name, its module's name and class, and (Flax
  NNX) its Variable type, so a bias stacked to (L, D) by ``nn.scan`` or
  ``nnx.vmap`` is still a bias, and a Haiku norm scale of shape (1, 1, 1, C)
  is still a norm scale. Selected: Dense/Conv/attention kernels (``kernel``,
  ``w``, ``weight``, ``W1``) and token embeddings. Left out: biases, the
  scale and offset of every normalization layer, running statistics and
  caches, positional embeddings and class tokens, non-floating leaves. A name
  no rule knows falls back to ``ndim >= 2``. The full rule table is in the
  README ("What gets penalized").

  Args:
    embeddings: penalize token embedding tables (linen ``embedding``, Haiku
      ``embeddings``, ``wte``, an Equinox ``Embedding``'s ``weight``).
    positional: penalize positional embeddings and class tokens too
      (big_vision and timm leave them out, as does the default).

  Returns:
    A mask for any ``mask=`` argument.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> mask = jaxl2.by_role()
    >>> stacked = {"encoderblock": {"Dense_0": {"kernel": jnp.ones((2, 4, 4)),
    ...                                        "bias": jnp.ones((2, 4))},
    ...                             "LayerNorm_0": {"scale": jnp.ones((2, 4))}}}
    >>> [r.path for r in jaxl2.describe(stacked, mask=mask).rows if r.selected]
    ['encoderblock/Dense_0/kernel']
  """
  for name, value in (("embeddings", embeddings), ("positional", positional)):
    if not isinstance(value, bool):
      raise TypeError(f"`by_role` option `{name}` must be True or False; got {value!r}.")

  def explain(leaf: Leaf) -> tuple[bool, str]:
    role = role_of(leaf)
    return role_selected(role, embeddings=embeddings, positional=positional), role

  options = [f"embeddings={embeddings}"] if not embeddings else []
  options += [f"positional={positional}"] if positional else []
  return Rule(f"by_role({', '.join(options)})", explain)


def by_ndim(min_ndim: int = 2) -> Rule:
  """Selects floating (or complex) leaves with ``ndim >= min_ndim``: shape only.

  This was the default before `by_role`. It penalizes stacked biases and norm
  scales (``nn.scan``, ``nnx.vmap``) and Haiku's (1, 1, 1, C) norm scales; use
  it only when shape really is the rule you want.

  Example:
    >>> import jax.numpy as jnp
    >>> mask = by_ndim(2)
    >>> mask("dense/kernel", jnp.ones((3, 4))), mask("dense/bias", jnp.ones(4))
    (True, False)
  """
  if isinstance(min_ndim, bool) or not isinstance(min_ndim, numbers.Integral) or min_ndim < 0:
    raise ValueError(f"`min_ndim` must be an integer >= 0; got {min_ndim!r}.")

  def explain(leaf: Leaf) -> tuple[bool, str]:
    if not is_inexact(leaf.value):
      return False, Role.NOT_FLOATING
    if np.ndim(leaf.value) >= min_ndim:
      return True, f"ndim >= {min_ndim}"
    return False, f"ndim < {min_ndim}"

  return Rule(f"by_ndim({min_ndim})", explain)


def _explain_floating(leaf: Leaf) -> tuple[bool, str]:
  return (True, "floating") if is_inexact(leaf.value) else (False, Role.NOT_FLOATING)


all_floating = Rule("all_floating", _explain_floating)
all_floating.__doc__ = """Selects every floating (or complex) leaf, biases and norm scales included.

  Example:
    >>> all_floating("dense/bias", 1.5), all_floating("step", 3)
    (True, False)
  """


def _no_match_error(kind: str, what: str, candidates: Sequence[str], fix: str) -> ValueError:
  near = difflib.get_close_matches(what, sorted(set(candidates)), n=3, cutoff=0.5)
  hint = f" Near misses: {', '.join(map(repr, near))}." if near else ""
  examples = ", ".join(repr(c) for c in list(dict.fromkeys(candidates))[:4])
  return ValueError(
    f"`{kind}` {what!r} matches no leaf of these params, so it would silently select "
    f"nothing (a typo drops that group). The params have {examples}...{hint} {fix} "
    "Pass `strict=False` if it is meant to match only some models."
  )


def by_name(*names: str, strict: bool = True) -> Rule:
  """Selects leaves whose last path key is one of ``names``.

  Args:
    *names: key names, e.g. ``"kernel"``, ``"embedding"``.
    strict: a name that is the last key of no leaf of the params is an error
      (raised where the mask meets the params), so a typo cannot silently drop
      a group. ``False`` allows it.

  Example:
    >>> mask = by_name("kernel", "embedding")
    >>> mask("params/Dense_0/kernel", None), mask("params/Dense_0/bias", None)
    (True, False)
  """
  if not names or not all(isinstance(n, str) for n in names):
    raise TypeError(f"`by_name` takes one or more key names as strings; got {names!r}.")
  wanted = frozenset(names)

  def explain(leaf: Leaf) -> tuple[bool, str]:
    last = leaf.path.rsplit("/", 1)[-1]
    return (True, f"name {last!r}") if last in wanted else (False, "no name matched")

  def check(paths: Sequence[str]) -> None:
    keys = [p.rsplit("/", 1)[-1] for p in paths]
    for name in names:
      if name not in keys:
        raise _no_match_error("by_name", name, keys, "Names are compared with the last path key.")

  return Rule(f"by_name{tuple(names)!r}", explain, check if strict else None)


def by_regex(patterns: str | Mapping[str, float], *, strict: bool = True) -> Rule:
  """Selects leaves whose path matches a regex (`re.fullmatch`).

  With a mapping ``{pattern: multiplier}`` the first matching pattern (in
  insertion order) gives the leaf's multiplier on λ; unmatched leaves get 0.

  Args:
    patterns: a regex, or a ``{regex: multiplier}`` mapping.
    strict: a pattern that matches no leaf path of the params is an error
      (raised where the mask meets the params). A pattern whose paths are all
      taken by earlier patterns is fine. ``False`` allows unmatched patterns.

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
  compiled: list[tuple[str, re.Pattern[str], float]] = []
  for pattern, multiplier in table.items():
    if not isinstance(pattern, str):
      raise TypeError(f"`by_regex` patterns must be strings; got {pattern!r}.")
    try:
      regex = re.compile(pattern)
    except re.error as err:
      raise ValueError(f"`by_regex` pattern {pattern!r} is not a valid regex: {err}.") from None
    compiled.append((pattern, regex, to_multiplier(multiplier, f"by_regex pattern {pattern!r}")))
  single = isinstance(patterns, str)

  def explain(leaf: Leaf) -> tuple[bool | float, str]:
    for pattern, regex, multiplier in compiled:
      if regex.fullmatch(leaf.path):
        return (True if single else multiplier), f"pattern {pattern!r}"
    return (False if single else 0.0), "no pattern matched"

  def check(paths: Sequence[str]) -> None:
    for pattern, regex, _ in compiled:
      if not any(regex.fullmatch(p) for p in paths):
        raise _no_match_error("by_regex", pattern, paths, "Patterns must match the whole path.")

  return Rule(f"by_regex({patterns!r})", explain, check if strict else None)


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
