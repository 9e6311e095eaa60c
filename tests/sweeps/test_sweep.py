"""sweep: each λ's model equals training that λ alone; sharding changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2
from tests import helpers

LAMS = [0.0, 0.3, 3.0]
SEEDS = (0, 1)
STEPS = 40


def _problem():
  model = helpers.MLP(features=(16, 10))
  data = jaxl2.load_digits(train_size=60, val_size=100, seed=1)

  def init_fn(key):
    return model.init(key, jnp.ones((1, 64)))["params"]

  def apply_fn(p, x):
    return model.apply({"params": p}, x)

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return init_fn, apply_fn, xent, data


def _sweep(**kw):
  init_fn, apply_fn, xent, data = _problem()
  return jaxl2.sweep(
    init_fn,
    apply_fn,
    xent,
    optax.adam(1e-2),
    (data.x_train, data.y_train),
    (data.x_val, data.y_val),
    lams=LAMS,
    steps=STEPS,
    seeds=SEEDS,
    **kw,
  )


def test_each_lam_equals_training_it_alone_and_the_best_is_the_best_alone():
  result = _sweep()
  init_fn, apply_fn, xent, data = _problem()
  train = jaxl2.make_train_step(apply_fn, xent, optax.adam(1e-2), lam=0.0, m=len(data.y_train))
  alone_val_loss = np.zeros((len(LAMS), len(SEEDS)))
  for i, lam in enumerate(LAMS):
    for j, seed in enumerate(SEEDS):
      state = train.init(init_fn(jax.random.key(seed)), lam=lam)
      for _ in range(STEPS):
        state, _ = train(state, (data.x_train, data.y_train))
      alone = state.params
      swept = jax.tree_util.tree_map(lambda x, i=i, j=j: x[i, j], result.params)
      # float32, 40 Adam steps; vmap batches the matmuls, which may reorder sums: 1e-5.
      helpers.assert_trees_close(swept, alone, rtol=1e-5, atol=1e-6)
      sq = float(jaxl2.weight_sq_norm(alone))
      np.testing.assert_allclose(result.weight_sq_norm[i, j], sq, rtol=1e-5)
      np.testing.assert_allclose(result.penalty[i, j], lam / (2 * 60) * sq, rtol=1e-5, atol=1e-9)
      logits = apply_fn(alone, data.x_val)
      np.testing.assert_allclose(
        result.val_accuracy[i, j],
        np.mean(np.argmax(logits, -1) == np.asarray(data.y_val)),
        atol=1.5 / len(data.y_val),  # at most one borderline prediction may flip
      )
      alone_val_loss[i, j] = float(xent(logits, data.y_val))
  np.testing.assert_allclose(result.val_loss, alone_val_loss, rtol=1e-5)
  # The best λ by the models trained alone (lowest mean validation loss over seeds); the
  # runner-up is further off than the 1e-5 above, so the choice is not a rounding tie.
  means = np.sort(alone_val_loss.mean(axis=1))
  assert means[1] - means[0] > 1e-3 * means[0]
  assert result.best_lam == LAMS[int(np.argmin(alone_val_loss.mean(axis=1)))]


def test_result_shapes_best_lam_and_dict():
  result = _sweep()
  assert result.val_loss.shape == (3, 2) and result.params["Dense_0"]["kernel"].shape[:2] == (3, 2)
  norms = result.weight_sq_norm.mean(axis=1)
  assert norms[0] > norms[1] > norms[2]  # Σ‖W‖² falls as λ grows
  d = json.loads(json.dumps(result.to_dict()))
  assert d["lambdas"] == LAMS and d["best_lam"] == result.best_lam and d["m"] == 60
  assert [r["lam"] for r in d["results"]] == LAMS
  np.testing.assert_allclose(d["results"][1]["val_loss"], result.val_loss[1].mean(), rtol=1e-6)


def test_best_lam_is_the_lam_known_by_hand():
  # Ridge regression with XᵀX/n = I and y = X·w: full-batch gradient descent on
  # mean((Xv − y)²) + (λ/2m)·‖v‖² from v = 0 is, per coordinate, v ← v − lr·(2(v − w) + (λ/m)·v),
  # so after T steps v_T = v*·(1 − (1 − lr·(2 + λ/m))^T) with v* = 2w / (2 + λ/m). The
  # validation targets are X·(w/2): the validation loss ‖v − w/2‖² vanishes at λ = 2m = 8.
  x = np.sqrt(2.0) * np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])  # XᵀX/4 = I
  w = np.array([[1.0], [-2.0]])
  lams, lr, steps, m = [32.0, 0.0, 8.0, 2.0], 0.05, 200, 4
  result = jaxl2.sweep(
    lambda key: {"v": jnp.zeros((2, 1))},
    lambda p, inputs: inputs @ p["v"],
    lambda out, y: jnp.mean((out - y) ** 2),
    optax.sgd(lr),
    (jnp.asarray(x, jnp.float32), jnp.asarray(x @ w, jnp.float32)),
    (jnp.asarray(x, jnp.float32), jnp.asarray(x @ w / 2, jnp.float32)),
    lams=lams,
    steps=steps,
  )
  assert result.best_lam == 8.0
  c = np.asarray(lams) / m
  v = 2 * w.T / (2 + c[:, None]) * (1 - (1 - lr * (2 + c[:, None])) ** steps)  # (λ, 2) float64
  val_loss = np.mean((v @ x.T - (x @ w / 2).T) ** 2, axis=1)  # 0.09·5 for λ = 2 and 32, ~0 for 8
  # float32 over 200 steps against float64: 1e-5 relative, 1e-6 absolute near the zero at λ = 8.
  np.testing.assert_allclose(result.val_loss[:, 0], val_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.weight_sq_norm[:, 0], np.sum(v**2, axis=1), rtol=1e-5)


def test_progress_is_reported_from_inside_the_compiled_program():
  calls = []
  _sweep(progress=lambda done, total: calls.append((done, total)))
  # Every 40 // 20 = 2 steps, from inside the one compiled scan, ending at 40.
  assert sorted(set(calls)) == [(d, STEPS) for d in range(2, STEPS + 1, 2)]


@pytest.mark.parametrize(
  ("kw", "message"),
  [
    ({"lams": []}, "`lams` must hold at least one λ"),
    ({"lams": [0.1, -1.0]}, "`lams[1]` must be a finite number >= 0; got -1.0"),
    ({"steps": 0}, "`steps` must be an integer >= 1"),
    ({"seeds": ()}, "`seeds` must hold at least one seed"),
  ],
)
def test_bad_arguments(kw, message):
  init_fn, apply_fn, xent, data = _problem()
  args = {"lams": LAMS, "steps": STEPS, **kw}
  with pytest.raises(ValueError, match=re.escape(message)):
    jaxl2.sweep(
      init_fn,
      apply_fn,
      xent,
      optax.sgd(0.1),
      (data.x_train, data.y_train),
      (data.x_val, data.y_val),
      **args,
    )


def test_sharded_over_two_cpu_devices_equals_one_device(tmp_path):
  single = _sweep()
  # A fresh process: the device count is fixed when JAX starts. There, the sweep runs
  # once as one program and once in chunks saved to a checkpoint directory.
  code = textwrap.dedent(
    f"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import json, jax, numpy as np
    from tests.sweeps.test_sweep import _sweep
    assert len(jax.devices()) == 2
    out = {{}}
    for name, kw in (("plain", {{}}), ("chunked", {{"checkpoint_dir": {str(tmp_path)!r},
                                                 "checkpoint_every": 15}})):
      r = _sweep(**kw)
      out[name] = {{"val_loss": r.val_loss.tolist(), "sq": r.weight_sq_norm.tolist()}}
    print(json.dumps(out))
    """
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  sharded = json.loads(out.stdout.strip().splitlines()[-1])
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["30", "40"]
  for run in ("plain", "chunked"):
    # Same programs, partitioned along the model axis only: float32 noise at most.
    np.testing.assert_allclose(sharded[run]["val_loss"], single.val_loss, rtol=1e-5)
    np.testing.assert_allclose(sharded[run]["sq"], single.weight_sq_norm, rtol=1e-5)


