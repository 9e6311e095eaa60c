"""`sweep`: one model per λ (and fold and seed), trained in one compiled program.

The model axis is a `jax.vmap` batch axis: λ is data in the training state, so
every model runs the same program. When several devices are visible (a TPU
host, several GPUs, or CPU host devices from ``XLA_FLAGS``), the models are
sharded over them along that axis and train in parallel with no
communication; on one device the same code runs unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxl2.core._checkpoint import check_checkpoint_dir
from jaxl2.core._checks import check_count, check_lam, check_m
from jaxl2.core._hosts import HOST_DATA_FIX, check_same_everywhere, placed_on, to_host
from jaxl2.masks._masks import MaskSpec
from jaxl2.sweeps._sweep_models import fold_indices, grid, seed_states
from jaxl2.sweeps._sweep_models import models as model_inputs
from jaxl2.sweeps._sweep_program import Settings, program
from jaxl2.sweeps._sweep_result import SweepResult, sweep_result
from jaxl2.sweeps._sweep_resume import fingerprint, run_resumable
from jaxl2.training._metrics import MetricsFn
from jaxl2.training._training import make_train_step

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
  checkpoint_dir: str | os.PathLike[str] | None = None,
  checkpoint_every: int | None = None,
) -> SweepResult:
  r"""Trains one model per λ (and per fold and seed) in one compiled program.

  Each model minimizes its data loss + (λ/2m)·Σ c·‖W‖² with ``optimizer`` for
  ``steps`` steps, exactly as `jaxl2.make_train_step` trains
  ``train.init(model, model_state, lam=λ, seed=seed)`` on its batches, where
  ``init_fn(jax.random.key(seed))`` gives the model in any form ``init``
  takes: params (simple form); general form (``apply_fn=None``):
  ``(params, model_state)``, a Flax NNX module, an Equinox module, or
  ``(module, eqx.nn.State)``. The models differ only in λ, fold and seed, and
  a model's run depends on those alone, never on the rest of the grid:

  * dropout: step t's key is ``fold_in(key(seed), t)`` for every λ and fold
    (an NNX module draws from its RNG streams, restarted from ``key(seed)``);
  * minibatches (``batch_size=b``): epoch e of fold f visits the fold's
    training examples ``idx`` (in increasing order) in the order
    ``jax.random.permutation(fold_in(fold_in(key(seed), 2**31 + f), e), idx)``,
    cut into ``len(idx) // b`` batches of b (the rest sits that epoch out);
    step t takes batch ``t % (len(idx) // b)`` of epoch ``t // (len(idx) // b)``;
  * folds (``folds=k``): fold f holds out examples ``f·(n//k)`` to
    ``(f+1)·(n//k) − 1`` and trains on the other folds (the ``n mod k`` last
    examples are left out), and λ is chosen by the mean validation loss over
    folds; without folds, f = 0 and every example trains.

  λ is held in the params' accumulation dtype (float64 for float64 params
  with 64-bit enabled, else float32). The program is `jax.vmap` over models,
  sharded over all devices when there are several.

  With ``checkpoint_dir``, the program runs in chunks of ``checkpoint_every``
  steps and every model's state is saved between chunks (with orbax: a
  process killed during a save leaves the previous checkpoint). A rerun with
  the same arguments and directory resumes from the latest checkpoint and
  returns, bit for bit, what an uninterrupted run with the same
  ``checkpoint_every`` returns; a finished sweep's directory gives its result
  again without training. The directory records the λ grid, seeds, steps, m,
  batch size, folds, number of models, the names of ``init_fn``,
  ``apply_fn`` and ``loss_fn``, and digests of the shapes and values of the
  data and of the initial params: a directory written by a sweep that
  differs in any of them is an error.

  Args:
    init_fn: ``init_fn(key) -> model``: params, or in the general form
      ``(params, model_state)``, an NNX or Equinox module, or ``(module,
      model_state)``. Every seed's model must have the same static part
      (activations, sizes, NNX attributes); only arrays may differ.
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
    checkpoint_dir: a directory to save the sweep to and resume it from
      (created if missing); None: no checkpoints, one program.
    checkpoint_every: steps per chunk, each chunk's end saved. Default: chunks
      of 100 steps, a chunk's end saved once at least 10 s, and 40 times as
      long as the previous save took, have passed since that save (and after
      the last step): saving then takes at most about 2.5% of the time
      whatever the models' size, and a preemption loses little more than 10 s
      or one chunk. Which ends are saved depends on timing, the results do not.

  Returns:
    A `SweepResult`. A run whose loss or weights end non-finite is marked in
    ``diverged`` and its λ is never ``best_lam``. A second call with the same
    functions, optimizer, mask, m and settings, and a model of the same
    static part, reuses the compiled program.

  Raises:
    TypeError: ``checkpoint_dir`` is not a path.
    ValueError: an empty or invalid λ grid, ``steps`` < 1, ``m`` ≤ 0, bad
      ``batch_size``/``folds``, ``val_data`` missing (or given with folds),
      data whose leaves disagree on the number of examples; seeds whose models
      differ in their static part; ``checkpoint_every`` < 1 or without
      ``checkpoint_dir``; a ``checkpoint_dir`` holding another sweep.

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
  directory = _check_checkpoints(checkpoint_dir, checkpoint_every)
  lam_list, seed_list = [float(x) for x in lams], tuple(int(s) for s in seeds)
  train_idx, val_idx = fold_indices(_n_examples(train_data, "train_data"), folds)
  _check_batch_size(batch_size, train_idx.shape[1])
  m = float(train_idx.shape[1] if m is None else m)
  check_m(m)
  train = make_train_step(apply_fn, loss_fn, optimizer, lam=0.0, m=m, mask=mask)
  starts = seed_states(train, init_fn, seed_list)  # also checks the mask on each seed's params
  mesh = _model_mesh()
  shape = (len(lam_list), len(train_idx), len(seed_list))
  rows = grid(shape, 1 if mesh is None else mesh.devices.size)
  models, shared = model_inputs(rows, starts, lam_list, seed_list, train_idx, val_idx)
  settings = Settings(
    mask, m, steps, progress, mesh, batch_size, folds is not None, metrics_fn, starts.static
  )
  programs = program(train, settings)
  inputs = (models, shared, train_data, val_data)
  if mesh is not None:
    inputs = _placed(mesh, *inputs)
  if directory is None:
    params, out = programs.whole(*inputs)
  else:
    options = {
      "lams": lam_list, "seeds": list(seed_list), "steps": steps, "m": m,
      "batch_size": batch_size, "folds": folds,
      "models (the grid padded to a multiple of the devices)": int(rows.shape[1]),
      "functions": [_name(f) for f in (init_fn, apply_fn, loss_fn)],
    }  # fmt: skip
    facts = fingerprint(options, train_data=train_data, val_data=val_data, start=starts.params)
    params, out = run_resumable(
      programs, *inputs, steps=steps, directory=directory,
      every=None if checkpoint_every is None else int(checkpoint_every), facts=facts,
    )  # fmt: skip
  params, out = to_host((params, out))  # gathered from every process, on several
  result_shape = shape if folds is not None else (shape[0], shape[2])  # (λ, [fold,] seed)
  return sweep_result(
    params, out, lams=lam_list, seeds=seed_list, m=m, folds=folds, shape=result_shape
  )


