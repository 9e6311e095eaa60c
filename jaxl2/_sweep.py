"""`sweep`: one model per λ (and fold and seed), trained in one compiled program.

The model axis is a `jax.vmap` batch axis: λ is data in the training state, so
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
from jaxl2._penalties import weight_sq_norm
from jaxl2._setup import l2_from_sq_norm
from jaxl2._training import TrainState, TrainStep, accuracy, make_train_step

__all__ = ["SweepResult", "sweep"]

_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "weight_sq_norm", "penalty")
Metrics = Callable[[Any, Any], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """Per-λ results of `jaxl2.sweep`, all measured after the last step.

  Every metric array has shape ``(len(lams), n_seeds)``, or
  ``(len(lams), folds, n_seeds)`` with ``folds``.

  Attributes:
    lams: the λ grid, in the order given.
    seeds: the seeds (one model per λ, fold and seed).
    m: the number of training inputs used in (λ/2m) (each fold's training part).
    train_loss, val_loss: mean data loss (no penalty) on the training part and
      on the validation data (or the held-out fold), in eval mode.
    train_accuracy, val_accuracy: the "accuracy" metric where there is one
      (integer class labels, or your ``metrics_fn``/aux), else NaN.
    weight_sq_norm: Σ c·‖W‖² of the final weights.
    penalty: (λ/2m) · weight_sq_norm.
    best_lam: the λ with the lowest validation loss, averaged over folds and
      seeds, among the λ none of whose runs diverged (NaN if all diverged).
    params: the final parameters, each leaf stacked like the metrics.
    diverged: True where a run ended with a non-finite loss or weights.
    metrics: every other metric, ``{"train_<name>", "val_<name>": array}``.
    folds: the number of cross-validation folds, or None.
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
  metrics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  folds: int | None = None

  @property
  def classification(self) -> bool:
    """Whether an accuracy was measured."""
    return bool(np.isfinite(self.val_accuracy).any())

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready: per-λ rows averaged over folds and seeds, ``diverged`` and ``best_lam``."""
    keys = [k for k in _METRICS if self.classification or "accuracy" not in k]
    diverged = np.zeros(self.val_loss.shape, bool) if self.diverged is None else self.diverged

    def mean(values: np.ndarray, i: int) -> float:
      return float(np.mean(values[i]))

    rows = [
      {
        "lam": float(lam),
        **{k: mean(getattr(self, k), i) for k in keys},
        **{k: mean(v, i) for k, v in self.metrics.items()},
        "diverged": bool(diverged[i].any()),
      }
      for i, lam in enumerate(self.lams)
    ]
    return {
      "m": self.m,
      "lambdas": [float(lam) for lam in self.lams],
      "seeds": list(self.seeds),
      "folds": self.folds,
      "best_lam": self.best_lam,
      "best_by": "lowest mean validation loss" + (" over folds" if self.folds else ""),
      "results": rows,
    }


def _model_mesh() -> Mesh | None:
  devices = jax.devices()
  return None if len(devices) == 1 else Mesh(np.asarray(devices), ("models",))


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


def _check_options(lams: Sequence[float], steps: int, seeds: Sequence[int], folds: Any) -> None:
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
  metrics_fn: Metrics | None = None,
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
  _check_options(lams, steps, seeds, folds)
  if (val_data is None) == (folds is None):
    raise ValueError(
      "`val_data` is needed without `folds`, and must be None with `folds` (the held-out "
      f"fold is the validation set); got val_data={'None' if val_data is None else 'data'}, "
      f"folds={folds!r}."
    )
  lam_list, seed_list = [float(x) for x in lams], tuple(int(s) for s in seeds)
  train_idx, val_idx = _fold_indices(_n_examples(train_data, "train_data"), folds)
  n_train = train_idx.shape[1]
  if batch_size is not None and (
    isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 0 < batch_size <= n_train
  ):
    raise ValueError(
      f"`batch_size` must be an integer in [1, {n_train}] (the training part's size) or None; "
      f"got {batch_size!r}."
    )
  m = float(n_train if m is None else m)
  check_m(m)
  general = apply_fn is None
  train = make_train_step(apply_fn, loss_fn, optimizer, lam=0.0, m=m, mask=mask)
  per_seed = [init_fn(jax.random.key(seed)) for seed in seed_list]
  if general:
    train.init(*per_seed[0])  # sets up the general form's loss, checks the mask

  n_lams, n_folds, n_seeds = len(lam_list), len(train_idx), len(seed_list)
  n_models = n_lams * n_folds * n_seeds
  mesh = _model_mesh()
  n_dev = 1 if mesh is None else mesh.devices.size
  padded = math.ceil(n_models / n_dev) * n_dev  # pad so every device gets the same share
  grid = np.stack(np.unravel_index(np.arange(n_models), (n_lams, n_folds, n_seeds)), axis=1)
  grid = np.concatenate([grid, np.repeat(grid[-1:], padded - n_models, axis=0)])
  lam_i, fold_i, seed_i = grid.T

  # Initialized once per seed, outside the compiled program: initializers
  # (truncated normals, threefry) cost far more to compile than to run, and
  # every λ and fold of a seed starts from the same weights anyway.
  start = jax.tree_util.tree_map(lambda *xs: np.stack(xs)[seed_i], *jax.device_get(per_seed))
  seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seed_list)[seed_i])
  per_model = {
    "start": start,
    "lam": np.asarray(lam_list, np.float32)[lam_i],
    # Dropout keys differ per model; the data order only per seed and fold.
    "key": jax.vmap(jax.random.fold_in)(seed_keys, jnp.asarray(lam_i * n_folds + fold_i)),
    "order_key": jax.vmap(jax.random.fold_in)(seed_keys, jnp.asarray(fold_i + (1 << 20))),
    "train_idx": train_idx[fold_i],
    "val_idx": None if val_idx is None else val_idx[fold_i],
  }
  program = _program(
    train, mask, m, steps, progress, mesh, batch_size, folds is not None, metrics_fn
  )
  params, out = jax.device_get(program(per_model, train_data, val_data))

  shape = (n_lams, n_seeds) if folds is None else (n_lams, n_folds, n_seeds)

  def arrange(values: Any) -> np.ndarray:
    return np.asarray(values)[:n_models].reshape(*shape, *np.shape(values)[1:])

  fields = {k: arrange(out.pop(k)) for k in ("train_loss", "val_loss", "weight_sq_norm", "penalty")}
  finite_params = arrange(out.pop("finite_params"))
  metrics = {k: arrange(v) for k, v in out.items()}
  nan = np.full(fields["val_loss"].shape, np.nan)
  for split in ("train", "val"):
    fields[f"{split}_accuracy"] = metrics.pop(f"{split}_accuracy", nan)
  diverged = ~(np.isfinite(fields["train_loss"]) & np.isfinite(fields["val_loss"]) & finite_params)
  return SweepResult(
    lams=np.asarray(lam_list),
    seeds=seed_list,
    m=m,
    best_lam=_best(lam_list, fields["val_loss"], diverged),
    params=jax.tree_util.tree_map(arrange, params),
    diverged=diverged,
    metrics=metrics,
    folds=folds,
    **fields,
  )


def _best(lams: list[float], val_loss: np.ndarray, diverged: np.ndarray) -> float:
  """The λ with the lowest mean validation loss among λ with no diverged run; nan if none.

  A diverged run's loss is NaN or inf, and `np.argmin` would return a NaN
  as the minimum: such λ are removed before the comparison, never after.
  """
  per_lam = val_loss.reshape(len(lams), -1)
  usable = ~diverged.reshape(len(lams), -1).any(axis=1)
  if not usable.any():
    return math.nan
  return lams[int(np.argmin(np.where(usable, per_lam.mean(axis=1), np.inf)))]


def _take(data: Any, idx: jax.Array) -> Any:
  return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)


# Compiled sweeps, reused by later calls with the same functions and settings
# (jit's own cache keys on the function object, which is rebuilt on each call).
_PROGRAMS: dict[Any, Callable[..., Any]] = {}
_MAX_PROGRAMS = 16


def _program(
  train: TrainStep,
  mask: MaskSpec,
  m: float,
  steps: int,
  progress: Callable[[int, int], None] | None,
  mesh: Mesh | None,
  batch_size: int | None,
  cross_validate: bool,
  metrics_fn: Metrics | None,
) -> Callable[..., Any]:
  """The jitted init-train-evaluate program; cached when every setting is hashable."""
  key = (train.apply_fn, train.loss_fn, train.optimizer, mask, m, steps, progress, mesh)
  key += (batch_size, cross_validate, metrics_fn)
  try:
    cached = _PROGRAMS.get(key)
  except TypeError:  # an unhashable mask (a pytree of bools): build it anew
    key, cached = None, None
  if cached is not None:
    return cached
  general = train.apply_fn is None
  evaluate = _evaluator(train, mask, m, metrics_fn)
  every = max(1, steps // 20)

  def report(done: jax.Array) -> None:
    if progress is not None:
      progress(int(done), steps)

  def run(per_model: dict[str, Any], train_data: Any, val_data: Any) -> tuple[Any, Any]:
    def init_one(model: dict[str, Any]) -> TrainState:
      params, model_state = model["start"] if general else (model["start"], None)
      key = model["key"] if general else None
      return TrainState(
        params, train.optimizer.init(params), jnp.zeros([], jnp.int32), model["lam"],
        model_state, key,
      )  # fmt: skip

    def batch_at(model: dict[str, Any], i: jax.Array) -> Any:
      idx = model["train_idx"]
      if batch_size is not None:
        per_epoch = idx.shape[0] // batch_size
        order = jax.random.permutation(jax.random.fold_in(model["order_key"], i // per_epoch), idx)
        idx = jax.lax.dynamic_slice(order, ((i % per_epoch) * batch_size,), (batch_size,))
      elif not cross_validate:
        return train_data  # the whole training set, shared by every model: no copy
      return _take(train_data, idx)

    state = jax.vmap(init_one)(per_model)

    def body(state: TrainState, i: jax.Array) -> tuple[TrainState, None]:
      step = jax.vmap(lambda s, model: train.step_fn(s, batch_at(model, i))[0])
      state = step(state, per_model)
      if progress is not None:
        done = i + 1
        jax.lax.cond(
          (done % every == 0) | (done == steps),
          lambda: jax.debug.callback(report, done),
          lambda: None,
        )
      return state, None

    state, _ = jax.lax.scan(body, state, jnp.arange(steps))

    def final(s: TrainState, model: dict[str, Any]) -> dict[str, jax.Array]:
      held_out = _take(train_data, model["val_idx"]) if cross_validate else val_data
      part = _take(train_data, model["train_idx"]) if cross_validate else train_data
      return evaluate(s, part, held_out)

    return state.params, jax.vmap(final)(state, per_model)

  if mesh is None:
    compiled = jax.jit(run)
  else:
    models, replicated = NamedSharding(mesh, P("models")), NamedSharding(mesh, P())
    compiled = jax.jit(
      run, in_shardings=(models, replicated, replicated), out_shardings=(models, models)
    )
  if key is not None:
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
      _PROGRAMS.pop(next(iter(_PROGRAMS)))  # the oldest
    _PROGRAMS[key] = compiled
  return compiled


def _evaluator(
  train: TrainStep, mask: MaskSpec, m: float, metrics_fn: Metrics | None
) -> Callable[[TrainState, Any, Any], dict[str, jax.Array]]:
  """Final metrics of one model: losses and metrics in eval mode, Σ‖W‖², penalty, finiteness."""

  def split_metrics(state: TrainState, data: Any) -> dict[str, jax.Array]:
    if train.apply_fn is None:
      return train.eval_fn(state, data)
    inputs, targets = data
    outputs = train.apply_fn(state.params, inputs)
    if metrics_fn is not None:
      extra = metrics_fn(outputs, targets)
    elif jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
      extra = {"accuracy": accuracy(outputs, targets)}
    else:
      extra = {}  # regression: an accuracy would be meaningless
    return {**extra, "loss": train.loss_fn(outputs, targets)}

  def evaluate(state: TrainState, train_part: Any, val_part: Any) -> dict[str, jax.Array]:
    out = {}
    for split, data in (("train", train_part), ("val", val_part)):
      out.update({f"{split}_{k}": v for k, v in split_metrics(state, data).items()})
    sq_norm = weight_sq_norm(state.params, mask=mask)
    finite = [jnp.all(jnp.isfinite(w)) for w in jax.tree_util.tree_leaves(state.params)]
    out["weight_sq_norm"] = sq_norm
    out["penalty"] = l2_from_sq_norm(sq_norm, state.lam, m)
    out["finite_params"] = jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)
    return out

  return evaluate
