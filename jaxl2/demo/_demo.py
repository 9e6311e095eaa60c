"""`jaxl2 demo`: λ chosen on validation, then tested on held-out digits; a table, JSON, a plot."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from jaxl2.reports._table import text_table

__all__ = ["DEFAULT_LAMBDAS", "format_table", "format_test", "plot", "run_demo", "split_digits"]

# Log-spaced from 0.001 to 10, plus 0: from no regularization to too much.
DEFAULT_LAMBDAS = (0.0, *np.round(np.logspace(-3, 1, 9), 4).tolist())
# Metrics are averaged over this many initializations, and their spread shown,
# so the comparison between λ values is not one lucky draw.
N_INIT_SEEDS = 3

Split = tuple[np.ndarray, np.ndarray]


def split_digits(train_size: int, seed: int) -> tuple[Split, Split, Split]:
  """Train, validation and test splits of the digits: the images past ``train_size`` halved.

  The validation half chooses λ; the test half is used for nothing but the
  final accuracy, so that figure is not biased by the choice.
  """
  from jaxl2.demo._datasets import load_digits

  data = load_digits(train_size=train_size, seed=seed)
  half = len(data.y_val) // 2
  return (
    (data.x_train, data.y_train),
    (data.x_val[:half], data.y_val[:half]),
    (data.x_val[half:], data.y_val[half:]),
  )


def _spread(values: np.ndarray) -> dict[str, Any]:
  """Mean, sample standard deviation (0 for one value) and the values, as JSON."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return {"accuracy": float(values.mean()), "std": std, "per_seed": values.tolist()}


def _pm(mean: float, std: float) -> str:
  return f"{mean:.3f} ± {std:.3f}"


def format_table(result: dict[str, Any]) -> str:
  """The per-λ table of a demo result (``demo.json``'s content), the chosen λ marked."""
  body = [
    (
      f"{row['lam']:.4g}",
      f"{row['train_accuracy']:.3f}",
      _pm(row["val_accuracy"], row["val_accuracy_std"]),
      f"{row['weight_sq_norm']:.2f}",
      f"{row['penalty']:.4f}",
      "<- chosen (lowest val loss)" if row["lam"] == result["best_lam"] else "",
    )
    for row in result["results"]
  ]
  header = ("λ", "train acc", "val acc", "Σ‖W‖²", "penalty", "")
  return text_table(header, body, right={0, 1, 2, 3, 4})


def format_test(result: dict[str, Any]) -> str:
  """The held-out test accuracy at the chosen λ (and at λ = 0), in words."""
  test = result["test"]
  if test is None:
    return "every run diverged: no λ to test"
  chosen = f"λ = {test['lam']:g} (chosen)"
  lines = [
    f"test accuracy on {test['size']} held-out images (used neither for training nor for "
    "choosing λ),",
    f"mean ± std over {len(result['seeds'])} initializations:",
    f"  {chosen}  {_pm(test['accuracy'], test['std'])}",
  ]
  if test["unregularized"] is not None:
    zero = test["unregularized"]
    lines.append(f"  {'λ = 0 (no L2)':<{len(chosen)}}  {_pm(zero['accuracy'], zero['std'])}")
  return "\n".join(lines)


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
  """Accuracy (validation ± std, test at the chosen λ) and Σ‖W‖² against λ (symlog axis)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["results"]
  lams = np.array([r["lam"] for r in rows])
  positive = lams[lams > 0]
  linthresh = float(positive.min()) if positive.size else 1.0
  fig, (acc_ax, norm_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  val, val_std = (np.array([r[k] for r in rows]) for k in ("val_accuracy", "val_accuracy_std"))
  acc_ax.plot(lams, [r["train_accuracy"] for r in rows], "o-", label="train")
  acc_ax.plot(lams, val, "s-", label="validation (± std)")
  acc_ax.fill_between(lams, val - val_std, val + val_std, color="C1", alpha=0.25)
  test = result["test"]
  if test is not None:
    acc_ax.errorbar(
      [test["lam"]], [test["accuracy"]], yerr=[test["std"]], fmt="*", ms=12, color="C3",
      label=f"test at the chosen λ = {test['lam']:g}",
    )  # fmt: skip
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


def _mlp(hidden: int) -> tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]:
  """``init_fn(key)`` and ``apply_fn(params, x)`` of a 64-``hidden``-10 ReLU MLP (flax linen)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
      return nn.Dense(10)(nn.relu(nn.Dense(hidden)(x)))

  model = MLP()
  return (
    lambda key: model.init(key, jnp.ones((1, 64)))["params"],
    lambda params, x: model.apply({"params": params}, x),
  )


