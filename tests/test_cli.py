"""The `jaxl2` command line: the demo at a tiny size, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import pytest

import jaxl2
from jaxl2.cli import main

TINY = ["--train-size", "40", "--steps", "4", "--hidden", "8", "--no-progress"]


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
  # main() sets XLA_FLAGS for the process it runs in; keep it out of other tests.
  monkeypatch.setenv("XLA_FLAGS", "")


def test_help_and_version(capsys):
  assert main([]) == 0
  assert "usage: jaxl2" in capsys.readouterr().out
  out = subprocess.run(
    [sys.executable, "-m", "jaxl2", "--version"], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == f"jaxl2 {jaxl2.__version__}"


def test_demo_writes_json_of_the_schema_and_a_png(tmp_path, capsys):
  assert main(["demo", *TINY, "--lambdas", "0,0.1,5", "--out", str(tmp_path / "o")]) == 0
  report = json.loads((tmp_path / "o" / "demo.json").read_text())
  assert {"dataset", "m", "lambdas", "best_lam", "results", "test"} <= set(report)
  assert report["lambdas"] == [0.0, 0.1, 5.0] and report["m"] == 40
  _check_against_training_alone(report)
  keys = {
    "lam",
    "train_accuracy",
    "val_accuracy",
    "val_accuracy_std",
    "train_loss",
    "val_loss",
    "weight_sq_norm",
    "penalty",
  }
  for row, lam in zip(report["results"], report["lambdas"], strict=True):
    assert keys <= set(row) and row["lam"] == lam
    assert 0.0 <= row["val_accuracy"] <= 1.0 and row["weight_sq_norm"] > 0
    assert row["penalty"] == pytest.approx(lam / (2 * 40) * row["weight_sq_norm"], rel=1e-5)
  image = matplotlib.image.imread(tmp_path / "o" / "demo.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  table = capsys.readouterr().out
  assert "train acc" in table and "<- chosen" in table and "demo.json" in table
  test = report["test"]
  assert f"λ = {test['lam']:g} (chosen)  {test['accuracy']:.3f} ± {test['std']:.3f}" in table
  assert f"λ = 0 (no L2)     {test['unregularized']['accuracy']:.3f} ± " in table


def _check_against_training_alone(report):
  """Validation loss and spread, the chosen λ and its test accuracy, against the demo's MLP
  trained alone per seed on the split the demo documents (the images after the training
  ones, halved: the first half chooses λ, the second tests it)."""

  class MLP(nn.Module):  # the demo's 64-8-10 MLP (--hidden 8)
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(8)(x)))

  model, data = MLP(), jaxl2.load_digits(train_size=40, seed=0)  # the demo's default split
  half = len(data.y_val) // 2
  x_val, y_val, x_test, y_test = (
    data.x_val[:half],
    data.y_val[:half],
    data.x_val[half:],
    data.y_val[half:],
  )
  assert (report["val_size"], report["test"]["size"]) == (half, len(y_test))

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  train = jaxl2.make_train_step(
    lambda p, x: model.apply({"params": p}, x), xent, optax.adam(1e-2), lam=0.0, m=40
  )
  shape = (len(report["lambdas"]), len(report["seeds"]))
  val_loss, val_acc, test_acc = np.zeros(shape), np.zeros(shape), np.zeros(shape)
  for i, lam in enumerate(report["lambdas"]):
    for j, seed in enumerate(report["seeds"]):
      state = train.init(model.init(jax.random.key(seed), jnp.ones((1, 64)))["params"], lam=lam)
      for _ in range(4):  # --steps 4, full batch
        state, _ = train(state, (data.x_train, data.y_train))
      logits = model.apply({"params": state.params}, x_val)
      val_loss[i, j] = xent(logits, y_val)
      val_acc[i, j] = np.mean(np.argmax(logits, -1) == y_val)
      test_logits = model.apply({"params": state.params}, x_test)
      test_acc[i, j] = np.mean(np.argmax(test_logits, -1) == y_test)
  means = val_loss.mean(axis=1)
  # float32 and vmap's reordered sums: 1e-5; the best and the runner-up differ by far more.
  np.testing.assert_allclose([r["val_loss"] for r in report["results"]], means, rtol=1e-5)
  assert np.diff(np.sort(means))[0] > 1e-4 * means.min()
  best = int(np.argmin(means))
  assert report["best_lam"] == report["lambdas"][best]
  # The spread is the sample standard deviation over the seeds (numpy float64, ddof=1).
  np.testing.assert_allclose(
    [r["val_accuracy_std"] for r in report["results"]], val_acc.std(axis=1, ddof=1), atol=1e-6
  )
  # The test figures are the held-out half's, at the λ chosen on validation, and at λ = 0.
  for entry, i in ((report["test"], best), (report["test"]["unregularized"], 0)):
    np.testing.assert_allclose(entry["per_seed"], test_acc[i], atol=1e-6)
    assert entry["accuracy"] == pytest.approx(test_acc[i].mean(), abs=1e-6)
    assert entry["std"] == pytest.approx(test_acc[i].std(ddof=1), abs=1e-6)


def test_python_dash_m_demo_runs(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "jaxl2", "demo", *TINY, "--lambdas", "0,1", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "demo.json").exists() and (tmp_path / "demo.png").exists()


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--lambdas", "0,-1"], "argument --lambdas: `λ` must be a finite number >= 0; got -1.0"),
    (["--lambdas", "0,abc"], "λ must be numbers separated by commas"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--train-size", "5000"], "--train-size: `train_size` must be an integer in [1, 1796]"),
    (["--train-size", "0"], "--train-size: `train_size` must be an integer in [1, 1796]"),
    (["--steps", "0"], "argument --steps: expected a positive integer; got 0"),
    (["--steps", "x"], "expected a positive integer; got 'x'"),
    (["--out", "/proc/forbidden/dir"], "argument --out: cannot write to '/proc/forbidden/dir'"),
  ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(["demo", *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_in_a_real_process_has_no_traceback():
  out = subprocess.run(
    [sys.executable, "-m", "jaxl2", "demo", "--lambdas", "-3"], capture_output=True, text=True
  )
  assert out.returncode == 2
  assert "Traceback" not in out.stderr and "must be a finite number >= 0" in out.stderr
