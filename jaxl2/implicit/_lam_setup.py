"""The checked setup shared by the λ tools: the model, its data, the curvature and the solve.

`jaxl2.lam_hypergradient`, `jaxl2.effective_params` and `jaxl2.tune_lam` take a
model the way `jaxl2.make_train_step` does (its `TrainStep` and a `TrainState`
at W*) and the data as arguments. `prepare` checks all of it where the values
are concrete and splits it into what shapes the compiled program (`Options`,
its static argument) and what it computes with (`Numbers`); `inside` rebuilds,
inside the program, the pieces every tool needs: W in the accumulation dtype,
the training loss and curvature over the data, and the Nyström preconditioner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.core._checks import check_callable, check_count
from jaxl2.core._dtypes import accumulation_dtype
from jaxl2.core._hosts import (
  HOST_DATA_FIX,
  check_devices,
  check_same_everywhere,
  raise_together,
  tree_spans_processes,
)
from jaxl2.core._paths import path_str
from jaxl2.implicit._batches import check_batch_size, n_examples
from jaxl2.implicit._curvature import (
  Evaluation,
  GaussNewton,
  check_curvature,
  curvature_product,
  evaluation,
)
from jaxl2.implicit._implicit import leaf_multipliers, solve_tol
from jaxl2.implicit._nystrom import nystrom
from jaxl2.penalties._lam_groups import group_leaf_scales, lam_scales, state_lam
from jaxl2.penalties._setup import lam_over_m
from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep

__all__ = [
  "AUTO_SIZE",
  "RANK",
  "Inside",
  "Numbers",
  "Options",
  "check_hosts",
  "check_loss_fn",
  "check_model",
  "inside",
  "prepare",
]

Tree = Any


class Options(NamedTuple):
  """What shapes a λ tool's compiled program (hashable: its static argument)."""

  train: TrainStep
  curvature: str | GaussNewton
  batch_size: int
  maxiter: int
  rank: int  # of the Nyström preconditioner; 0: none
  groups: tuple[int, ...] = ()  # one λ per group: each params leaf's group (-1: none)


class Numbers(NamedTuple):
  """What a λ tool's compiled program computes with (arrays)."""

  c: list[jax.Array]  # the mask's multiplier of each params leaf
  scale: jax.Array  # λ/m; one λ per group: λ_g/m, shape (groups,)
  inv_m: jax.Array
  damping: jax.Array
  tol: jax.Array
  seed: jax.Array  # of the random signs (preconditioner, probes), uint32


def check_model(name: str, train: Any, state: Any) -> None:
  if not isinstance(train, TrainStep):
    raise TypeError(
      f"`{name}(train, state, train_data, ...)` takes the model as `jaxl2.make_train_step` "
      f"does: `train` must be a jaxl2.TrainStep; got {type(train).__name__}. Build one with "
      "`jaxl2.make_train_step(apply_fn, loss_fn, optimizer, lam=..., m=...)` (or the general "
      "form), train it, and pass it with its TrainState; the data go in as arguments."
    )
  if not isinstance(state, TrainState):
    raise TypeError(
      f"`state` must be the jaxl2.TrainState of `train` at the trained params (from "
      f"`train.init(...)` and its steps); got {type(state).__name__}."
    )