def _check_options(
  lams: Sequence[float], steps: int, seeds: Sequence[int], folds: Any, val_data: Any
) -> None:
  if isinstance(lams, Mapping):
    raise TypeError(
      "`lams` is a {pattern: λ} table; `sweep` trains each model with one λ for every group, so "
      "`lams` is a sequence of numbers. For fixed ratios between groups, sweep λ with the ratios "
      "as mask multipliers (`mask=jaxl2.by_regex({pattern: ratio})`); to tune one λ per group, "
      "use `jaxl2.tune_lam` with `jaxl2.make_train_step(..., lam={pattern: λ})`."
    )
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


def _model_mesh() -> Mesh | None:
  devices = jax.devices()
  return None if len(devices) == 1 else Mesh(np.asarray(devices), ("models",))


def _placed(mesh: Mesh, models: Any, shared: Any, train_data: Any, val_data: Any) -> tuple:
  """The program's inputs on ``mesh``: each device its share of the models, and everything
  else on every device (data given as a global array is gathered: each device trains whole
  models on all of it).

  Raises:
    ValueError: on several processes, data or initial models that differ between them.
  """
  check_same_everywhere(
    {"train_data": train_data, "val_data": val_data, "init_fn": shared["states"]},
    f"{HOST_DATA_FIX} `init_fn` must build the same model from the same key in every process.",
  )
  per_model, same = NamedSharding(mesh, P("models")), NamedSharding(mesh, P())
  return (
    placed_on(models, per_model),
    placed_on(shared, same),
    placed_on(train_data, same),
    placed_on(val_data, same),
  )


def _check_checkpoints(directory: Any, every: Any) -> str | None:
  directory = check_checkpoint_dir(directory)
  if every is not None:
    check_count(every, "checkpoint_every")
    if directory is None:
      raise ValueError(
        f"`checkpoint_every` ({every!r}) needs `checkpoint_dir`: pass the directory to save "
        "the sweep to, or drop `checkpoint_every`."
      )
  return directory


def _name(fn: Any) -> str | None:
  """A function's name for the fingerprint (its code cannot be compared across processes)."""
  return None if fn is None else getattr(fn, "__qualname__", type(fn).__qualname__)
