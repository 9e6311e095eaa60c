"""make_train_step / make_eval_step: same numbers as a hand-written step, compiled once."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxl2
from tests import helpers

LAM, M = 0.4, 32.0


def _kernels(params):
  """The leaves the default mask penalizes in these MLPs (Dense kernels), by path."""
  return [w for path, w in helpers.leaves_by_path(params).items() if path.endswith("kernel")]


def _reference_steps(params, batch, apply_fn, loss_fn, tx, lam, steps):
  """A hand-written regularized step: the penalty written out, value_and_grad, then optax."""
  x, y = batch
  opt_state = tx.init(params)
  out = []
  for _ in range(steps):

    def objective(p):
      return loss_fn(apply_fn(p, x), y) + lam / (2 * M) * sum(jnp.sum(w**2) for w in _kernels(p))

    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    out.append(loss)
    params = optax.apply_updates(params, updates)
  return out, params


def _mse_f64(params, batch):
  """mean((MLP(x) − y)²) for `helpers.MLP` (Dense, relu, ..., Dense) in float64 NumPy."""
  x, y = batch
  layers = sorted(params, key=lambda name: int(name.rsplit("_", 1)[1]))  # Dense_0, Dense_1, ...
  h = helpers.as_f64(x)
  for i, name in enumerate(layers):
    h = h @ helpers.as_f64(params[name]["kernel"]) + helpers.as_f64(params[name]["bias"])
    h = np.maximum(h, 0.0) if i < len(layers) - 1 else h
  return float(np.mean((h - helpers.as_f64(y)) ** 2))


@pytest.mark.parametrize("tx", [optax.sgd(0.05), optax.adam(1e-2)], ids=["sgd", "adam"])
def test_train_step_matches_hand_written_step(tx):
  params, batch, apply_fn, mse, _ = helpers.mlp_problem()
  train = jaxl2.make_train_step(apply_fn, mse, tx, lam=LAM, m=M)
  state = train.init(params)
  reference_losses, final = _reference_steps(params, batch, apply_fn, mse, tx, LAM, steps=10)
  for ref_loss in reference_losses:
    incoming = jax.device_get(state.params)  # metrics are taken here (the state is donated)
    state, metrics = train(state, batch)
    # Each metric against float64 NumPy at the incoming params; float32 forward pass
    # and sums of squares: 1e-5 relative.
    data_loss = _mse_f64(incoming, batch)
    sq_norm = sum(helpers.ref_sq_norm(w) for w in _kernels(incoming))
    penalty = helpers.ref_l2([(w, 1.0) for w in _kernels(incoming)], LAM, M)
    np.testing.assert_allclose(float(metrics["data_loss"]), data_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["weight_sq_norm"]), sq_norm, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["penalty"]), penalty, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), data_loss + penalty, rtol=1e-5)
    # The hand-written float32 step: the same ops in another fusion order, 1e-5 relative.
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
  helpers.assert_trees_close(state.params, final, rtol=1e-5, atol=1e-7)
  assert int(state.step) == 10


def test_no_retrace_over_100_steps_and_lam_is_data():
  params, batch, apply_fn, mse, _ = helpers.mlp_problem()
  traces = []

  def counting_apply(p, x):
    traces.append(1)  # runs only while tracing
    return apply_fn(p, x)

  train = jaxl2.make_train_step(counting_apply, mse, optax.sgd(0.01), lam=LAM, m=M)
  state = train.init(params)
  for _ in range(100):
    state, metrics = train(state, batch)
  assert len(traces) == 1
  state = train.set_lam(state, 3.0)
  incoming = jax.device_get(state.params)
  state, metrics = train(state, batch)
  assert len(traces) == 1  # a new λ reuses the compiled program
  expected = helpers.ref_l2([(w, 1.0) for w in _kernels(incoming)], 3.0, M)  # float64 NumPy
  np.testing.assert_allclose(float(metrics["penalty"]), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="`lam` must be a finite number >= 0"):
    train.set_lam(state, -1.0)


def test_state_is_a_checkpointable_pytree_and_is_donated():
  params, batch, apply_fn, mse, _ = helpers.mlp_problem()
  train = jaxl2.make_train_step(apply_fn, mse, optax.adam(1e-3), lam=LAM, m=M)
  state = train.init(params)
  fields = {"params", "opt_state", "step", "lam", "model_state", "key", "static"}
  assert set(state._fields) == fields
  # The simple form carries none of these (orbax round trips: tests/training/test_checkpoint.py).
  assert state.model_state is None and state.key is None and state.static is None
  saved = jax.tree_util.tree_map(np.asarray, state)  # host copies
  restored = jax.tree_util.tree_map(jnp.asarray, saved)
  new_state, _ = train(restored, batch)
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(restored.params))  # donated
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))  # init copied
  again, _ = train(jax.tree_util.tree_map(jnp.asarray, saved), batch)
  helpers.assert_trees_close(new_state.params, again.params, rtol=0)


def test_mask_reaches_the_step():
  params, batch, apply_fn, mse, _ = helpers.mlp_problem()
  train = jaxl2.make_train_step(
    apply_fn, mse, optax.sgd(0.1), lam=LAM, m=M, mask=jaxl2.all_floating
  )
  _, metrics = train(train.init(params), batch)
  expected = sum(helpers.ref_sq_norm(w) for w in jax.tree_util.tree_leaves(params))
  np.testing.assert_allclose(float(metrics["weight_sq_norm"]), expected, rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(TypeError, match="`apply_fn` must be callable"):
    jaxl2.make_train_step("model", lambda o, y: 0.0, optax.sgd(0.1), lam=0.1, m=1)
  with pytest.raises(
    TypeError, match=re.escape("`optimizer` must be an optax GradientTransformation")
  ):
    jaxl2.make_train_step(lambda p, x: x, lambda o, y: 0.0, 0.1, lam=0.1, m=1)
  with pytest.raises(ValueError, match=r"`m` .* must be a finite number > 0"):
    jaxl2.make_train_step(lambda p, x: x, lambda o, y: 0.0, optax.sgd(0.1), lam=0.1, m=0)
  train = jaxl2.make_train_step(
    lambda p, x: x,
    lambda o, y: 0.0,
    optax.sgd(0.1),
    lam=0.1,
    m=1,
    mask=jaxl2.by_name("nope", strict=False),
  )
  with pytest.raises(ValueError, match="selected no parameters"):
    train.init({"w": jnp.ones((2, 2))})


def test_eval_step_loss_and_accuracy_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=50).astype(np.int32)
  evaluate = jaxl2.make_eval_step(lambda p, x: x * p, lambda o, y: jnp.mean(o))
  out = evaluate(jnp.float32(1.0), (jnp.asarray(logits), jnp.asarray(labels)))
  np.testing.assert_allclose(float(out["accuracy"]), np.mean(logits.argmax(1) == labels), rtol=1e-6)
  np.testing.assert_allclose(float(out["loss"]), logits.mean(), rtol=1e-6)
  one_hot = np.eye(4, dtype=np.float32)[labels]
  np.testing.assert_allclose(
    float(jaxl2.accuracy(jnp.asarray(logits), jnp.asarray(one_hot))),
    np.mean(logits.argmax(1) == labels),
  )
  binary = jaxl2.accuracy(jnp.array([[2.0], [-1.0], [0.5]]), jnp.array([1, 1, 0]))
  np.testing.assert_allclose(float(binary), 1 / 3, rtol=1e-6)


# ---- Flax NNX ------------------------------------------------------------------


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(5, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_nnx_optimizer_with_penalty_equals_make_train_step():
  _, (x, y), _, mse, _ = helpers.mlp_problem()
  # Route 1: idiomatic NNX, nnx.Optimizer(wrt=nnx.Param) and the penalty in the loss.
  model = _NNXMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    def loss_fn(model):
      return mse(model(x), y) + jaxl2.l2_penalty(model, LAM, M)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  # Route 2: the same model split into graphdef + params, trained by make_train_step.
  graphdef, params = nnx.split(_NNXMLP(nnx.Rngs(0)), nnx.Param)
  train = jaxl2.make_train_step(
    lambda p, inputs: nnx.merge(graphdef, p)(inputs), mse, optax.sgd(0.05), lam=LAM, m=M
  )
  state = train.init(params)
  for _ in range(20):
    loss = nnx_step(model, optimizer, x, y)
    state, metrics = train(state, (x, y))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  helpers.assert_trees_close(nnx.state(model, nnx.Param), state.params, rtol=1e-5, atol=1e-7)


# ---- evidence on real data -------------------------------------------------------


class _DigitsMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def test_l2_on_digits_shrinks_weights_and_narrows_the_generalization_gap():
  data = jaxl2.load_digits(train_size=120, val_size=600, seed=0)
  model = _DigitsMLP()
  params = model.init(jax.random.key(0), data.x_train[:1])["params"]

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  m = len(data.y_train)
  train = jaxl2.make_train_step(apply_fn, xent, optax.adam(1e-2), lam=0.0, m=m)
  evaluate = jaxl2.make_eval_step(apply_fn, xent)
  results = {}
  for lam in [0.0, 0.3, 1.0, 3.0]:
    state = train.init(params, lam=lam)
    for _ in range(300):
      state, _ = train(state, (data.x_train, data.y_train))
    tr = evaluate(state.params, (data.x_train, data.y_train))["accuracy"]
    va = evaluate(state.params, (data.x_val, data.y_val))["accuracy"]
    results[lam] = (float(jaxl2.weight_sq_norm(state.params)), float(tr), float(va))
  norms = [results[lam][0] for lam in sorted(results)]
  assert all(a > b for a, b in itertools.pairwise(norms)), results  # strictly falls
  gap = {lam: tr - va for lam, (_, tr, va) in results.items()}
  # "Useful": validation accuracy no worse than without regularization.
  useful = max(lam for lam in results if lam > 0 and results[lam][2] >= results[0.0][2])
  assert gap[useful] < gap[0.0], results


@pytest.mark.parametrize(
  ("targets", "expected"),
  [
    (np.array([[0], [1], [2]]), 1.0),  # integer labels of shape (N, 1)
    (np.array([0, 1, 2]), 1.0),  # integer labels of shape (N,)
    (np.eye(3, dtype=np.float32), 1.0),  # one-hot, same shape as the logits
    (np.array([[0], [2], [2]]), 2 / 3),
  ],
)
def test_accuracy_reads_labels_by_shape(targets, expected):
  logits = jnp.array([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 1.0, 5.0]])
  np.testing.assert_allclose(float(jaxl2.accuracy(logits, jnp.asarray(targets))), expected)


def test_huge_integer_m_trains():
  params, batch, apply_fn, mse, _ = helpers.mlp_problem()
  m = 2_000_000_000_000
  train = jaxl2.make_train_step(apply_fn, mse, optax.sgd(0.0), lam=0.5, m=m)
  _, metrics = train(train.init(params), batch)
  kernels = [w for p, w in helpers.leaves_by_path(params).items() if p.endswith("kernel")]
  reference = helpers.ref_l2([(w, 1.0) for w in kernels], 0.5, float(m))
  np.testing.assert_allclose(float(metrics["penalty"]), reference, rtol=1e-6)


def test_lam_keeps_float64_in_a_float64_run():
  script = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, optax, jaxl2
params = {"w": jnp.ones((2, 2), jnp.float64)}
train = jaxl2.make_train_step(lambda p, x: x @ p["w"], lambda o, y: jnp.mean((o - y) ** 2),
                              optax.sgd(0.1), lam=0.1, m=3)
state = train.init(params)
tiny = train.set_lam(state, 1e-300).lam
print(state.lam.dtype, tiny.dtype, float(tiny))
"""
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, check=True
  ).stdout.split()
  assert out == ["float64", "float64", "1e-300"]  # 1e-300 underflows to 0 in float32