def check_hosts(state: TrainState, data: dict[str, Any]) -> None:
  """The model and ``data`` ({argument: data}) can enter one program: the data's arrays placed
  on the params' devices (or not placed), and, where anything spans several processes, host
  data (NumPy, arrays on one process's devices) the same in every process. Call it in every
  process.

  Raises:
    ValueError: naming the argument, the leaf and the fix.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  params = [(f"`state.params` leaf at '{path_str(p)}'", x) for p, x in leaves]
  error = None
  try:
    for name, tree in data.items():
      paths = jax.tree_util.tree_flatten_with_path(tree)[0]
      check_devices(((path_str(p), x) for p, x in paths), name, like=params, fix=HOST_DATA_FIX)
  except ValueError as err:
    error = err
  if not tree_spans_processes(state.params, state.model_state):
    if error is not None:
      raise error
    return
  raise_together(error)  # a process that refused must not leave the others waiting
  check_same_everywhere(data, HOST_DATA_FIX)


DAMPING = 1e-2  # the default damping, relative to λ/m
RANK = 64  # of the Nyström preconditioner where `precondition=None` chooses one
AUTO_SIZE = 10**8  # params × training examples from which `precondition=None` chooses it


def _check_damping(damping: Any, scale: float) -> float:
  """``damping`` checked; None: ``DAMPING``·λ/m."""
  if damping is None:
    return DAMPING * scale
  if isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)):
    raise TypeError(f"`damping` must be a number >= 0; got {damping!r}.")
  if not (np.isfinite(damping) and damping >= 0):
    raise ValueError(f"`damping` must be a finite number >= 0; got {damping!r}.")
  return float(damping)


def prepare(
  name: str,
  train: Any,
  state: Any,
  train_data: Any,
  *,
  batch_size: Any,
  curvature: Any,
  damping: Any,
  tol: Any,
  maxiter: Any,
  precondition: Any,
  seed: int = 0,
) -> tuple[Options, Numbers, float]:
  """The checked `Options`, the `Numbers` and the tolerance used, for the tool ``name``.

  Raises:
    TypeError: ``train``/``state`` of the wrong kind, a params leaf that is not
      real floating, a bad ``batch_size``.
    ValueError: λ in the state or ``train.m`` invalid, a mask that selects
      nothing, an unknown ``curvature``, ``damping`` < 0, ``maxiter`` < 1.
  """
  check_model(name, train, state)
  n = n_examples(train_data, "train_data")
  batch_size = check_batch_size(batch_size, n)
  c = leaf_multipliers(state.params, train.mask, name)
  acc = accumulation_dtype(jax.tree_util.tree_leaves(state.params))
  tol = solve_tol(acc, tol, maxiter)
  size = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.params))
  if precondition is None:
    # Its compile time (one more product in the program, about a second on a CPU) pays
    # only where products are dear: big models on big data.
    precondition = RANK if size * n >= AUTO_SIZE else 0
  check_count(precondition, "precondition", least=0)
  curvature = check_curvature(curvature, train)
  # With one λ per group, the default damping is relative to the smallest λ_g/m.
  scales, scale, groups = lam_scales(train, state.params, state_lam(train, state), acc)
  numbers = Numbers(
    c=[jnp.asarray(x, acc) for x in c],
    scale=scales,
    inv_m=lam_over_m(1.0, train.m, acc),
    damping=jnp.asarray(_check_damping(damping, scale), acc),
    tol=jnp.asarray(tol, acc),
    seed=jnp.asarray(seed, jnp.uint32),
  )
  rank = min(int(precondition), size)
  return Options(train, curvature, batch_size, int(maxiter), rank, groups), numbers, tol


def check_loss_fn(val_loss_fn: Any, train: TrainStep) -> Callable[..., Any]:
  """``val_loss_fn`` (in the form of ``train.loss_fn``), or ``train.loss_fn`` when None."""
  if val_loss_fn is None:
    return train.loss_fn
  check_callable(val_loss_fn, "val_loss_fn")
  return val_loss_fn


class Inside(NamedTuple):
  """A λ tool's pieces inside its program, at W* in the accumulation dtype ``acc``."""

  w: Tree
  acc: Any
  c: Tree  # the multipliers, shaped like W (0-d leaves)
  model: Evaluation
  product: Callable[[Tree], Tree]  # v ↦ C·v, the data's curvature
  matvec: Callable[[Tree], Tree]  # v ↦ (C + (λ/m)·c + damping)·v
  precondition: Callable[[Tree], Tree] | None  # v ↦ P⁻¹·v (Nyström), or None
  scale: Tree = None  # each leaf's λ/m (its group's λ_g/m), shaped like W (0-d leaves)


def inside(options: Options, numbers: Numbers, model: Any, train_data: Any) -> Inside:
  """The shared pieces, from ``model = (params, model_state, static)`` (traceable)."""
  params, model_state, static = model
  train = options.train
  acc = accumulation_dtype(jax.tree_util.tree_leaves(params))
  dtypes = jax.tree_util.tree_map(lambda x: x.dtype, params)
  w = jax.tree_util.tree_map(lambda x: x.astype(acc), params)
  treedef = jax.tree_util.tree_structure(params)
  c = jax.tree_util.tree_unflatten(treedef, numbers.c)
  scale = jax.tree_util.tree_unflatten(
    treedef, group_leaf_scales(numbers.scale, options.groups, len(numbers.c))
  )
  ev = evaluation(train, train.loss_fn, options.curvature, static, model_state, dtypes)
  product = curvature_product(ev, w, train_data, options.batch_size, acc)

  def matvec(v: Tree) -> Tree:
    shift = jax.tree_util.tree_map(lambda ci, si: si * ci + numbers.damping, c, scale)
    return jax.tree_util.tree_map(lambda pv, s, x: pv + s * x, product(v), shift, v)

  precondition = None
  if options.rank:
    # The preconditioner treats the penalty as one shift μ: its mean over the entries.
    sizes = [x.size for x in jax.tree_util.tree_leaves(w)]
    per_leaf = zip(numbers.c, jax.tree_util.tree_leaves(scale), sizes, strict=True)
    shift = sum(si * ci * n for ci, si, n in per_leaf) / sum(sizes) + numbers.damping
    precondition = nystrom(product, w, numbers.seed, options.rank, shift)
  return Inside(w, acc, c, ev, product, matvec, precondition, scale)