def test_a_diverged_lam_is_marked_and_never_best():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 3)), jnp.float32)
  y = x @ jnp.ones((3, 1))
  result = jaxl2.sweep(
    lambda key: {"w": jax.random.normal(key, (3, 1))},
    lambda p, x: x @ p["w"],
    lambda out, y: jnp.mean((out - y) ** 2),
    optax.sgd(0.5),
    (x, y),
    (x, y),
    lams=[0.0, 1.0, 1000.0],  # λ/m·lr = 15.6 per step: the last run blows up
    steps=100,
  )
  assert result.diverged[:, 0].tolist() == [False, False, True]
  assert not np.isfinite(result.val_loss[2, 0])
  assert result.best_lam == 0.0  # the lowest finite validation loss, not the NaN
  rows = result.to_dict()["results"]
  assert [row["diverged"] for row in rows] == [False, False, True]
  # Regression targets: no accuracy is reported.
  assert not result.classification and "val_accuracy" not in rows[0]


def test_all_diverged_gives_no_best_lam():
  x = jnp.ones((8, 2))
  result = jaxl2.sweep(
    lambda key: {"w": jnp.ones((2, 1))},
    lambda p, x: x @ p["w"],
    lambda out, y: jnp.mean((out - y) ** 2),
    optax.sgd(10.0),
    (x, jnp.zeros((8, 1))),
    (x, jnp.zeros((8, 1))),
    lams=[1e4],
    steps=50,
  )
  assert result.diverged.all() and np.isnan(result.best_lam)


