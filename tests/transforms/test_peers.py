"""The λ conversions against the real peer libraries: Keras 3 and PyTorch.

README's table ("L2 penalty vs weight decay, in every framework") and
`to_keras_l2` / `to_weight_decay` claim that, with the converted value, Keras'
``regularizers.L2`` and torch's ``SGD(weight_decay)`` / ``Adam(weight_decay)``
are ``loss + l2_penalty(params, λ, m)``. Here each library runs its own code
(a Keras model's ``losses`` and ``fit``, torch optimizers' ``step``) on the
same weights and data, against jaxl2 + optax. Each test skips only when its
library is not installed.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxl2
from tests import helpers

LAM, M, LR = 4.0, 32, 0.1  # λ/m = 0.125: the penalty moves the weights as much as the data
IN, HIDDEN = 5, 8


def _problem(dtype):
  """Full-batch regression data (m examples) and a 5-8-1 tanh MLP's initial weights."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(M, IN)).astype(dtype)
  y = rng.normal(size=(M, 1)).astype(dtype)
  params = {
    "dense_0": {"kernel": rng.normal(size=(IN, HIDDEN)), "bias": rng.normal(size=(HIDDEN,))},
    "dense_1": {"kernel": rng.normal(size=(HIDDEN, 1)), "bias": rng.normal(size=(1,))},
  }
  return x, y, jax.tree_util.tree_map(lambda w: (0.5 * w).astype(dtype), params)


def _mlp(p, x):
  h = jnp.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
  return h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]


def _jax_trajectory(tx, loss, params, steps):
  """Params after each of ``steps`` optax steps on ``loss`` (as NumPy)."""
  trajectory = helpers.optax_trajectory(tx, loss, params, steps)
  return [jax.tree_util.tree_map(np.asarray, p) for p in trajectory]


# ---- Keras 3: regularizers.L2(to_keras_l2(λ, m)) -------------------------------------


def _keras():
  os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is first imported
  return pytest.importorskip("keras")


def _keras_model(keras, params, l2):
  """Keras' twin of `_mlp`, kernels regularized by ``L2(l2)``, biases not (jaxl2's default)."""
  model = keras.Sequential(
    [
      keras.Input((IN,)),
      keras.layers.Dense(HIDDEN, "tanh", kernel_regularizer=keras.regularizers.L2(l2)),
      keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(l2)),
    ]
  )
  for layer, name in zip(model.layers, ["dense_0", "dense_1"], strict=True):
    layer.set_weights([params[name]["kernel"], params[name]["bias"]])
  return model


def test_keras_l2_regularization_losses_equal_the_penalty():
  keras = _keras()
  _, _, params = _problem(np.float32)
  model = _keras_model(keras, params, jaxl2.to_keras_l2(LAM, M))
  assert len(model.losses) == 2  # one L2 term per kernel; biases are not regularized
  keras_term = sum(float(keras.ops.convert_to_numpy(term)) for term in model.losses)
  ours = float(jaxl2.l2_penalty(params, LAM, M))
  # float32 sums of 48 squares on both sides: a few ulps; 1e-6 relative.
  np.testing.assert_allclose(keras_term, ours, rtol=1e-6)


