"""The λ tools on real models: linen, NNX and Equinox with BatchNorm and dropout, minibatched.

The references are written against each framework directly, in float64 and
full batch: the model's evaluation-mode function of its flat params (running
statistics, no dropout), its explicit Jacobian and output Hessian, dense linear
algebra. jaxl2 must agree while summing over batches that do not divide the
set, through its TrainStep/TrainState split of each model form.
"""

from __future__ import annotations

import warnings
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import jaxl2
from tests import helpers

LAM, N, N_VAL, BATCH = 0.5, 37, 23, 10  # 3 batches of 10 and a remainder of 7
RNG = np.random.default_rng(0)


def _data(n: int) -> dict[str, np.ndarray]:
  x = RNG.normal(size=(n, 6))
  return {"x": x, "label": (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1)}


TRAIN, VAL = _data(N), _data(N_VAL)


def _xent(logits: jax.Array, batch: Any) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


# ---- the same network in three frameworks: Dense-BatchNorm-relu-Dropout-Dense ------------


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
    return nn.Dense(3)(nn.Dropout(0.3, deterministic=not train)(x))


def _linen() -> dict[str, Any]:
  model = LinenNet()
  variables = model.init(jax.random.key(0), jnp.ones((2, 6)), train=False)
  variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables)

  def outputs(params, batch_stats, batch, key):
    train = key is not None
    out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["x"], train=train,
      mutable=["batch_stats"] if train else [], rngs={"dropout": key} if train else {},
    )  # fmt: skip
    return out, updates.get("batch_stats", batch_stats)

  def loss_fn(params, batch_stats, batch, key):
    out, new_stats = outputs(params, batch_stats, batch, key)
    return _xent(out, batch), (new_stats, {})

  def reference(state):  # eval mode, written with linen directly
    def f(params, x):
      return model.apply({"params": params, "batch_stats": state.model_state}, x, train=False)

    return state.params, f

  curvature = jaxl2.GaussNewton(lambda p, s, b, k: outputs(p, s, b, k)[0], _xent)
  return {
    "loss_fn": loss_fn, "init": (variables["params"], variables["batch_stats"]),
    "curvature": curvature, "reference": reference,
  }  # fmt: skip


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    f64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}
    self.dense = nnx.Linear(6, 8, rngs=rngs, **f64)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs, **f64)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs, **f64)

  def __call__(self, x):
    return self.head(self.drop(nnx.relu(self.bn(self.dense(x)))))


def _nnx() -> dict[str, Any]:
  def reference(state):
    graphdef = nnx.graphdef(NNXNet(nnx.Rngs(0)))

    def f(params, x):
      module = nnx.merge(graphdef, params, state.model_state)
      module.eval()
      return module(x)

    return state.params, f

  return {
    "loss_fn": lambda model, batch: _xent(model(batch["x"]), batch),
    "init": (NNXNet(nnx.Rngs(0, dropout=1)),),
    "curvature": jaxl2.GaussNewton(lambda model, batch: model(batch["x"]), _xent),
    "reference": reference,
  }


class EqxNet(eqx.Module):
  dense: eqx.nn.Linear
  bn: eqx.nn.BatchNorm
  drop: eqx.nn.Dropout
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.dense = eqx.nn.Linear(6, 8, key=k1)
    self.bn = eqx.nn.BatchNorm(8, axis_name="batch", momentum=0.5, mode="batch")
    self.drop = eqx.nn.Dropout(0.3)
    self.head = eqx.nn.Linear(8, 3, key=k2)

  def __call__(self, x, state, key):
    x, state = self.bn(self.dense(x), state)
    return self.head(self.drop(jax.nn.relu(x), key=key)), state


def _eqx_outputs(model, state, batch, key):
  keys = None if key is None else jax.random.split(key, batch["x"].shape[0])
  forward = jax.vmap(
    model, axis_name="batch", in_axes=(0, None, None if keys is None else 0), out_axes=(0, None)
  )
  return forward(batch["x"], state, keys)