def _test_accuracy(apply_fn: Callable[[Any, Any], Any], params: Any, test: Split) -> np.ndarray:
  """The accuracy on ``test`` of every model of a sweep: shape (λ, seed)."""
  import jax

  from jaxl2.training._metrics import accuracy

  def one(p: Any) -> jax.Array:
    return accuracy(apply_fn(p, test[0]), test[1])

  return np.asarray(jax.jit(jax.vmap(jax.vmap(one)))(params))


def _test_report(result: Any, test_acc: np.ndarray, size: int) -> dict[str, Any] | None:
  """``demo.json``'s "test": the chosen λ's held-out accuracy, and λ = 0's when in the grid."""
  lams = [float(lam) for lam in result.lams]
  if not math.isfinite(result.best_lam):
    return None
  return {
    "size": size,
    "lam": result.best_lam,
    **_spread(test_acc[lams.index(result.best_lam)]),
    "unregularized": _spread(test_acc[lams.index(0.0)]) if 0.0 in lams else None,
    "note": "images used neither for training nor for choosing λ; mean and sample standard "
    "deviation over the initializations",
  }


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
  """Sweeps λ for a 64-hidden-10 MLP on digits, tests the chosen λ; writes JSON and a plot.

  ``seed`` draws the split (`split_digits`): ``train_size`` training images,
  then half the rest to choose λ (lowest mean validation loss) and half to
  test it. The models are initialized from seeds ``seed .. seed +
  N_INIT_SEEDS - 1``; metrics are their mean, with the standard deviation.

  Returns:
    The content of ``demo.json``.
  """
  import jax
  import optax

  from jaxl2.sweeps._sweep import sweep

  train, val, test = split_digits(train_size, seed)
  init_fn, apply_fn = _mlp(hidden)
  bar, progress = _progress_bar(show_progress, steps, len(lambdas) * N_INIT_SEEDS)
  result = sweep(
    init_fn,
    apply_fn,
    lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
    optax.adam(1e-2),
    train,
    val,
    lams=list(lambdas),
    steps=steps,
    seeds=tuple(range(seed, seed + N_INIT_SEEDS)),
    progress=progress,
  )
  if bar is not None:
    bar.close()
  summary = result.to_dict()
  for row, val_acc in zip(summary["results"], result.val_accuracy, strict=True):
    row["val_accuracy_std"] = _spread(val_acc)["std"]
  report = {
    "dataset": "scikit-learn digits (8x8, 10 classes)",
    **summary,
    "val_size": len(val[1]),
    "test": _test_report(result, _test_accuracy(apply_fn, result.params, test), len(test[1])),
    "model": f"MLP 64-{hidden}-10, Adam(1e-2), full batch, {steps} steps",
    "metrics": f"after the last step, mean (and val_accuracy_std) over {N_INIT_SEEDS} "
    "initializations",
    "devices": [str(d) for d in jax.devices()],
  }
  # sys.stdout is looked up now, not at import, so redirections apply.
  stream = sys.stdout if stream is None else stream
  out.mkdir(parents=True, exist_ok=True)
  (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
  plot(report, out / "demo.png")
  print(format_table(report), file=stream)
  print(f"\n{format_test(report)}", file=stream)
  print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}", file=stream)
  return report
