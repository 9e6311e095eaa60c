"""The general training form on real models, step for step against the loops users write.

Each reference is the loop from its framework's own documentation (flax's
TrainState with ``mutable=["batch_stats"]`` and a dropout key per step;
``nnx.Optimizer`` under ``nnx.jit``; an Equinox loop with ``eqx.nn.State``),
with ``jaxl2.l2_penalty`` added to the loss. jaxl2's step must follow it for
20 steps: params, model state and loss agree in float32 (rtol 1e-5 on the
loss, 1e-4 on weights after 20 steps of compounding rounding).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jaxl2
from tests import helpers

LAM, M, STEPS = 0.5, 640.0, 20
RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.normal(size=(16, 8, 8, 3)), jnp.float32)
LABELS = jnp.asarray(RNG.integers(0, 4, size=16))
BATCH = {"image": IMAGES, "label": LABELS, "weight": jnp.ones(16).at[::4].set(0.5)}


def _weighted_ce(logits, batch):
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return jnp.sum(batch["weight"] * per_example) / jnp.sum(batch["weight"])


def _close(a, b, rtol):
  helpers.assert_trees_close(a, b, rtol=rtol, atol=1e-6)


def _penalty_reference(params):
  """(λ/2m)·Σ‖W‖² over the kernels, float64 NumPy."""
  kernels = [
    w for p, w in helpers.leaves_by_path(params).items() if p.endswith(("kernel", "weight"))
  ]
  return helpers.ref_l2([(w, 1.0) for w in kernels], LAM, M)


# ---- Flax linen: BatchNorm + dropout, flax's TrainState loop -------------------------


class ResNetish(nn.Module):
  """A ResNet-style block (bias-free conv, BatchNorm, residual) with dropout before the head."""

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
    x = nn.relu(norm("bn_init")(nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)))
    y = norm("BatchNorm_0")(nn.Conv(8, (3, 3), use_bias=False, name="Conv_0")(x))
    x = nn.relu(x + y).mean(axis=(1, 2))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(4)(x)


def test_linen_batchnorm_dropout_matches_flax_train_state_loop():
  model = ResNetish()
  variables = model.init(jax.random.key(0), IMAGES, train=False)
  tx = optax.adam(1e-2)

  def loss_fn(params, batch_stats, batch, key):
    train = key is not None
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["image"],
      train=train,
      mutable=["batch_stats"] if train else [],
      rngs={"dropout": key} if train else {},
    )
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_stats = updates["batch_stats"] if train else batch_stats
    return _weighted_ce(logits, batch), (new_stats, {"accuracy": acc})

  train = jaxl2.make_train_step(None, loss_fn, tx, lam=LAM, m=M)
  state = train.init(variables["params"], variables["batch_stats"], seed=7)

  # The loop from flax's documentation, with the penalty in the loss.
  ref = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
  stats, root = variables["batch_stats"], jax.random.key(7)

  @jax.jit
  def ref_step(ref, stats, step):
    def objective(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": stats},
        BATCH["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(root, step)},
      )
      return _weighted_ce(logits, BATCH) + jaxl2.l2_penalty(params, LAM, M), updates

    (loss, updates), grads = jax.value_and_grad(objective, has_aux=True)(ref.params)
    return ref.apply_gradients(grads=grads), updates["batch_stats"], loss

  for step in range(STEPS):
    incoming = jax.device_get(state.params)
    state, metrics = train(state, BATCH)
    ref, stats, ref_loss = ref_step(ref, stats, step)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["penalty"]), _penalty_reference(incoming), rtol=1e-5)
    assert set(metrics) >= {"loss", "data_loss", "penalty", "weight_sq_norm", "accuracy"}
  _close(state.params, ref.params, 1e-4)
  _close(state.model_state, stats, 1e-4)  # the running statistics moved, as in the loop
  assert not np.allclose(stats["bn_init"]["mean"], variables["batch_stats"]["bn_init"]["mean"])

  # Eval mode: running statistics, no dropout, no penalty.
  evaluate = jaxl2.make_eval_step(train)
  logits = model.apply({"params": ref.params, "batch_stats": stats}, IMAGES, train=False)
  np.testing.assert_allclose(
    float(evaluate(state, BATCH)["loss"]), float(_weighted_ce(logits, BATCH)), rtol=1e-4
  )


def test_dropout_keys_are_reproducible_and_differ_per_step():
  model = ResNetish()
  variables = model.init(jax.random.key(0), IMAGES, train=False)

  def loss_fn(params, batch_stats, batch, key):
    logits = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
      mutable=["batch_stats"], rngs={"dropout": key},
    )[0]  # fmt: skip
    return _weighted_ce(logits, batch), (batch_stats, {})

  def losses(seed):
    train = jaxl2.make_train_step(None, loss_fn, optax.sgd(0.0), lam=LAM, m=M)
    state = train.init(variables["params"], variables["batch_stats"], seed=seed)
    out = []
    for _ in range(3):
      state, metrics = train(state, BATCH)
      out.append(float(metrics["data_loss"]))
    return out

  first, again, other = losses(1), losses(1), losses(2)
  assert first == again  # reproducible from the seed
  assert len(set(first)) == 3  # lr 0 and frozen stats: only the dropout mask changes per step
  assert first != other


# ---- Flax NNX: the module as it is, against nnx.Optimizer + nnx.jit ----------------------


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
    return self.head(self.dropout(x))


def test_nnx_module_matches_nnx_optimizer_loop():
  tx = optax.adam(1e-2)
  ours, theirs = NNXNet(nnx.Rngs(0, dropout=1)), NNXNet(nnx.Rngs(0, dropout=1))

  def loss_fn(model, batch):
    logits = model(batch["image"])
    return _weighted_ce(logits, batch), {
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    }

  train = jaxl2.make_train_step(None, loss_fn, tx, lam=LAM, m=M)
  state = train.init(ours)
  optimizer = nnx.Optimizer(theirs, tx, wrt=nnx.Param)

  @nnx.jit
  def ref_step(model, optimizer, batch):
    def objective(model):
      return _weighted_ce(model(batch["image"]), batch) + jaxl2.l2_penalty(model, LAM, M)

    loss, grads = nnx.value_and_grad(objective)(model)
    optimizer.update(model, grads)
    return loss

  for _ in range(STEPS):
    incoming = jax.device_get(state.params)
    state, metrics = train(state, BATCH)
    ref_loss = ref_step(theirs, optimizer, BATCH)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["penalty"]), _penalty_reference(incoming), rtol=1e-5)
  _close(state.params, nnx.state(theirs, nnx.Param), 1e-4)
  _close(state.model_state["bn"]["mean"], theirs.bn.mean, 1e-4)  # BatchStat carried
  # The penalty saw Params only: BatchStat and RNG state never enter it.
  np.testing.assert_allclose(
    float(metrics["weight_sq_norm"]),
    2 * M / LAM * _penalty_reference(jax.device_get(incoming)),
    rtol=1e-5,
  )
  theirs.eval()
  evaluate = jaxl2.make_eval_step(train)
  np.testing.assert_allclose(
    float(evaluate(state, BATCH)["loss"]), float(_weighted_ce(theirs(IMAGES), BATCH)), rtol=1e-4
  )


# ---- Equinox: eqx.nn.State, against the documented loop -----------------------------------


class EqxNet(eqx.Module):
  conv: eqx.nn.Conv2d
  bn: eqx.nn.BatchNorm
  dropout: eqx.nn.Dropout
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(3, 8, 3, key=k1)
    self.bn = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch", momentum=0.9)
    self.dropout = eqx.nn.Dropout(0.3)
    self.head = eqx.nn.Linear(8, 4, key=k2)

  def __call__(self, x, state, key):
    x = self.conv(jnp.transpose(x, (2, 0, 1)))
    x, state = self.bn(x, state)
    x = jax.nn.relu(x).mean(axis=(1, 2))
    return self.head(self.dropout(x, key=key)), state


def _eqx_loss(model, state, batch, key):
  keys = None if key is None else jax.random.split(key, len(batch["label"]))
  forward = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0 if keys is not None else None),
                     out_axes=(0, None))  # fmt: skip
  logits, state = forward(batch["image"], state, keys)
  return _weighted_ce(logits, batch), (state, {})


def test_equinox_state_matches_equinox_loop():
  tx = optax.adam(1e-2)
  model, model_state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
  train = jaxl2.make_train_step(None, _eqx_loss, tx, lam=LAM, m=M)
  state = train.init(model, model_state, seed=3)

  ref_model, ref_state = model, model_state
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  root = jax.random.key(3)

  @eqx.filter_jit
  def ref_step(model, model_state, opt_state, step):
    def objective(model):
      loss, (new_state, _) = _eqx_loss(model, model_state, BATCH, jax.random.fold_in(root, step))
      return loss + jaxl2.l2_penalty(model, LAM, M), new_state

    (loss, new_state), grads = eqx.filter_value_and_grad(objective, has_aux=True)(model)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), new_state, opt_state, loss

  for step in range(STEPS):
    kernels = jax.device_get([state.params.conv.weight, state.params.head.weight])  # not bn
    state, metrics = train(state, BATCH)
    ref_model, ref_state, opt_state, ref_loss = ref_step(ref_model, ref_state, opt_state, step)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    reference = helpers.ref_l2([(w, 1.0) for w in kernels], LAM, M)
    np.testing.assert_allclose(float(metrics["penalty"]), reference, rtol=1e-5)
  _close(state.params, eqx.filter(ref_model, eqx.is_inexact_array), 1e-4)
  # The carried eqx.nn.State (BatchNorm's running statistics) is the loop's.
  _close(state.model_state, ref_state, 1e-4)
  # Eval mode: inference_mode (no dropout) with the running statistics, as the loop's.
  inference = eqx.nn.inference_mode(ref_model)
  ref_eval, _ = _eqx_loss(inference, ref_state, BATCH, None)
  evaluate = jaxl2.make_eval_step(train)
  np.testing.assert_allclose(float(evaluate(state, BATCH)["loss"]), float(ref_eval), rtol=1e-5)


def test_simple_form_rejects_model_state():
  simple = jaxl2.make_train_step(lambda p, x: x, lambda o, y: 0.0, optax.sgd(0.1), lam=0.1, m=1)
  with pytest.raises(ValueError, match="`model_state` is for the general form"):
    simple.init({"w": jnp.ones((2, 2))}, {"x": jnp.ones(2)})


# ---- One TrainStep, several models: each state trains its own ---------------------------


class ScaledNet(nnx.Module):
  """An NNX module whose static attribute ``scale`` changes its output, not its shapes."""

  def __init__(self, scale: float, rngs: nnx.Rngs):
    self.lin = nnx.Linear(8 * 8 * 3, 4, rngs=rngs)
    self.scale = scale

  def __call__(self, x):
    return self.scale * self.lin(x.reshape(x.shape[0], -1))


def _nnx_ce(model, batch):
  return _weighted_ce(model(batch["image"]), batch)


def _eqx_mlp_loss(model, state, batch, key):
  logits = jax.vmap(model)(batch["image"].reshape(len(batch["label"]), -1))
  return _weighted_ce(logits, batch), (state, {})


def _eqx_mlp(activation):
  return eqx.nn.MLP(8 * 8 * 3, 4, 16, 2, activation=activation, key=jax.random.key(0))


@pytest.mark.parametrize(
  ("loss_fn", "make_a", "make_b"),
  [
    (_nnx_ce, lambda: ScaledNet(1.0, nnx.Rngs(0)), lambda: ScaledNet(5.0, nnx.Rngs(0))),
    (_eqx_mlp_loss, lambda: _eqx_mlp(jax.nn.relu), lambda: _eqx_mlp(jnp.tanh)),
  ],
  ids=["nnx-attribute", "equinox-activation"],
)
def test_one_train_step_trains_each_model_it_is_given(loss_fn, make_a, make_b):
  # Same shapes, another static part (an NNX attribute, an Equinox activation). Reference:
  # a fresh TrainStep for each model alone. Before the static part travelled with the
  # state, B ran A's code (and stepping A's state after init(B) ran B's).
  def alone(make):
    train = jaxl2.make_train_step(None, loss_fn, optax.adam(1e-2), lam=LAM, m=M)
    state = train.init(make())
    losses = []
    for _ in range(3):
      state, metrics = train(state, BATCH)
      losses.append(float(metrics["data_loss"]))
    return losses, state.params

  (ref_a, params_a), (ref_b, params_b) = alone(make_a), alone(make_b)
  assert abs(ref_a[0] - ref_b[0]) > 1e-3  # the two models really differ
  shared = jaxl2.make_train_step(None, loss_fn, optax.adam(1e-2), lam=LAM, m=M)
  state_a = shared.init(make_a())
  state_b = shared.init(make_b())  # after A's init, before A's first step
  got_a, got_b = [], []
  for _ in range(3):  # interleaved
    state_a, metrics_a = shared(state_a, BATCH)
    state_b, metrics_b = shared(state_b, BATCH)
    got_a.append(float(metrics_a["data_loss"]))
    got_b.append(float(metrics_b["data_loss"]))
  assert got_a == ref_a and got_b == ref_b  # the same programs: bit for bit
  helpers.assert_trees_close(state_a.params, params_a, rtol=0)
  helpers.assert_trees_close(state_b.params, params_b, rtol=0)
  evaluate = jaxl2.make_eval_step(shared)
  assert float(evaluate(state_a, BATCH)["loss"]) != float(evaluate(state_b, BATCH)["loss"])


def test_equal_models_share_one_compiled_step():
  # The static part is compared by value: a second model built the same way reuses the
  # program (one trace), so keying on it costs nothing when nothing changed.
  traces = []

  def loss_fn(model, batch):
    traces.append(1)
    return _nnx_ce(model, batch)

  train = jaxl2.make_train_step(None, loss_fn, optax.sgd(0.1), lam=LAM, m=M)
  for seed in (0, 1):
    state = train.init(ScaledNet(2.0, nnx.Rngs(seed)))
    for _ in range(2):
      state, _ = train(state, BATCH)
  assert len(traces) == 1


def _mean_ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_linen_models_differing_in_a_static_field_train_apart():
  # Linen keeps its static part (here the activation) in the module the loss closes over:
  # one TrainStep per module. Two of them, interleaved, each follow their own model.
  class Net(nn.Module):
    activation: str

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(16)(x.reshape(x.shape[0], -1))
      return nn.Dense(4)(getattr(jax.nn, self.activation)(x))

  def make(activation):
    model = Net(activation)
    params = model.init(jax.random.key(0), IMAGES)["params"]
    train = jaxl2.make_train_step(
      lambda p, x: model.apply({"params": p}, x), _mean_ce, optax.sgd(0.1), lam=LAM, m=M,
    )  # fmt: skip
    return train, train.init(params), model

  (ta, sa, ma), (tb, sb, mb) = make("relu"), make("tanh")
  for _ in range(2):
    params_a, params_b = jax.device_get((sa.params, sb.params))
    sa, metrics_a = ta(sa, (IMAGES, LABELS))
    sb, metrics_b = tb(sb, (IMAGES, LABELS))
    for model, params, metrics in ((ma, params_a, metrics_a), (mb, params_b, metrics_b)):
      logits = model.apply({"params": params}, IMAGES)
      np.testing.assert_allclose(
        float(metrics["data_loss"]), float(_mean_ce(logits, LABELS)), rtol=1e-6
      )


def _dropout_losses(seed, loss_fn=None, make=None, steps=3):
  """Data losses of ``steps`` steps at lr 0 (only dropout changes them) from ``init(make())``."""
  loss_fn = loss_fn or _nnx_dropout_loss
  train = jaxl2.make_train_step(None, loss_fn, optax.sgd(0.0), lam=LAM, m=M)
  state = train.init((make or (lambda: NNXNet(nnx.Rngs(0, dropout=1))))(), seed=seed)
  out = []
  for _ in range(steps):
    state, metrics = train(state, BATCH)
    out.append(float(metrics["data_loss"]))
  return out


def _nnx_dropout_loss(model, batch):
  model.bn.use_running_average = True  # frozen statistics: only dropout varies
  return _weighted_ce(model(batch["image"]), batch)


def test_nnx_seed_restarts_the_module_rng_streams():
  # seed=None keeps the module's own streams (the nnx.Optimizer loop's keys); an int seed
  # restarts them from key(seed): reproducible, and another seed draws other masks.
  first, again, other, own = (_dropout_losses(s) for s in (0, 0, 5, None))
  assert first == again
  assert first != other and first != own
  assert len(set(first)) == 3  # lr 0: only the dropout mask changes between steps
  reference = NNXNet(nnx.Rngs(0, dropout=1))
  reference.train()
  reference.bn.use_running_average = True
  expected = [float(_weighted_ce(reference(IMAGES), BATCH)) for _ in range(3)]
  np.testing.assert_allclose(own, expected, rtol=1e-6)


class CallTimeRngs(nnx.Module):
  """Gemma-style: the inner module takes ``rngs`` at call time; the wrapper holds them."""

  def __init__(self, rngs: nnx.Rngs):
    self.inner = NNXNet(rngs)
    self.rngs = nnx.Rngs(dropout=0)  # carried in the state, restarted by `seed`

  def __call__(self, x):
    x = nnx.relu(self.inner.bn(self.inner.conv(x))).mean(axis=(1, 2))
    return self.inner.head(self.inner.dropout(x, rngs=self.rngs))


def test_call_time_rngs_through_a_wrapper_module():
  def loss_fn(model, batch):
    model.inner.bn.use_running_average = True
    return _weighted_ce(model(batch["image"]), batch)

  first, again, other = (
    _dropout_losses(seed, loss_fn, lambda: CallTimeRngs(nnx.Rngs(0))) for seed in (0, 0, 1)
  )
  assert first == again and first != other and len(set(first)) == 3
