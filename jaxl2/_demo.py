"""`jaxl2 demo`: a λ sweep of an MLP on scikit-learn's digits, as a table, JSON and a plot."""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from jaxl2._table import text_table

__all__ = ["DEFAULT_LAMBDAS", "format_table", "plot", "run_demo"]

# Log-spaced from 0.001 to 10, plus 0: from no regularization to too much.
DEFAULT_LAMBDAS = (0.0, *np.round(np.logspace(-3, 1, 9), 4).tolist())
# Metrics are averaged over this many initializations, so the comparison
# between λ values is not one lucky draw.
N_INIT_SEEDS = 3


def format_table(result: dict[str, Any]) -> str:
  """The per-λ table of a demo result (``demo.json``'s content), best λ marked."""
  body = [
    (
      f"{row['lam']:.4g}",
      f"{row['train_accuracy']:.3f}",
      f"{row['val_accuracy']:.3f}",
      f"{row['weight_sq_norm']:.2f}",
      f"{row['penalty']:.4f}",
      "<- best (lowest val loss)" if row["lam"] == result["best_lam"] else "",
    )
    for row in result["results"]
  ]
  header = ("λ", "train acc", "val acc", "Σ‖W‖²", "penalty", "")
  return text_table(header, body, right={0, 1, 2, 3, 4})


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  """Train/validation accuracy and Σ‖W‖² against λ (symlog axis, so λ = 0 shows)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["results"]
  lams = np.array([r["lam"] for r in rows])
  positive = lams[lams > 0]
  linthresh = float(positive.min()) if positive.size else 1.0
  fig, (acc_ax, norm_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  acc_ax.plot(lams, [r["train_accuracy"] for r in rows], "o-", label="train")
  acc_ax.plot(lams, [r["val_accuracy"] for r in rows], "s-", label="validation")
  acc_ax.axvline(result["best_lam"], color="gray", ls=":", label=f"best λ = {result['best_lam']:g}")
  acc_ax.set(ylabel="accuracy", title=f"MLP on digits, m = {result['m']:g} training images")
  norm_ax.plot(lams, [r["weight_sq_norm"] for r in rows], "o-", color="C2")
  norm_ax.set(ylabel="Σ‖W‖² (penalized weights)", yscale="log", title="a large λ shrinks weights")
  for ax in (acc_ax, norm_ax):
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(0, float(lams.max()) * 1.5 if lams.max() > 0 else 1.0)
    ax.set_xlabel("λ (symlog scale; 0 = unregularized)")
    ax.grid(alpha=0.3)
  acc_ax.legend()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _progress_bar(show: bool, steps: int, n_models: int) -> tuple[Any, Any]:
  """A tqdm bar on stderr (or none) and the ``progress(done, total)`` callback that moves it."""
  bar = None
  if show:
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"training {n_models} models", unit="step", file=sys.stderr)

  def progress(done: int, total: int) -> None:
    # Several devices may report the same step: move the bar only forward.
    if bar is not None and done > bar.n:
      bar.update(done - bar.n)

  return bar, progress


def _sweep_mlp(
  lambdas: Sequence[float], data: Any, *, steps: int, hidden: int, seed: int, progress: Any
) -> Any:
  """One 64-``hidden``-10 MLP per λ and seed, trained with Adam in one `jaxl2.sweep`."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from jaxl2._sweep import sweep

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      return nn.Dense(10)(nn.relu(nn.Dense(hidden)(x)))

  model = MLP()

  def xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return sweep(
    lambda key: model.init(key, jnp.ones((1, data.x_train.shape[1])))["params"],
    lambda p, x: model.apply({"params": p}, x),
    xent,
    optax.adam(1e-2),
    (data.x_train, data.y_train),
    (data.x_val, data.y_val),
    lams=list(lambdas),
    steps=steps,
    seeds=tuple(range(seed, seed + N_INIT_SEEDS)),
    progress=progress,
  )


def run_demo(
  *,
  lambdas: Sequence[float] = DEFAULT_LAMBDAS,
  train_size: int = 100,
  steps: int = 800,
  hidden: int = 256,
  seed: int = 0,
  out: pathlib.Path = pathlib.Path("jaxl2-demo"),
  stream: TextIO | None = None,
  show_progress: bool = True,
) -> dict[str, Any]:
  """Sweeps λ for a 64-hidden-10 MLP on digits; writes ``demo.json`` and ``demo.png``.

  ``seed`` draws the train/validation split; the models are initialized from
  seeds ``seed .. seed + N_INIT_SEEDS - 1`` and their metrics averaged.

  Returns:
    The content of ``demo.json``.
  """
  import jax

  from jaxl2._datasets import load_digits

  data = load_digits(train_size=train_size, seed=seed)
  bar, progress = _progress_bar(show_progress, steps, len(lambdas) * N_INIT_SEEDS)
  result = _sweep_mlp(lambdas, data, steps=steps, hidden=hidden, seed=seed, progress=progress)
  if bar is not None:
    bar.close()
  report = {
    "dataset": "scikit-learn digits (8x8, 10 classes)",
    **result.to_dict(),
    "val_size": len(data.y_val),
    "model": f"MLP 64-{hidden}-10, Adam(1e-2), full batch, {steps} steps",
    "metrics": f"after the last step, averaged over {N_INIT_SEEDS} initializations",
    "devices": [str(d) for d in jax.devices()],
  }
  # sys.stdout is looked up now, not at import, so redirections apply.
  stream = sys.stdout if stream is None else stream
  out.mkdir(parents=True, exist_ok=True)
  (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
  plot(report, out / "demo.png")
  print(format_table(report), file=stream)
  print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}", file=stream)
  return report
