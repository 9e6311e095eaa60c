r"""One λ per group of leaves: a ``{pattern: λ_g}`` table where a λ goes.

    penalty = Σ_g (λ_g / 2m) · Σ_{j ∈ g} c_j · ‖W_j‖²

The mask still decides which leaves are penalized and with what multiplier
c_j; the table splits those selected leaves into groups by `re.fullmatch` of
each leaf's path (the path strings masks see, `jaxl2.core._paths`), the first
matching pattern winning, as in `jaxl2.by_regex`. Every selected leaf must
fall in a group (else it would have no λ) and every pattern must get a leaf
(else its λ would do nothing): both are errors naming the path or pattern.

Patterns are tried in the table's order. A dict passed *through* a JAX
transformation as an argument (`jax.jit`, `jax.vmap`, `jax.grad`) comes back
with its keys sorted, so where patterns overlap close over the table instead,
or keep the patterns disjoint. `jaxl2.make_train_step` and the λ tools try
the patterns in the order of the table `make_train_step` was given, whatever
order the state's copy has.

The penalty is composed from the one-λ pieces (`jaxl2.penalties._setup`): one
`selected_sum` per group, on the mask's selection restricted to the group
(static), each scaled by its traced λ_g.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2.core._checks import check_lam, check_m
from jaxl2.core._dtypes import accumulation_dtype, conj_upcast
from jaxl2.masks._masks import MaskSpec, Selection, resolve
from jaxl2.penalties._reduce import squares
from jaxl2.penalties._setup import grad_tree, l2_from_sq_norm, lam_over_m, selected_sum

__all__ = [
  "check_lam_or_groups",
  "group_index",
  "group_leaf_scales",
  "group_metrics",
  "group_penalty",
  "group_penalty_grad",
  "group_values",
  "is_grouped",
  "lam_floats",
  "lam_scales",
  "lam_text",
  "new_lam",
  "state_lam",
]


def is_grouped(lam: Any) -> bool:
  """Whether ``lam`` is a ``{pattern: λ_g}`` table (one λ per group) rather than one λ."""
  return isinstance(lam, Mapping)


def _check_groups(lam: Mapping[Any, Any], name: str) -> None:
  if not lam:
    raise ValueError(
      f"`{name}` is an empty {{pattern: λ}} table; give one λ per group of leaves, e.g. "
      f"`{name}={{'.*embedding': 1e-3, '.*': 0.1}}`, or one number for all."
    )
  for pattern, value in lam.items():
    if not isinstance(pattern, str):
      raise TypeError(
        f"`{name}` keys must be regex strings, matched (`re.fullmatch`) against leaf paths such "
        f"as 'Dense_0/kernel'; got the key {pattern!r}."
      )
    try:
      re.compile(pattern)
    except re.error as err:
      raise ValueError(f"`{name}` pattern {pattern!r} is not a valid regex: {err}.") from None
    check_lam(value, f"{name}[{pattern!r}]")


def check_lam_or_groups(lam: Any, name: str = "lam") -> None:
  """Checks one λ (`jaxl2.core._checks.check_lam`) or a table: string regex keys, each λ_g as λ."""
  if is_grouped(lam):
    _check_groups(lam, name)
  else:
    check_lam(lam, name)


def _examples(paths: list[str]) -> str:
  return ", ".join(repr(p) for p in paths[:4]) + (", ..." if len(paths) > 4 else "")


def group_index(selection: Selection, patterns: list[str], name: str = "lam") -> list[int]:
  """Each leaf's group: the first pattern its path fully matches; -1 where not selected.

  Raises:
    ValueError: a selected leaf that no pattern matches (naming its path); a
      pattern that gets no selected leaf (naming it, and the paths it matches
      that earlier patterns took, if any).
  """
  compiled = [re.compile(p) for p in patterns]
  index: list[int] = []
  for leaf, c in zip(selection.leaves, selection.multipliers, strict=True):
    group = (
      -1 if c == 0.0 else next((g for g, r in enumerate(compiled) if r.fullmatch(leaf.path)), None)
    )
    if group is None:
      raise ValueError(
        f"the penalized leaf at {leaf.path!r} matches no pattern of the `{name}` table "
        f"({_examples(patterns)}), so it has no λ. Add a pattern for it (a last '.*' takes the "
        "rest), or leave it out of the `mask`."
      )
    index.append(group)
  selected = [leaf.path for leaf, _ in selection.selected]
  for g, (pattern, regex) in enumerate(zip(patterns, compiled, strict=True)):
    if g in index:
      continue
    taken = [p for p in selected if regex.fullmatch(p)]
    why = (
      f"the penalized leaves it matches ({_examples(taken)}) are all taken by earlier patterns: "
      "the first matching pattern wins (and a table passed through `jax.jit`, `jax.vmap` or "
      "`jax.grad` as an argument comes back with its keys sorted). Reorder the patterns, or "
      "make them disjoint."
      if taken
      else f"it matches none of the penalized leaves ({_examples(selected)}), so its λ would "
      "do nothing (a typo drops that group). Patterns must match the whole path."
    )
    raise ValueError(f"`{name}` pattern {pattern!r} gets no leaf: {why}")
  return index


def _only(selection: Selection, index: list[int], group: int) -> Selection:
  """The selection restricted to one group (the others' multipliers set to 0)."""
  multipliers = [
    c if i == group else 0.0 for c, i in zip(selection.multipliers, index, strict=True)
  ]
  return selection._replace(multipliers=multipliers)


def _resolved(params: Any, lam: Mapping[str, Any], m: Any, mask: MaskSpec) -> tuple[Any, ...]:
  _check_groups(lam, "lam")
  check_m(m)
  selection = resolve(params, mask)
  index = group_index(selection, list(lam))
  acc = accumulation_dtype(leaf.value for leaf, _ in selection.selected)
  return selection, index, acc


def _sq_norms(params: Any, lam: Mapping[str, Any], m: Any, mask: MaskSpec) -> list[jax.Array]:
  """Σ_{j ∈ g} c_j‖W_j‖² for each group, in the table's order."""
  selection, index, acc = _resolved(params, lam, m, mask)
  return [selected_sum(_only(selection, index, g), squares, acc) for g in range(len(lam))]


def _total(terms: list[jax.Array]) -> jax.Array:
  return sum(terms[1:], terms[0])


def group_penalty(params: Any, lam: Mapping[str, Any], m: Any, mask: MaskSpec) -> jax.Array:
  """Σ_g (λ_g/2m)·Σ_{j ∈ g} c_j‖W_j‖²: `jaxl2.l2_penalty` with a table."""
  sums = _sq_norms(params, lam, m, mask)
  return _total([l2_from_sq_norm(s, lam[p], m) for p, s in zip(lam, sums, strict=True)])


def group_metrics(params: Any, lam: Mapping[str, Any], m: Any, mask: MaskSpec) -> dict[str, Any]:
  """``weight_sq_norm`` Σ c·‖W‖² and ``penalty`` Σ_g (λ_g/2m)·Σ_{j ∈ g} c_j‖W_j‖², one pass."""
  sums = _sq_norms(params, lam, m, mask)
  terms = [l2_from_sq_norm(s, lam[p], m) for p, s in zip(lam, sums, strict=True)]
  return {"weight_sq_norm": _total(sums), "penalty": _total(terms)}


def group_penalty_grad(params: Any, lam: Mapping[str, Any], m: Any, mask: MaskSpec) -> Any:
  """(λ_g/m)·c_j·W_j on each selected leaf j of group g, zeros elsewhere."""
  selection, index, acc = _resolved(params, lam, m, mask)
  scales = [lam_over_m(value, m, acc) for value in lam.values()]
  # `grad_tree`'s per-leaf argument (the anchor W₀ for L2-SP) carries each leaf's λ_g/m here;
  # its scale is 1, so the coefficient is c_j and the gradient (c_j·λ_g/m)·W_j.
  per_leaf = [scales[g] if g >= 0 else None for g in index]
  return grad_tree(
    selection, jnp.ones((), acc), acc, lambda w, s, coef: coef * s * conj_upcast(w, acc), per_leaf
  )


# ---- TrainState and TrainStep -------------------------------------------------------------


def lam_floats(lam: Any) -> float | dict[str, float]:
  """One λ as a float, or a table as {pattern: float} in its order (what a TrainStep keeps)."""
  if is_grouped(lam):
    return {p: float(v) for p, v in lam.items()}
  return float(lam)


def _same_kind(lam: Any, like: Any, name: str) -> None:
  """``lam`` is one λ where ``like`` is, or a table with the same patterns where ``like`` is."""
  if is_grouped(like) and not is_grouped(lam):
    raise TypeError(
      f"`{name}` must be a {{pattern: λ}} table with the patterns this TrainStep was built with "
      f"({_examples(list(like))}); got {lam!r}. The penalty's groups are fixed by "
      "`make_train_step`: build another step for one λ."
    )
  if is_grouped(lam) and not is_grouped(like):
    raise TypeError(
      f"`{name}` is a {{pattern: λ}} table, but this TrainStep was built with one λ: the "
      "penalty's form is fixed by `make_train_step`. Build the step with "
      "`jaxl2.make_train_step(..., lam={pattern: λ, ...})` for one λ per group."
    )
  if is_grouped(lam) and set(lam) != set(like):
    missing, extra = [p for p in like if p not in lam], [p for p in lam if p not in like]
    raise ValueError(
      f"`{name}` must have the patterns this TrainStep was built with ({_examples(list(like))}); "
      f"missing {missing}, unknown {extra}."
    )


def new_lam(lam: Any, like: Any, dtype: Any, name: str = "lam") -> Any:
  """λ as a state holds it: a fresh 0-d array of ``dtype``, or a table of them in ``like``'s
  order (``like``: the λ it replaces, one λ or a table with the same patterns)."""
  _same_kind(lam, like, name)
  check_lam_or_groups(lam, name)
  # Fresh buffers each time: the state is donated, and a shared λ array would be
  # deleted by the first step that consumed it.
  if is_grouped(lam):
    return {p: jnp.array(lam[p], dtype, copy=True) for p in like}
  return jnp.array(lam, dtype, copy=True)


def state_lam(train: Any, state: Any) -> float | dict[str, float]:
  """The state's λ as Python floats: a table in the order of ``train.lam``'s patterns."""
  if is_grouped(train.lam):
    return {p: float(jax.device_get(state.lam[p])) for p in train.lam}
  return float(jax.device_get(state.lam))


def lam_text(lam: Any, spec: str = "g") -> str:
  """λ for messages, numbers formatted with ``spec``: ``0.1``, or ``{'w1': 0.1, 'w2': 0.03}``."""
  if is_grouped(lam):
    return "{" + ", ".join(f"{p!r}: {float(v):{spec}}" for p, v in lam.items()) + "}"
  return f"{float(lam):{spec}}"


# ---- the λ tools --------------------------------------------------------------------------


def lam_scales(
  train: Any, params: Any, lam: float | dict[str, float], acc: Any
) -> tuple[jax.Array, float, tuple[int, ...]]:
  """(λ/m in ``acc``, one per group; the smallest λ_g/m as a float; each leaf's group).

  With one λ: its λ/m (0-d), that as a float, and no groups (``()``).
  """
  if not is_grouped(lam):
    return lam_over_m(lam, train.m, acc), lam_over_m(lam, train.m), ()
  ratios = [lam_over_m(value, train.m) for value in lam.values()]
  groups = tuple(group_index(resolve(params, train.mask), list(lam)))
  return jnp.asarray(ratios, acc), min(ratios), groups


def group_leaf_scales(scale: jax.Array, groups: tuple[int, ...], leaves: int) -> list[jax.Array]:
  """Each params leaf's λ/m: ``scale`` itself with one λ; its group's λ_g/m (0 outside groups)."""
  if not groups:
    return [scale] * leaves
  zero = jnp.zeros((), scale.dtype)
  return [scale[g] if g >= 0 else zero for g in groups]


def group_values(x: Any, y: Any, groups: tuple[int, ...]) -> jax.Array:
  """⟨x, y⟩ over all leaves (0-d) with one λ; one ⟨x, y⟩ per group, shape (G,), with groups."""
  parts = [
    jnp.vdot(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y), strict=True)
  ]
  if not groups:
    return _total(parts)
  count = max(groups) + 1
  return jnp.stack(
    [_total([p for p, g in zip(parts, groups, strict=True) if g == k]) for k in range(count)]
  )