def test_second_identical_call_does_not_recompile():
  traces = []

  def apply_fn(p, x):
    traces.append(1)  # runs only while JAX traces
    return x @ p["w"]

  def loss_fn(out, y):
    return jnp.mean((out - y) ** 2)

  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 2)), jnp.float32)
  data = (x, x @ jnp.ones((2, 1)))
  opt = optax.sgd(0.1)

  def run(lams):
    return jaxl2.sweep(
      lambda key: {"w": jnp.zeros((2, 1))}, apply_fn, loss_fn, opt, data, data, lams=lams, steps=5
    )

  first = run([0.0, 1.0])
  count = len(traces)
  second = run([0.5, 2.0])  # new λ values, same shapes: the same program
  assert count > 0 and len(traces) == count
  assert not np.allclose(first.weight_sq_norm, second.weight_sq_norm)


# ---- folds and minibatches ---------------------------------------------------------------


def _regression(n=53):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=(4, 1)), jnp.float32) + 0.3 * jnp.asarray(
    rng.normal(size=(n, 1)), jnp.float32
  )
  model = helpers.MLP(features=(8, 1))

  def init_fn(key):
    return model.init(key, jnp.ones((1, 4)))["params"]

  def apply_fn(p, inputs):
    return model.apply({"params": p}, inputs)

  def mse(out, targets):
    return jnp.mean((out - targets) ** 2)

  return (x, y), init_fn, apply_fn, mse


