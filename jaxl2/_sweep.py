"""`sweep`: one model per λ (and per seed), trained in one compiled program.

The λ axis is a `jax.vmap` batch axis: λ is data in the training state, so
every model runs the same program. When several devices are visible (a TPU
host, several GPUs, or CPU host devices from ``XLA_FLAGS``), the models are
sharded over them along that axis and train in parallel with no
communication; on one device the same code runs unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxl2._checks import check_lam, check_m
from jaxl2._masks import MaskSpec
from jaxl2._penalties import l2_from_sq_norm, weight_sq_norm
from jaxl2._training import ApplyFn, Batch, LossFn, TrainState, accuracy, make_train_step

__all__ = ["SweepResult", "sweep"]

_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "weight_sq_norm", "penalty")


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """Per-λ results of `jaxl2.sweep`, all measured after the last step.

  Every metric array has shape ``(len(lams), n_seeds)``.

  Attributes:
    lams: the λ grid, in the order given.
    seeds: the seeds (one model per λ and seed).
    m: the number of training inputs used in (λ/2m).
    train_loss, val_loss: mean data loss (no penalty) on the train/validation set.
    train_accuracy, val_accuracy: classification accuracy (`jaxl2.accuracy`).
    weight_sq_norm: Σ c·‖W‖² of the final weights.
    penalty: (λ/2m) · weight_sq_norm.
    best_lam: the λ with the lowest validation loss, averaged over seeds,
      among the λ none of whose runs diverged (``nan`` if all diverged).
    params: the final parameters, each leaf stacked as (len(lams), n_seeds, ...).
    diverged: True where a run ended with a non-finite loss or weights.
    classification: whether the accuracies apply (integer class labels);
      for other targets (regression) they are NaN and left out of `to_dict`.
  """

  lams: np.ndarray
  seeds: tuple[int, ...]
  m: float
  train_loss: np.ndarray
  val_loss: np.ndarray
  train_accuracy: np.ndarray
  val_accuracy: np.ndarray
  weight_sq_norm: np.ndarray
  penalty: np.ndarray
  best_lam: float
  params: Any = dataclasses.field(repr=False)
  diverged: np.ndarray | None = None
  classification: bool = True

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready: per-λ rows with metrics averaged over seeds, ``diverged``, ``best_lam``."""
    keys = [k for k in _METRICS if self.classification or "accuracy" not in k]
    diverged = np.zeros(self.val_loss.shape, bool) if self.diverged is None else self.diverged
    rows = [
      {
        "lam": float(lam),
        **{k: float(np.mean(getattr(self, k)[i])) for k in keys},
        "diverged": bool(diverged[i].any()),
      }
      for i, lam in enumerate(self.lams)
    ]
    return {
      "m": self.m,
      "lambdas": [float(lam) for lam in self.lams],
      "seeds": list(self.seeds),
      "best_lam": self.best_lam,
      "best_by": "lowest mean validation loss",
      "results": rows,
    }


def _model_mesh() -> Mesh | None:
  devices = jax.devices()
  return None if len(devices) == 1 else Mesh(np.asarray(devices), ("models",))


