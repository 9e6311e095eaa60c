"""The point the verify checks measure at: the params' floating leaves, made observable.

An L2 term is invisible where W = 0 and too coarse to measure in bf16/fp16,
and a Flax NNX module with tied weights holds one parameter under several
paths. The checks therefore vary a list of floating leaves (zero leaves
redrawn, half precision upcast, NNX modules as their ``nnx.Param`` state)
and rebuild the user's pytree around them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.core._dtypes import is_inexact
from jaxl2.core._hosts import check_devices, placed_like, spans_processes, to_host
from jaxl2.core._paths import flatten
from jaxl2.masks._masks import MaskSpec, Selection, resolve

__all__ = ["HALF_PRECISION", "Probe", "ProbeTree", "pick_grads", "probe_point", "standard_normal"]

HALF_PRECISION = frozenset({jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})


class ProbeTree(NamedTuple):
  """The params split into floating leaves (which the check varies) and the rest."""

  leaves: list[Any]
  treedef: jax.tree_util.PyTreeDef
  index: list[int]  # positions of the floating leaves in ``leaves``

  def rebuild(self, floats: Sequence[Any]) -> Any:
    """The params with their floating leaves replaced by ``floats``."""
    full = list(self.leaves)
    for i, value in zip(self.index, floats, strict=True):
      full[i] = value
    return jax.tree_util.tree_unflatten(self.treedef, full)

  def pick(self, tree: Any) -> list[Any]:
    """The floating leaves of ``tree``, a pytree with the structure of the params."""
    leaves = self.treedef.flatten_up_to(tree)
    return [leaves[i] for i in self.index]


def standard_normal(seed: tuple[int, int], like: Any) -> np.ndarray:
  """A fixed N(0, 1) draw shaped like ``like``, with NumPy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  dtype = np.dtype(like.dtype)
  if np.issubdtype(dtype, np.complexfloating):
    re, im = rng.standard_normal((2, *like.shape), dtype=np.finfo(dtype).dtype) / np.sqrt(2)
    return (re + 1j * im).astype(dtype)
  return rng.standard_normal(like.shape, dtype=dtype)


class Probe(NamedTuple):
  """Where a check measures, and what the intended mask gives each floating leaf there.

  Attributes:
    tree: the params (for an NNX module, its ``nnx.Param`` state) split at their floating leaves.
    floats: the floating leaves the check runs at, in ``tree.index`` order.
    selection: the intended mask resolved on the params, one entry per leaf of ``tree``.
    multipliers: the intended multiplier of each floating leaf.
    loss_fn: the user's ``loss_fn`` taking ``tree``'s params, or None when not given.
  """

  tree: ProbeTree
  floats: list[Any]
  selection: Selection
  multipliers: list[float]
  loss_fn: Callable[[Any, Any], Any] | None


def probe_point(
  params: Any, mask: MaskSpec, loss_fn: Callable[[Any, Any], Any] | None = None
) -> Probe:
  """The `Probe` of a check of ``params`` against the intended ``mask``.

  Raises:
    ValueError: ``mask`` selects nothing, or names a pattern that matches no leaf; leaves
      placed on different devices.
  """
  selection = resolve(params, mask)
  # Only floating leaves enter the checks' programs.
  floating = [(leaf.path, leaf.value) for leaf in selection.leaves if is_inexact(leaf.value)]
  check_devices(floating, "params")
  params, selection, loss_fn = _nnx_param_state(params, selection, loss_fn)
  tree, floats = _floating_leaves(params)
  multipliers = [selection.multipliers[i] for i in tree.index]
  return Probe(tree, floats, selection, multipliers, loss_fn)


@jax.jit
def _nonzero(values: list[jax.Array]) -> list[jax.Array]:
  return [jnp.any(x != 0) for x in values]