# Keras 3.15's JAX backend calls np.array on its own variables (NumPy 2 deprecation), not ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_keras_fit_with_l2_regularizer_follows_sgd_on_the_regularized_loss():
  keras = _keras()
  x, y, params = _problem(np.float32)
  model = _keras_model(keras, params, jaxl2.to_keras_l2(LAM, M))
  model.compile(optimizer=keras.optimizers.SGD(LR), loss="mean_squared_error")
  steps = 20
  # One batch of all m examples: Keras minimizes mean loss + Σ L2 terms, step by step.
  model.fit(x, y, batch_size=M, epochs=steps, shuffle=False, verbose=0)

  loss = jaxl2.regularized(lambda p: jnp.mean((_mlp(p, x) - y) ** 2), LAM, M)
  ours = _jax_trajectory(optax.sgd(LR), loss, jax.tree_util.tree_map(jnp.asarray, params), steps)
  for layer, name in zip(model.layers, ["dense_0", "dense_1"], strict=True):
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in (layer.kernel, layer.bias))
    # float32 on both sides (the same XLA here), sums maybe in another order: 1e-6.
    np.testing.assert_allclose(kernel, ours[-1][name]["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bias, ours[-1][name]["bias"], rtol=1e-6, atol=1e-7)


# ---- PyTorch: SGD / Adam(weight_decay=to_weight_decay(λ, m)) ------------------------


def _torch_trajectory(torch, optimizer, x, y, params, steps, weight_decay):
  """Params after each of ``steps`` torch steps: float64, kernels decayed, biases not."""
  net = torch.nn.Sequential(
    torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)
  ).double()
  layers = {"dense_0": net[0], "dense_1": net[2]}
  with torch.no_grad():
    for name, layer in layers.items():
      layer.weight.copy_(torch.from_numpy(params[name]["kernel"].T))  # torch: (out, in)
      layer.bias.copy_(torch.from_numpy(params[name]["bias"]))
  opt = optimizer(
    [
      {"params": [layer.weight for layer in layers.values()], "weight_decay": weight_decay},
      {"params": [layer.bias for layer in layers.values()], "weight_decay": 0.0},
    ],
    lr=LR,
  )
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)
  out = []
  for _ in range(steps):
    opt.zero_grad()
    torch.mean((net(xt) - yt) ** 2).backward()
    opt.step()
    out.append(
      {
        name: {
          "kernel": layer.weight.detach().numpy().T.copy(),
          "bias": layer.bias.detach().numpy().copy(),
        }
        for name, layer in layers.items()
      }
    )
  return out


def _assert_trajectories_close(a, b, rtol):
  for k, (pa, pb) in enumerate(zip(a, b, strict=True)):
    for name in pa:
      for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(
          pa[name][leaf], pb[name][leaf], rtol=rtol, atol=1e-12, err_msg=f"step {k}: {name}/{leaf}"
        )


@pytest.mark.parametrize(("name", "base"), [("SGD", optax.sgd), ("Adam", optax.adam)])
def test_torch_weight_decay_follows_the_regularized_loss(name, base):
  # torch SGD/Adam(weight_decay=wd) add wd·W to the gradient before the step (coupled L2):
  # the same as `base` on the regularized loss, and as add_l2_grad chained before `base`.
  torch = pytest.importorskip("torch")
  steps = 25
  x, y, params = _problem(np.float64)
  wd = jaxl2.to_weight_decay(LAM, M)
  theirs = _torch_trajectory(torch, getattr(torch.optim, name), x, y, params, steps, wd)
  with jax.enable_x64(True):
    data_loss = lambda p: jnp.mean((_mlp(p, x) - y) ** 2)  # noqa: E731
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    twins = {
      "penalty": (base(LR), jaxl2.regularized(data_loss, LAM, M)),
      "add_l2_grad": (optax.chain(jaxl2.add_l2_grad(LAM, M), base(LR)), data_loss),
    }
    for tx, loss in twins.values():
      # float64 on both sides, different summation orders: 1e-10 relative over 25 steps.
      _assert_trajectories_close(theirs, _jax_trajectory(tx, loss, jparams, steps), rtol=1e-10)


def test_torch_adamw_is_decoupled_not_the_penalty():
  # README: AdamW's weight_decay (torch or optax) is decoupled decay, not L2 under Adam.
  torch = pytest.importorskip("torch")
  steps = 25
  x, y, params = _problem(np.float64)
  wd = jaxl2.to_weight_decay(LAM, M)
  theirs = _torch_trajectory(torch, torch.optim.AdamW, x, y, params, steps, wd)
  with jax.enable_x64(True):
    data_loss = lambda p: jnp.mean((_mlp(p, x) - y) ** 2)  # noqa: E731
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    kernels = jax.tree_util.tree_map_with_path(lambda kp, _: kp[-1].key == "kernel", jparams)
    adamw = optax.adamw(LR, weight_decay=wd, mask=kernels)
    _assert_trajectories_close(theirs, _jax_trajectory(adamw, data_loss, jparams, steps), 1e-10)
    coupled = optax.chain(jaxl2.add_l2_grad(LAM, M), optax.adam(LR))
    l2 = _jax_trajectory(coupled, data_loss, jparams, steps)[-1]
  gap = np.abs(theirs[-1]["dense_0"]["kernel"] - l2["dense_0"]["kernel"]).max()
  assert gap > 1e-3, gap  # far apart, not rounding
