"""What each model of `jaxl2.sweep` starts from: its seed's state, its λ, fold and keys.

A sweep trains one model per (λ, fold, seed). Everything a model's run
depends on is a function of its own λ, fold and seed, never of its place in
the grid, so a λ trains the same in any grid:

* start: ``train.init(model, model_state, seed=seed)`` of
  ``init_fn(jax.random.key(seed))``, as `jaxl2.make_train_step` makes it, with
  λ in the state's dtype (the penalty's accumulation dtype);
* dropout: step t's key is ``fold_in(key(seed), t)`` (an NNX module: its RNG
  streams restarted from ``key(seed)``), the same for every λ and fold;
* minibatches: epoch e of fold f visits the fold's training examples in the
  order ``permutation(fold_in(order_key(seed, f), e), train_idx[f])`` with
  ``order_key(seed, f) = fold_in(key(seed), ORDER + f)``, where ORDER = 2**31
  lies above every step number, so an order key is never a dropout key.

Seeds are initialized once each, outside the compiled program: initializers
(truncated normals, threefry) cost far more to compile than to run, and every
λ and fold of a seed starts from the same state anyway. The program gathers
each model's start from them (`models` indexes `shared`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.training._train_state import TrainState
from jaxl2.training._training import TrainStep

__all__ = ["fold_indices", "grid", "models", "seed_states"]

# Folded into key(seed) (plus the fold) for the minibatch order: above every
# int32 step number, so it never meets a dropout key fold_in(key(seed), step).
ORDER = 2**31


def order_key(seed: int, fold: int) -> jax.Array:
  """The key of the minibatch order of ``seed`` and ``fold`` (see the module docstring)."""
  return jax.random.fold_in(jax.random.key(seed), ORDER + fold)


def fold_indices(n: int, folds: int | None) -> tuple[np.ndarray, np.ndarray | None]:
  """(train, validation) example indices per fold: contiguous folds of floor(n/k) examples.

  Without folds: every example trains. The n mod k examples past the last full
  fold are left out, so every fold trains on the same number of examples.
  """
  if folds is None:
    return np.arange(n)[None], None
  size = n // folds
  everything = np.arange(size * folds)
  val = everything.reshape(folds, size)
  train = np.stack([np.setdiff1d(everything, v) for v in val])
  return train, val


def grid(shape: tuple[int, int, int], n_devices: int) -> np.ndarray:
  """(λ, fold, seed) indices of every model, (3, n); the last repeated so devices share evenly."""
  n_models = math.prod(shape)
  padded = math.ceil(n_models / n_devices) * n_devices
  rows = np.stack(np.unravel_index(np.arange(n_models), shape), axis=1)
  return np.concatenate([rows, np.repeat(rows[-1:], padded - n_models, axis=0)]).T


def _split_output(out: Any) -> tuple[Any, Any]:
  """``init_fn``'s output in the general form as (model, model_state)."""
  if isinstance(out, tuple):
    if len(out) != 2:
      raise ValueError(
        "`init_fn` (general form, `apply_fn=None`) must return the model, or a pair "
        f"`(model, model_state)`; got a tuple of {len(out)} items."
      )
    return out
  return out, None  # a module (NNX, Equinox) or params with no model state


def _same_static(a: Any, b: Any) -> bool:
  """Whether two static parts are equal, non-hashable leaves (int arrays) compared by value."""
  if a is None or b is None:
    return a is b
  leaves_a, tree_a = jax.tree_util.tree_flatten(a.value)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b.value)
  if a.kind != b.kind or tree_a != tree_b or len(leaves_a) != len(leaves_b):
    return False
  if a.kind == "nnx":
    return a == b
  return all(
    np.array_equal(x, y) if hasattr(x, "shape") else x == y
    for x, y in zip(leaves_a, leaves_b, strict=True)
  )


def seed_states(
  train: TrainStep, init_fn: Callable[[jax.Array], Any], seeds: tuple[int, ...]
) -> TrainState:
  """Each seed's initial `TrainState`, stacked along a leading seed axis.

  Raises:
    ValueError: the seeds' models differ in their static part (an activation,
      an NNX attribute): one program trains them all, so only arrays may differ.
  """
  general = train.apply_fn is None
  states = []
  for seed in seeds:
    out = init_fn(jax.random.key(seed))
    if general:
      model, model_state = _split_output(out)
      states.append(train.init(model, model_state, seed=seed))
    else:
      states.append(train.init(out))
  first = states[0].static
  for seed, state in zip(seeds[1:], states[1:], strict=True):
    if not _same_static(first, state.static):
      raise ValueError(
        f"`init_fn` gave models that differ in more than their arrays for seeds {seeds[0]} "
        f"and {seed} (an activation, a size or an NNX attribute): `seeds` only draw "
        "initial weights. Build the same model for every key."
      )
  states = [s._replace(static=first) for s in states]
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def models(
  rows: np.ndarray,
  states: TrainState,
  lams: list[float],
  seeds: tuple[int, ...],
  train_idx: np.ndarray,
  val_idx: np.ndarray | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(models, shared): each model's λ and indices, and what models of one seed or fold share.

  ``models`` has one row per model: ``lam`` (in the state's λ dtype), ``seed``
  and ``fold`` (indices into ``shared``). ``shared``: ``states`` (one per
  seed), ``order_keys`` (seed, fold), ``train_idx`` and ``val_idx`` (per fold).
  """
  lam_i, fold_i, seed_i = rows
  keys = [[order_key(seed, f) for f in range(len(train_idx))] for seed in seeds]
  return (
    {
      "lam": np.asarray(lams, states.lam.dtype)[lam_i],
      "seed": seed_i.astype(np.int32),
      "fold": fold_i.astype(np.int32),
    },
    {
      "states": states,
      "order_keys": jnp.stack([jnp.stack(k) for k in keys]),
      "train_idx": train_idx,
      "val_idx": val_idx,
    },
  )