def _floating_leaves(params: Any) -> tuple[ProbeTree, list[Any]]:
  """The params' structure and the floating leaves the check runs at.

  bf16/fp16 leaves are upcast to float32. At W = 0 the gradient of any L2
  penalty is 0, so a freshly initialized (zero) bias would look unpenalized
  whatever the code does: leaves that are all zeros are replaced by a fixed
  N(0, 1) draw. Leaves that span several processes are upcast and tested on
  their devices, and a draw is placed as the leaf it replaces.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  index = [i for i, value in enumerate(leaves) if is_inexact(value)]
  floats = []
  for i in index:
    value = leaves[i]
    if spans_processes(value):
      floats.append(value.astype(jnp.float32) if value.dtype in HALF_PRECISION else value)
      continue
    value = jnp.asarray(value)
    if value.dtype in HALF_PRECISION:
      value = np.asarray(value).astype(np.float32)
    floats.append(value)
  spread = [k for k, w in enumerate(floats) if spans_processes(w)]
  nonzero = {}
  if spread:  # one program for all of them
    nonzero = dict(zip(spread, to_host(_nonzero([floats[k] for k in spread])), strict=True))
  for k, value in enumerate(floats):
    zero = not nonzero[k] if k in nonzero else not np.any(np.asarray(value))
    if value.size and zero:
      floats[k] = placed_like(standard_normal((0, k), value), value)
  return ProbeTree(leaves, treedef, index), floats


def _nnx_param_state(
  params: Any, selection: Selection, loss_fn: Callable[..., Any] | None
) -> tuple[Any, Selection, Any]:
  """A Flax NNX module as its ``nnx.Param`` state: one leaf per Variable (tied weights once).

  Differentiating a module as a plain pytree would give each reference to a
  shared Variable a leaf of its own, so a correct penalty on tied weights
  would look doubled. The check runs on ``nnx.split``'s Param state instead,
  with ``loss_fn`` called on the merged module; the selection is the one
  resolved on the module, read at each Variable's (first) path. Anything
  but an NNX module is returned as it is.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None or not isinstance(params, nnx.Module):
    return params, selection, loss_fn
  graphdef, state, rest = nnx.split(params, nnx.Param, ...)
  by_path = {
    leaf.path: (multiplier, reason)
    for leaf, multiplier, reason in zip(
      selection.leaves, selection.multipliers, selection.reasons, strict=True
    )
  }
  leaves, treedef = flatten(state)
  decided = [by_path[leaf.path] for leaf in leaves]
  state_selection = Selection(leaves, [d[0] for d in decided], treedef, [d[1] for d in decided])

  def on_state(param_state: Any, lam: Any) -> Any:
    # copy=True: fresh Variables at this trace level, so the model may update its state.
    return loss_fn(nnx.merge(graphdef, param_state, rest, copy=True), lam)

  return state, state_selection, (on_state if loss_fn is not None else None)


def pick_grads(probe: Probe, grads: Any) -> list[jax.Array]:
  """The user's ``grads`` at the probe's floating leaves, in the dtype the probe has there.

  Raises:
    ValueError: ``grads`` does not have the structure, or a leaf the shape, of the params,
      or is placed on other devices.
  """
  tree = probe.tree
  try:
    picked = tree.pick(grads)
  except (ValueError, TypeError) as err:
    raise ValueError(
      f"`grads` must have the structure of `params`; got {jax.tree_util.tree_structure(grads)} "
      f"for params {tree.treedef} ({err})."
    ) from None
  paths = [probe.selection.leaves[i].path for i in tree.index]
  params = [(f"`params` leaf at '{path}'", w) for path, w in zip(paths, probe.floats, strict=True)]
  check_devices(zip(paths, picked, strict=True), "grads", like=params)
  out = []
  for path, g, w in zip(paths, picked, probe.floats, strict=True):
    g = placed_like(np.asarray(g), w) if not isinstance(g, jax.Array) else g
    if np.shape(g) != w.shape:
      raise ValueError(
        f"`grads` leaf at '{path}' has shape {np.shape(g)}; its parameter has shape {w.shape}."
      )
    out.append(jnp.asarray(g).astype(w.dtype))  # the probe's dtype: float32 for bf16/fp16 leaves
  return out
