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
  assert {"dataset", "m", "lambdas", "best_lam", "results"} <= set(report)
  assert report["lambdas"] == [0.0, 0.1, 5.0] and report["m"] == 40
  _check_against_training_alone(report)
  keys = {
    "lam",
    "train_accuracy",
    "val_accuracy",
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
  assert "train acc" in table and "<- best" in table and "demo.json" in table


def _check_against_training_alone(report):
  """Each λ's validation loss and the best λ, against the demo's MLP trained alone per seed."""

  class MLP(nn.Module):  # the demo's 64-8-10 MLP (--hidden 8)
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(8)(x)))

  model, data = MLP(), jaxl2.load_digits(train_size=40, seed=0)  # the demo's default split

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  train = jaxl2.make_train_step(
    lambda p, x: model.apply({"params": p}, x), xent, optax.adam(1e-2), lam=0.0, m=40
  )
  val_loss = np.zeros((len(report["lambdas"]), len(report["seeds"])))
  for i, lam in enumerate(report["lambdas"]):
    for j, seed in enumerate(report["seeds"]):
      state = train.init(model.init(jax.random.key(seed), jnp.ones((1, 64)))["params"], lam=lam)
      for _ in range(4):  # --steps 4, full batch
        state, _ = train(state, (data.x_train, data.y_train))
      val_loss[i, j] = xent(model.apply({"params": state.params}, data.x_val), data.y_val)
  means = val_loss.mean(axis=1)
  # float32 and vmap's reordered sums: 1e-5; the best and the runner-up differ by far more.
  np.testing.assert_allclose([r["val_loss"] for r in report["results"]], means, rtol=1e-5)
  assert np.diff(np.sort(means))[0] > 1e-4 * means.min()
  assert report["best_lam"] == report["lambdas"][int(np.argmin(means))]


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
