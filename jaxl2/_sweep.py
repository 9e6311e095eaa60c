"""`sweep`: one model per λ (and fold and seed), trained in one compiled program.

The model axis is a `jax.vmap` batch axis: λ is data in the training state, so
every model runs the same program. When several devices are visible (a TPU
host, several GPUs, or CPU host devices from ``XLA_FLAGS``), the models are
sharded over them along that axis and train in parallel with no
communication; on one device the same code runs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxl2._checks import check_lam, check_m
from jaxl2._masks import MaskSpec
from jaxl2._metrics import MetricsFn
from jaxl2._sweep_program import Settings, program
from jaxl2._sweep_result import SweepResult, sweep_result
from jaxl2._training import make_train_step

__all__ = ["SweepResult", "sweep"]


def sweep(
  init_fn: Callable[[jax.Array], Any],
  apply_fn: Callable[[Any, Any], Any] | None,
  loss_fn: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  train_data: Any,
  val_data: Any = None,
  *,
  lams: Sequence[float],
  steps: int,
  m: float | None = None,
  seeds: Sequence[int] = (0,),
  mask: MaskSpec = None,
  progress: Callable[[int, int], None] | None = None,
  batch_size: int | None = None,
  folds: int | None = None,
  metrics_fn: MetricsFn | None = None,
) -> SweepResult:
  r"""Trains one model per λ (and per fold and seed) in one compiled program.

  Each model minimizes its data loss + (λ/2m)·Σ c·‖W‖² with ``optimizer`` for
  ``steps`` steps from ``init_fn(key(seed))``, exactly as
  `jaxl2.make_train_step` would with the same form (simple, or general with
  model state and dropout); the models differ only in λ, fold and seed. The
  program is `jax.vmap` over models, sharded over all devices when there are
  several. Full batch by default; with ``batch_size`` each epoch visits the
  training part in a new order, ``jax.random.permutation(fold_in(key(seed),
  epoch), n)`` split into ``n // batch_size`` batches (the remainder is left
  out of that epoch); the order depends on the seed and fold, not on λ. With
  ``folds=k`` the data are k-fold cross-validated: fold f holds out examples
  ``f·(n//k)`` to ``(f+1)·(n//k) − 1`` and trains on the other folds (the
  ``n mod k`` last examples are left out), and λ is chosen by the mean
  validation loss over folds.

  Args:
    init_fn: ``init_fn(key) -> params`` (general form: ``-> (params,
      model_state)``).
    apply_fn, loss_fn: as for `jaxl2.make_train_step` (``apply_fn=None``:
      the general form, whose evaluation calls ``loss_fn`` with ``key=None``).
      Simple form: batches are ``(inputs, targets)``; general form: any
      pytree whose leaves share the leading example axis.
    optimizer, mask: as for `jaxl2.make_train_step`.
    train_data: the training set (or the data to cross-validate).
    val_data: the validation set; must be None with ``folds``.
    lams: the λ grid (each ≥ 0).
    steps: number of training steps per model.
    m: the number of training inputs; default: the training part's size.
    seeds: one model per λ, fold and seed.
    progress: called as ``progress(steps_done, steps)`` from inside the
      compiled program (`jax.debug.callback`) about 20 times during training
      and once at the end; a value may be reported more than once (once per device).
    batch_size: minibatch size; default: full batch.
    folds: k for k-fold cross-validation over ``train_data``.
    metrics_fn: simple form: ``metrics_fn(outputs, targets) -> {name: value}``
      at evaluation; default: ``{"accuracy": ...}`` for integer labels, none
      for other targets. General form: the aux metrics of ``loss_fn``.

  Returns:
    A `SweepResult`. A run whose loss or weights end non-finite is marked in
    ``diverged`` and its λ is never ``best_lam``. A second call with the same
    functions, optimizer, mask, m and settings reuses the compiled program.

  Raises:
    ValueError: an empty or invalid λ grid, ``steps`` < 1, ``m`` ≤ 0, bad
      ``batch_size``/``folds``, ``val_data`` missing (or given with folds),
      data whose leaves disagree on the number of examples.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxl2
    >>> x = jax.random.normal(jax.random.key(0), (32, 3)); y = x @ jnp.ones((3, 1))
    >>> result = jaxl2.sweep(
    ...   lambda key: {"w": jax.random.normal(key, (3, 1))}, lambda p, x: x @ p["w"],
    ...   lambda out, y: jnp.mean((out - y) ** 2), optax.sgd(0.1), (x, y), (x, y),
    ...   lams=[0.0, 10.0], steps=50)
    >>> norms = result.weight_sq_norm[:, 0]  # one seed: shape (len(lams),)
    >>> bool(norms[1] < norms[0])  # the larger λ ends with smaller weights
    True
  """
  _check_options(lams, steps, seeds, folds, val_data)
  lam_list, seed_list = [float(x) for x in lams], tuple(int(s) for s in seeds)
  train_idx, val_idx = _fold_indices(_n_examples(train_data, "train_data"), folds)
  _check_batch_size(batch_size, train_idx.shape[1])
  m = float(train_idx.shape[1] if m is None else m)
  check_m(m)
  train = make_train_step(apply_fn, loss_fn, optimizer, lam=0.0, m=m, mask=mask)
  per_seed = [init_fn(jax.random.key(seed)) for seed in seed_list]
  static = train.init(*per_seed[0]).static if apply_fn is None else None  # checks the mask
  mesh = _model_mesh()
  shape = (len(lam_list), len(train_idx), len(seed_list))
  grid = _grid(shape, 1 if mesh is None else mesh.devices.size)
  models = _models(grid, per_seed, lam_list, seed_list, train_idx, val_idx)
  settings = Settings(
    mask, m, steps, progress, mesh, batch_size, folds is not None, metrics_fn, static
  )
  params, out = jax.device_get(program(train, settings)(models, train_data, val_data))
  result_shape = shape if folds is not None else (shape[0], shape[2])  # (λ, [fold,] seed)
  return sweep_result(
    params, out, lams=lam_list, seeds=seed_list, m=m, folds=folds, shape=result_shape
  )


def _check_options(
  lams: Sequence[float], steps: int, seeds: Sequence[int], folds: Any, val_data: Any
) -> None:
  for i, lam in enumerate(lams):
    check_lam(lam, f"lams[{i}]")
  if not list(lams):
    raise ValueError("`lams` must hold at least one λ; got an empty sequence.")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"`steps` must be an integer >= 1; got {steps!r}.")
  if not tuple(seeds):
    raise ValueError("`seeds` must hold at least one seed; got an empty sequence.")
  if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
    raise ValueError(
      f"`folds` must be an integer >= 2 (k-fold cross-validation) or None; got {folds!r}."
    )
  if (val_data is None) == (folds is None):
    raise ValueError(
      "`val_data` is needed without `folds`, and must be None with `folds` (the held-out "
      f"fold is the validation set); got val_data={'None' if val_data is None else 'data'}, "
      f"folds={folds!r}."
    )


def _check_batch_size(batch_size: Any, n_train: int) -> None:
  if batch_size is not None and (
    isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 0 < batch_size <= n_train
  ):
    raise ValueError(
      f"`batch_size` must be an integer in [1, {n_train}] (the training part's size) or None; "
      f"got {batch_size!r}."
    )


def _n_examples(data: Any, name: str) -> int:
  sizes = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(data) if np.ndim(x)}
  if len(sizes) != 1:
    raise ValueError(
      f"`{name}` must be a pytree of arrays sharing their leading (example) axis; got leading "
      f"sizes {sorted(sizes)}."
    )
  return sizes.pop()


def _fold_indices(n: int, folds: int | None) -> tuple[np.ndarray, np.ndarray | None]:
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


def _model_mesh() -> Mesh | None:
  devices = jax.devices()
  return None if len(devices) == 1 else Mesh(np.asarray(devices), ("models",))


def _grid(shape: tuple[int, int, int], n_devices: int) -> np.ndarray:
  """(λ, fold, seed) indices of every model, (3, n); the last repeated so devices share evenly."""
  n_models = math.prod(shape)
  padded = math.ceil(n_models / n_devices) * n_devices
  grid = np.stack(np.unravel_index(np.arange(n_models), shape), axis=1)
  return np.concatenate([grid, np.repeat(grid[-1:], padded - n_models, axis=0)]).T


def _models(
  grid: np.ndarray,
  per_seed: list[Any],
  lams: list[float],
  seeds: tuple[int, ...],
  train_idx: np.ndarray,
  val_idx: np.ndarray | None,
) -> dict[str, Any]:
  """Each model's start, λ, keys and example indices, stacked along the model axis."""
  lam_i, fold_i, seed_i = grid
  # Initialized once per seed, outside the compiled program: initializers
  # (truncated normals, threefry) cost far more to compile than to run, and
  # every λ and fold of a seed starts from the same weights anyway.
  start = jax.tree_util.tree_map(lambda *xs: np.stack(xs)[seed_i], *jax.device_get(per_seed))
  seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds)[seed_i])
  return {
    "start": start,
    "lam": np.asarray(lams, np.float32)[lam_i],
    # Dropout keys differ per model; the data order only per seed and fold.
    "key": jax.vmap(jax.random.fold_in)(seed_keys, jnp.asarray(lam_i * len(train_idx) + fold_i)),
    "order_key": jax.vmap(jax.random.fold_in)(seed_keys, jnp.asarray(fold_i + (1 << 20))),
    "train_idx": train_idx[fold_i],
    "val_idx": None if val_idx is None else val_idx[fold_i],
  }
