"""Choosing λ without a grid: what a hypergradient costs, and `tune_lam` against a grid.

Two models on scikit-learn's digits (200 training, 500 validation images), as
users write them:

* an MLP 64-64-10 (tanh), the simple form, Adam(0.01);
* a CNN (two 3×3 convolutions with BatchNorm and ReLU, dropout, a dense head),
  the general form with linen ``batch_stats``, Adam(0.01), with
  `jaxl2.GaussNewton` for its curvature.

Per model, in one run:

1. ``hyper``: one `jaxl2.lam_hypergradient` at W* (1,500 steps) against one
   training epoch (4 minibatch steps of 50), both steady (compiled, warm,
   median of ``repeats``), with and without the Nyström preconditioner: CG
   iterations, residual, time;
2. ``tune``: `jaxl2.tune_lam` (from λ0 = 0.03, the grid's geometric middle;
   1,500 steps at the first λ, 300 warm steps at each later one) against a
   16-point log grid `jaxl2.sweep` (1e-4 to 10, 1,500 steps per λ, full
   batch as tune_lam's first training): the best validation loss each reaches,
   and the wall time of each, first call (compilation included, in a process
   that has compiled neither) and second call (compiled);
3. ``groups`` (MLP): `jaxl2.tune_lam` with one λ per group (the first and the
   second layer's kernels, ``lam={"w1": λ₁, "w2": λ₂}``, one solve per step
   for both partials) against one λ for both, with the same budget (1,500
   steps at the first λ, 300 at each later one, at most 20 λ values, λ0 =
   0.03 for every group): the validation loss each reaches, the loss of its
   params on the 1,097 held-out digits neither saw, and the wall time of each,
   first call (compilation included) and compiled (median of 3 calls, the two
   searches interleaved).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxl2
from bench.timing import measure_call

LAM0, GRID = 0.03, np.logspace(-4, 1, 16)


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _mlp_case(hidden: int) -> dict[str, Any]:
  def apply(p: Any, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  def init(key: jax.Array) -> Any:
    k1, k2 = jax.random.split(key)
    return {
      "w1": jax.random.normal(k1, (64, hidden)) / 8, "b1": jnp.zeros(hidden),
      "w2": jax.random.normal(k2, (hidden, 10)) / 8, "b2": jnp.zeros(10),
    }  # fmt: skip

  return {"name": f"MLP 64-{hidden}-10", "apply": apply, "loss": _xent, "init": init}


class _CNN(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.reshape(-1, 8, 8, 1)
    for features in (self.width, 2 * self.width):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x.mean(axis=(1, 2)))
    return nn.Dense(10)(x)


def _cnn_case(width: int) -> dict[str, Any]:
  model = _CNN(width)

  def outputs(params: Any, stats: Any, batch: Any, key: Any) -> tuple[jax.Array, Any]:
    train = key is not None
    out, updates = model.apply(
      {"params": params, "batch_stats": stats}, batch[0], train=train,
      mutable=["batch_stats"] if train else [], rngs={"dropout": key} if train else {},
    )  # fmt: skip
    return out, updates.get("batch_stats", stats)

  def loss(params: Any, stats: Any, batch: Any, key: Any) -> Any:
    out, stats = outputs(params, stats, batch, key)
    return _xent(out, batch[1]), (stats, {})

  def init(key: jax.Array) -> Any:
    variables = model.init(key, jnp.ones((1, 64)), train=False)
    return variables["params"], variables["batch_stats"]

  curvature = jaxl2.GaussNewton(
    lambda p, s, b, k: outputs(p, s, b, k)[0], lambda out, batch: _xent(out, batch[1])
  )
  return {
    "name": f"CNN {width}-{2 * width} BatchNorm dropout", "apply": None, "loss": loss,
    "init": init, "curvature": curvature,
  }  # fmt: skip


def _train(case: dict[str, Any], lam: float, m: int) -> jaxl2.TrainStep:
  return jaxl2.make_train_step(case["apply"], case["loss"], optax.adam(0.01), lam=lam, m=m)


def _init_state(train: jaxl2.TrainStep, case: dict[str, Any]) -> jaxl2.TrainState:
  start = case["init"](jax.random.key(0))
  return train.init(*start) if case["apply"] is None else train.init(start)


def _hyper_rows(case: dict[str, Any], data: tuple, steps: int, repeats: int) -> list[dict]:
  train_data, val_data = data
  m = train_data[0].shape[0]
  train = _train(case, 0.1, m)
  state = _init_state(train, case)
  for i in range(steps):
    rows = np.arange(i * 50, (i + 1) * 50) % m
    state, _ = train(state, (train_data[0][rows], train_data[1][rows]))
  epoch_batches = [(train_data[0][i::4], train_data[1][i::4]) for i in range(4)]

  def epoch() -> Any:  # four minibatch steps of 50 on a copy (the step donates its state)
    s = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    for batch in epoch_batches:
      s, metrics = train(s, batch)
    return metrics["loss"]

  epoch_s = measure_call(epoch, repeats=repeats)["median_s"]
  out = []
  for rank in (0, 64):

    def call(rank: int = rank) -> Any:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return jaxl2.lam_hypergradient(
          train, state, train_data, val_data, batch_size=50, precondition=rank,
          curvature=case.get("curvature", "auto"),
        )  # fmt: skip

    hg = call()
    hg_s = measure_call(call, repeats=repeats)["median_s"]
    out.append({
      "case": case["name"], "preconditioner_rank": rank, "cg_iterations": hg.iterations,
      "residual": hg.residual, "curvature": hg.curvature, "hypergradient_ms": 1e3 * hg_s,
      "epoch_ms": 1e3 * epoch_s, "hypergradient_vs_epoch": hg_s / epoch_s,
      "stationarity": hg.stationarity, "value": hg.value,
    })  # fmt: skip
  return out


def _timed(fn: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def _tune_row(case: dict[str, Any], data: tuple, quick: bool) -> dict[str, Any]:
  train_data, val_data = data
  m = train_data[0].shape[0]
  steps, retrain = (60, 20) if quick else (1500, 300)
  grid = GRID[::5] if quick else GRID

  def sweep() -> jaxl2.SweepResult:
    return jaxl2.sweep(
      case["init"], case["apply"], case["loss"], optax.adam(0.01), train_data, val_data,
      lams=grid, steps=steps,
    )  # fmt: skip

  def tune() -> jaxl2.TuneResult:
    train = _train(case, LAM0, m)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      return jaxl2.tune_lam(
        train, _init_state(train, case), train_data, val_data, train_steps=steps,
        retrain_steps=retrain, curvature=case.get("curvature", "auto"),
        max_iter=4 if quick else 20,
      )  # fmt: skip

  # Each first: compilation included; then each again, compiled.
  grid_result, sweep_first = _timed(sweep)
  tuned, tune_first = _timed(tune)
  _, sweep_s = _timed(sweep)
  _, tune_s = _timed(tune)
  best = int(np.nanargmin(np.where(grid_result.diverged[:, 0], np.nan, grid_result.val_loss[:, 0])))
  return {
    "case": case["name"], "grid_points": len(grid), "grid_best_lam": float(grid[best]),
    "grid_best_val_loss": float(grid_result.val_loss[best, 0]), "tune_lam": tuned.lam,
    "tune_val_loss": tuned.val_loss, "tune_lambdas_tried": len(tuned.path),
    "tune_converged": tuned.converged, "tune_reason": tuned.reason,
    "val_loss_tune_minus_grid": tuned.val_loss - float(grid_result.val_loss[best, 0]),
    "sweep_first_s": sweep_first, "tune_first_s": tune_first, "sweep_s": sweep_s,
    "tune_s": tune_s, "tune_vs_sweep_first_call": tune_first / sweep_first,
    "tune_vs_sweep": tune_s / sweep_s,
  }  # fmt: skip


def groups_row(case: dict[str, Any], data: tuple, held_out: tuple, quick: bool) -> dict:
  """Per-group λ (each layer's kernel) against one λ on the MLP, the same budget."""
  train_data, val_data = data
  m = train_data[0].shape[0]
  steps, retrain, max_iter = (60, 20, 4) if quick else (1500, 300, 20)

  def tune(lam0: Any) -> jaxl2.TuneResult:
    train = _train(case, lam0, m)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      return jaxl2.tune_lam(
        train, _init_state(train, case), train_data, val_data, train_steps=steps,
        retrain_steps=retrain, max_iter=max_iter,
      )  # fmt: skip

  row: dict[str, Any] = {"case": case["name"], "groups": "w1, w2 (kernels)", "steps": steps,
                         "retrain_steps": retrain, "max_iter": max_iter}  # fmt: skip
  starts = {"one": LAM0, "groups": {"w1": LAM0, "w2": LAM0}}
  times: dict[str, list[float]] = {name: [] for name in starts}
  for name, lam0 in starts.items():
    result, first = _timed(lambda lam0=lam0: tune(lam0))  # compilation included
    held = float(case["loss"](case["apply"](result.params, held_out[0]), held_out[1]))
    lam = result.lam if isinstance(result.lam, dict) else {"all": result.lam}
    row.update({
      f"{name}_lam": ", ".join(f"{k} {v:.3g}" for k, v in lam.items()),
      f"{name}_val_loss": result.val_loss, f"{name}_held_out_loss": held,
      f"{name}_lambdas_tried": len(result.path), f"{name}_converged": result.converged,
      f"{name}_first_s": first,
    })  # fmt: skip
  for _ in range(1 if quick else 3):  # compiled calls, interleaved: drift favours neither
    for name, lam0 in starts.items():
      times[name].append(_timed(lambda lam0=lam0: tune(lam0))[1])
  for name in starts:
    row[f"{name}_s"] = float(np.median(times[name]))
  row["val_loss_groups_minus_one"] = row["groups_val_loss"] - row["one_val_loss"]
  row["held_out_groups_minus_one"] = row["groups_held_out_loss"] - row["one_held_out_loss"]
  row["groups_vs_one_time"] = row["groups_s"] / row["one_s"]
  print(
    f"  groups {row['case']}: per-group λ ({row['groups_lam']}) val {row['groups_val_loss']:.4f}"
    f", held out {row['groups_held_out_loss']:.4f}; one λ ({row['one_lam']}) val "
    f"{row['one_val_loss']:.4f}, held out {row['one_held_out_loss']:.4f}; time "
    f"{row['groups_vs_one_time']:.2f}× one λ's",
    flush=True,
  )
  return row


def digits_sets() -> tuple[tuple, tuple]:
  """(training and validation sets, held-out set): 200, 500 and the 1,097 digits left."""
  xt, yt, xv, yv = map(jnp.asarray, jaxl2.load_digits(train_size=200, val_size=1597, seed=0))
  return ((xt, yt), (xv[:500], yv[:500])), (xv[500:], yv[500:])


def run(*, quick: bool = False, repeats: int = 20) -> list[dict[str, Any]]:
  data, held_out = digits_sets()
  cases = [_mlp_case(16 if quick else 64), _cnn_case(4 if quick else 8)]
  rows = []
  for case in cases:
    for row in _hyper_rows(case, data, 20 if quick else 1500, repeats):
      rows.append({"part": "hyper", **row})
      print(
        f"  hyper {row['case']}, rank {row['preconditioner_rank']}: one hypergradient = "
        f"{row['hypergradient_vs_epoch']:.1f} epochs ({row['cg_iterations']} CG iterations, "
        f"residual {row['residual']:.1e})",
        flush=True,
      )
    row = _tune_row(case, data, quick)
    rows.append({"part": "tune", **row})
    print(
      f"  tune {row['case']}: tune_lam val {row['tune_val_loss']:.4f} (λ {row['tune_lam']:.3g}) "
      f"vs grid best {row['grid_best_val_loss']:.4f} (λ {row['grid_best_lam']:.3g}); time "
      f"{row['tune_vs_sweep_first_call']:.2f}× the sweep's first call, "
      f"{row['tune_vs_sweep']:.2f}× compiled",
      flush=True,
    )
  rows.append({"part": "groups", **groups_row(cases[0], data, held_out, quick)})
  return rows