def test_folds_with_minibatches_equal_training_each_fold_alone():
  data, init_fn, apply_fn, mse = _regression()
  lams, k, b, steps, seed = [0.0, 2.0], 5, 4, 23, 1
  result = jaxl2.sweep(
    init_fn, apply_fn, mse, optax.adam(1e-2), data, lams=lams, steps=steps, seeds=(seed,),
    folds=k, batch_size=b, metrics_fn=lambda out, y: {"mae": jnp.mean(jnp.abs(out - y))},
  )  # fmt: skip
  size = len(data[1]) // k  # 10: the 53 mod 5 = 3 last examples are left out
  n_train = (k - 1) * size
  assert result.m == n_train and result.val_loss.shape == (2, k, 1)
  everything = np.arange(k * size)
  alone_val_loss = np.zeros((len(lams), k))
  for f in range(k):
    held_out = everything[f * size : (f + 1) * size]
    part = np.setdiff1d(everything, held_out)
    train = jaxl2.make_train_step(apply_fn, mse, optax.adam(1e-2), lam=0.0, m=n_train)
    # The order the sweep's docstring states: epoch e of fold f visits the fold's training
    # examples in the order permutation(fold_in(fold_in(key(seed), 2**31 + f), e), part).
    order_key = jax.random.fold_in(jax.random.key(seed), 2**31 + f)
    for i, lam in enumerate(lams):
      state = train.init(init_fn(jax.random.key(seed)), lam=lam)
      per_epoch = n_train // b
      for step in range(steps):
        order = jax.random.permutation(jax.random.fold_in(order_key, step // per_epoch), part)
        idx = np.asarray(order)[(step % per_epoch) * b : (step % per_epoch + 1) * b]
        state, _ = train(state, (data[0][idx], data[1][idx]))
      got = jax.tree_util.tree_map(lambda w, i=i, f=f: w[i, f, 0], result.params)
      helpers.assert_trees_close(got, state.params, rtol=1e-5, atol=1e-6)
      x_val, y_val = data[0][held_out], data[1][held_out]
      out = apply_fn(state.params, x_val)
      alone_val_loss[i, f] = float(mse(out, y_val))
      np.testing.assert_allclose(result.val_loss[i, f, 0], alone_val_loss[i, f], rtol=1e-5)
      np.testing.assert_allclose(
        result.metrics["val_mae"][i, f, 0], float(jnp.mean(jnp.abs(out - y_val))), rtol=1e-5
      )
  # The best λ by the folds trained alone: the two means differ by far more than the 1e-5 above.
  means = alone_val_loss.mean(axis=1)
  assert abs(means[0] - means[1]) > 1e-3 * means.min()
  assert result.best_lam == lams[int(np.argmin(means))]
  assert result.to_dict()["folds"] == k and "val_mae" in result.to_dict()["results"][0]


def test_folds_and_val_data_are_exclusive_and_batch_size_is_checked():
  data, init_fn, apply_fn, mse = _regression()
  common = dict(lams=[0.1], steps=2)
  with pytest.raises(ValueError, match="must be None with `folds`"):
    jaxl2.sweep(init_fn, apply_fn, mse, optax.sgd(0.1), data, data, folds=3, **common)
  with pytest.raises(ValueError, match="`val_data` is needed without `folds`"):
    jaxl2.sweep(init_fn, apply_fn, mse, optax.sgd(0.1), data, **common)
  with pytest.raises(ValueError, match=r"`batch_size` must be an integer in \[1, 53\]"):
    jaxl2.sweep(init_fn, apply_fn, mse, optax.sgd(0.1), data, data, batch_size=99, **common)
  with pytest.raises(ValueError, match="`folds` must be an integer >= 2"):
    jaxl2.sweep(init_fn, apply_fn, mse, optax.sgd(0.1), data, folds=1, **common)


# ---- the general form: model state, dropout, aux ---------------------------------------------


class _BNDropout(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    # No bias before BatchNorm (its gradient is rounding noise, which Adam would amplify).
    x = nn.Dense(8, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    return nn.Dense(10)(nn.Dropout(0.3, deterministic=not train)(x))


def _bn_loss(model):
  def loss_fn(params, stats, batch, key):
    train = key is not None
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats}, batch["x"], train=train,
      mutable=["batch_stats"] if train else [], rngs={"dropout": key} if train else {},
    )  # fmt: skip
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    return loss, (updates["batch_stats"] if train else stats, {"accuracy": acc})

  return loss_fn


def test_general_form_with_batchnorm_and_dropout_equals_training_alone():
  data = jaxl2.load_digits(train_size=40, val_size=50, seed=2)
  train_data, val_data = {"x": data.x_train, "y": data.y_train}, {"x": data.x_val, "y": data.y_val}
  model = _BNDropout()
  loss_fn = _bn_loss(model)

  def init_fn(key):
    variables = model.init(key, jnp.ones((1, 64)), train=False)
    return variables["params"], variables["batch_stats"]

  lams, seed = [0.0, 1.0], 4
  # Each model of a seed trains as `train.init(..., seed=seed)` does: dropout key
  # fold_in(key(seed), step), whatever its λ (the sweep's docstring).
  result = jaxl2.sweep(
    init_fn, None, loss_fn, optax.adam(1e-2), train_data, val_data, lams=lams, steps=15,
    seeds=(seed,),
  )  # fmt: skip
  assert result.val_accuracy.shape == (2, 1) and np.isfinite(result.val_accuracy).all()
  train = jaxl2.make_train_step(None, loss_fn, optax.adam(1e-2), lam=0.0, m=40)
  for i, lam in enumerate(lams):
    state = train.init(*init_fn(jax.random.key(seed)), lam=lam, seed=seed)
    for _ in range(15):
      state, _ = train(state, train_data)
    got = jax.tree_util.tree_map(lambda w, i=i: w[i, 0], result.params)
    helpers.assert_trees_close(got, state.params, rtol=1e-5, atol=1e-6)
    metrics = jaxl2.make_eval_step(train)(state, val_data)
    np.testing.assert_allclose(result.val_loss[i, 0], float(metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(result.val_accuracy[i, 0], float(metrics["accuracy"]), rtol=1e-6)