def _equinox() -> dict[str, Any]:
  model, model_state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))

  def loss_fn(model, state, batch, key):
    out, state = _eqx_outputs(model, state, batch, key)
    return _xent(out, batch), (state, {})

  def reference(state):
    static = eqx.partition(model, eqx.is_inexact_array)[1]

    def f(params, x):
      module = eqx.nn.inference_mode(eqx.combine(params, static))
      return _eqx_outputs(module, state.model_state, {"x": x}, None)[0]

    return state.params, f

  curvature = jaxl2.GaussNewton(lambda m, s, b, k: _eqx_outputs(m, s, b, k)[0], _xent)
  return {
    "loss_fn": loss_fn, "init": (model, model_state), "curvature": curvature,
    "reference": reference,
  }  # fmt: skip


FORMS = {"linen": _linen, "nnx": _nnx, "equinox": _equinox}


def _trained(form: dict[str, Any]) -> tuple[jaxl2.TrainStep, jaxl2.TrainState, Any, Any]:
  """20 minibatch steps with dropout on and BatchNorm updating, float64."""
  train_data, val_data = jax.tree_util.tree_map(jnp.asarray, (TRAIN, VAL))
  train = jaxl2.make_train_step(None, form["loss_fn"], optax.adam(0.05), lam=LAM, m=N)
  state = train.init(*form["init"], seed=1)
  for i in range(20):
    rows = np.arange(i * BATCH, (i + 1) * BATCH) % N
    state, _ = train(state, jax.tree_util.tree_map(lambda x, r=rows: x[r], train_data))
  return train, state, train_data, val_data


def _reference(form: dict[str, Any], state: jaxl2.TrainState, damping: float) -> dict[str, float]:
  """The hypergradient and effective params from explicit float64 matrices, full batch."""
  params, f = form["reference"](state)
  w, unravel = ravel_pytree(params)
  x, labels = jnp.asarray(TRAIN["x"]), {"label": jnp.asarray(TRAIN["label"])}
  jac = np.asarray(jax.jacobian(lambda v: f(unravel(v), x))(w)).reshape(-1, w.size)
  logits = f(params, x)
  h_out = np.asarray(jax.hessian(lambda o: _xent(o, labels))(logits)).reshape(jac.shape[0], -1)
  g = jac.T @ h_out @ jac  # Gauss-Newton, from its definition
  # Penalized: the kernels (default mask: Dense/Linear kernels and weights, not biases or BN).
  leaves = helpers.leaves_by_path(params)  # flattening order, as ravel_pytree's
  kernel = [p.endswith(("kernel", "weight")) and "bn" not in p for p in leaves]
  c = np.concatenate(
    [np.full(np.size(v), float(k)) for v, k in zip(leaves.values(), kernel, strict=True)]
  )
  a = g + np.diag(LAM / N * c + damping)
  val = jax.grad(lambda v: _xent(f(unravel(v), jnp.asarray(VAL["x"])), {"label": VAL["label"]}))(w)
  value = -np.linalg.solve(a, np.asarray(val)) @ (c * np.asarray(w)) / N
  # A pseudo-inverse: the softmax's shift of the unpenalized output bias has no curvature.
  trace = np.trace(np.linalg.pinv(g + np.diag(LAM / N * c), hermitian=True) @ g)
  return {"value": float(value), "trace": float(trace), "penalized": int(c.sum())}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_tools_on_real_models_match_explicit_float64_matrices(name):
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # 20 steps: W* is not stationary
    form = FORMS[name]()
    train, state, train_data, val_data = _trained(form)
    damping = 1e-3
    hg = jaxl2.lam_hypergradient(
      train, state, train_data, val_data, batch_size=BATCH, curvature=form["curvature"],
      damping=damping,
    )  # fmt: skip
    ep = jaxl2.effective_params(
      train, state, train_data, batch_size=BATCH, curvature=form["curvature"], damping=0.0
    )
    reference = _reference(form, state, damping)
    evaluate = jaxl2.make_eval_step(train)
    full_val = float(evaluate(state, val_data)["loss"])
  assert reference["penalized"] == 8 * 6 + 3 * 8  # the two kernels, whatever the framework
  assert hg.curvature == "gauss_newton" and hg.damping == damping
  # Reference: explicit Jᵀ·H·J, dense solve, float64; CG to 1e-10 on a well-damped system.
  assert hg.value == pytest.approx(reference["value"], rel=1e-7)
  assert hg.val_loss == pytest.approx(full_val, rel=1e-12)  # eval mode: running statistics
  assert ep.exact and ep.value == pytest.approx(reference["trace"], rel=1e-8)