def sweep(
  init_fn: Callable[[jax.Array], Any],
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  train_data: Batch,
  val_data: Batch,
  *,
  lams: Sequence[float],
  steps: int,
  m: float | None = None,
  seeds: Sequence[int] = (0,),
  mask: MaskSpec = None,
  progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
  r"""Trains one model per λ (and per seed) in one compiled program, full batch.

  Each model minimizes ``loss_fn(apply_fn(params, x), y) + (λ/2m)·Σ c·‖W‖²``
  with ``optimizer`` for ``steps`` full-batch steps from ``init_fn(key(seed))``,
  exactly as `jaxl2.make_train_step` would; the models differ only in λ and
  seed. The program is `jax.vmap` over models, sharded over all devices when
  there are several.

  Args:
    init_fn: ``init_fn(key) -> params``: the initial parameters for a seed.
    apply_fn, loss_fn, optimizer, mask: as for `jaxl2.make_train_step`.
    train_data: ``(inputs, targets)`` of the training set.
    val_data: ``(inputs, targets)`` of the validation set.
    lams: the λ grid (each ≥ 0).
    steps: number of training steps per model.
    m: the number of training inputs; default ``len(train_data[1])``.
    seeds: one model per λ and seed.
    progress: called as ``progress(steps_done, steps)`` from inside the
      compiled program (`jax.debug.callback`) about 20 times during training
      and once at the end; ``steps_done`` never decreases, but a value may be
      reported more than once (once per device).

  Returns:
    A `SweepResult`; ``best_lam`` is chosen by the lowest mean validation
    loss among the λ whose runs all stayed finite (a diverged λ is marked in
    ``diverged`` and never chosen). Accuracies are reported for integer class
    labels only. A second call with the same functions, optimizer, mask, m,
    step count and shapes reuses the compiled program.

  Raises:
    ValueError: an empty or invalid λ grid, ``steps`` < 1, ``m`` ≤ 0.

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
  lam_list = []
  for i, lam in enumerate(lams):
    check_lam(lam, f"lams[{i}]")
    lam_list.append(float(lam))
  if not lam_list:
    raise ValueError("`lams` must hold at least one λ; got an empty sequence.")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"`steps` must be an integer >= 1; got {steps!r}.")
  seed_list = tuple(int(s) for s in seeds)
  if not seed_list:
    raise ValueError("`seeds` must hold at least one seed; got an empty sequence.")
  m = float(len(train_data[1]) if m is None else m)
  check_m(m)

  make_train_step(apply_fn, loss_fn, optimizer, lam=0.0, m=m, mask=mask)  # checks them now
  n_lams, n_seeds = len(lam_list), len(seed_list)
  n_models = n_lams * n_seeds
  mesh = _model_mesh()
  n_dev = 1 if mesh is None else mesh.devices.size
  padded = math.ceil(n_models / n_dev) * n_dev  # pad so every device gets the same share

  lam_grid = np.repeat(np.asarray(lam_list, np.float32), n_seeds)
  lam_grid = np.concatenate([lam_grid, np.full(padded - n_models, lam_grid[-1], np.float32)])

  # Initialized once per seed, outside the compiled program: initializers
  # (truncated normals, threefry) cost far more to compile than to run, and
  # every λ of a seed starts from the same weights anyway.
  per_seed = [init_fn(jax.random.key(seed)) for seed in seed_list]
  rows = np.concatenate(
    [np.tile(np.arange(n_seeds), n_lams), np.full(padded - n_models, n_seeds - 1)]
  )
  params0 = jax.tree_util.tree_map(lambda *xs: np.stack(xs)[rows], *jax.device_get(per_seed))

  compiled = _program(apply_fn, loss_fn, optimizer, mask, m, steps, progress, mesh)
  params, metrics = jax.device_get(compiled(params0, jnp.asarray(lam_grid), train_data, val_data))

  def grid(values: Any) -> np.ndarray:
    return np.asarray(values)[:n_models].reshape(n_lams, n_seeds, *np.shape(values)[1:])

  fields = {k: grid(metrics[k]) for k in _METRICS}
  classification = _is_classification(train_data[1])
  if not classification:
    for k in ("train_accuracy", "val_accuracy"):
      fields[k] = np.full_like(fields[k], np.nan)
  finite_params = grid(metrics["finite_params"])
  diverged = ~(np.isfinite(fields["train_loss"]) & np.isfinite(fields["val_loss"]) & finite_params)
  return SweepResult(
    lams=np.asarray(lam_list),
    seeds=seed_list,
    m=m,
    best_lam=_best(lam_list, fields["val_loss"], diverged),
    params=jax.tree_util.tree_map(grid, params),
    diverged=diverged,
    classification=classification,
    **fields,
  )


def _is_classification(targets: Any) -> bool:
  """Integer (or bool) targets are class labels; floating targets are regression."""
  dtype = getattr(targets, "dtype", None)
  return dtype is not None and not jnp.issubdtype(dtype, jnp.inexact)


def _best(lams: list[float], val_loss: np.ndarray, diverged: np.ndarray) -> float:
  """The λ with the lowest mean validation loss among λ with no diverged run; nan if none.

  A diverged run's loss is NaN or inf, and `np.argmin` would return a NaN
  as the minimum: such λ are removed before the comparison, never after.
  """
  usable = ~diverged.any(axis=1)
  if not usable.any():
    return math.nan
  scores = np.where(usable, val_loss.mean(axis=1), np.inf)
  return lams[int(np.argmin(scores))]


# Compiled sweeps, reused by later calls with the same functions and settings
# (jit's own cache keys on the function object, which is rebuilt on each call).
_PROGRAMS: dict[Any, Callable[..., Any]] = {}
_MAX_PROGRAMS = 16


def _program(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  mask: MaskSpec,
  m: float,
  steps: int,
  progress: Callable[[int, int], None] | None,
  mesh: Mesh | None,
) -> Callable[..., Any]:
  """The jitted init-train-evaluate program; cached when every setting is hashable."""
  key = (apply_fn, loss_fn, optimizer, mask, m, steps, progress, mesh)
  try:
    cached = _PROGRAMS.get(key)
  except TypeError:  # an unhashable mask (a pytree of bools): build it anew
    key, cached = None, None
  if cached is not None:
    return cached
  train = make_train_step(apply_fn, loss_fn, optimizer, lam=0.0, m=m, mask=mask)

  def init_one(params: Any, lam: jax.Array) -> TrainState:
    return TrainState(params, optimizer.init(params), jnp.zeros([], jnp.int32), lam)

  def evaluate(state: TrainState, train_batch: Batch, val_batch: Batch) -> dict[str, jax.Array]:
    out: dict[str, jax.Array] = {}
    for split, (x, y) in (("train", train_batch), ("val", val_batch)):
      outputs = apply_fn(state.params, x)
      out[f"{split}_loss"] = loss_fn(outputs, y)
      out[f"{split}_accuracy"] = accuracy(outputs, y)
    sq_norm = weight_sq_norm(state.params, mask=mask)
    out["weight_sq_norm"] = sq_norm
    out["penalty"] = l2_from_sq_norm(sq_norm, state.lam, m)
    finite = [jnp.all(jnp.isfinite(w)) for w in jax.tree_util.tree_leaves(state.params)]
    out["finite_params"] = jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)
    return out

  every = max(1, steps // 20)

  def report(done: jax.Array) -> None:
    if progress is not None:
      progress(int(done), steps)

  def train_all(params: Any, lams_: jax.Array, train_batch: Batch, val_batch: Batch):
    # One program: init, every step, evaluation. The scan is outside the model
    # vmap, so the step counter is unbatched and the progress `cond` is real.
    state = jax.vmap(init_one)(params, lams_)
    step_all = jax.vmap(lambda s: train.step_fn(s, train_batch)[0])

    def body(state: TrainState, i: jax.Array) -> tuple[TrainState, None]:
      state = step_all(state)
      if progress is not None:
        done = i + 1
        jax.lax.cond(
          (done % every == 0) | (done == steps),
          lambda: jax.debug.callback(report, done),
          lambda: None,
        )
      return state, None

    state, _ = jax.lax.scan(body, state, jnp.arange(steps))
    return state.params, jax.vmap(evaluate, in_axes=(0, None, None))(state, train_batch, val_batch)

  if mesh is None:
    compiled = jax.jit(train_all)
  else:
    models, replicated = NamedSharding(mesh, P("models")), NamedSharding(mesh, P())
    compiled = jax.jit(
      train_all,
      in_shardings=(models, models, replicated, replicated),
      out_shardings=(models, models),
    )
  if key is not None:
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))  # the oldest
    _PROGRAMS[key] = compiled
  return compiled
