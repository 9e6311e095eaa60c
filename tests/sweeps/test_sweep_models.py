"""sweep takes every model form make_train_step takes, and a λ's run ignores the rest of the grid.

Reference everywhere: `jaxl2.make_train_step` training the same model alone
(``init(model, model_state, seed=seed)``, full batch), evaluated by
`jaxl2.make_eval_step`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxl2
from tests import helpers
from tests import sweep_faults as small
from tests.training.test_training_models import (
  BATCH,
  EqxNet,
  NNXNet,
  ScaledNet,
  _eqx_loss,
  _eqx_mlp_loss,
  _nnx_ce,
  _weighted_ce,
)

LAMS, SEEDS, STEPS = [0.0, 3.0], (0, 1), 3
M = len(BATCH["label"])


def _eqx_mlp(activation):
  def init_fn(key):
    return eqx.nn.MLP(8 * 8 * 3, 4, 16, 2, activation=activation, key=key)

  return init_fn


def _nnx_loss(model, batch):
  logits = model(batch["image"])
  return _weighted_ce(logits, batch), {
    "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  }


FORMS = {
  # An NNX module with BatchNorm and dropout (its RNG streams restarted from key(seed)).
  "nnx": (lambda key: NNXNet(nnx.Rngs(key)), _nnx_loss),
  # An Equinox module with eqx.nn.State: init_fn returns (module, state).
  "equinox-state": (lambda key: eqx.nn.make_with_state(EqxNet)(key), _eqx_loss),
  # eqx.nn.MLP holds its activation, a function, as a leaf.
  "equinox-mlp": (_eqx_mlp(jax.nn.relu), _eqx_mlp_loss),
}


def _check_against_alone(result, init_fn, loss_fn):
  # One TrainStep for every λ and seed: it compiles once.
  train = jaxl2.make_train_step(None, loss_fn, optax.sgd(0.1), lam=0.0, m=M)
  evaluate = jaxl2.make_eval_step(train)
  for i, lam in enumerate(LAMS):
    for j, seed in enumerate(SEEDS):
      model = init_fn(jax.random.key(seed))
      state = train.init(*(model if isinstance(model, tuple) else (model,)), lam=lam, seed=seed)
      for _ in range(STEPS):
        state, _ = train(state, BATCH)
      swept = jax.tree_util.tree_map(lambda x, i=i, j=j: x[i, j], result.params)
      # float32, 3 steps; vmap over models may reorder sums: 1e-5 (1e-6 near a zero loss).
      helpers.assert_trees_close(swept, state.params, rtol=1e-5, atol=1e-6)
      want = float(evaluate(state, BATCH)["loss"])
      np.testing.assert_allclose(result.val_loss[i, j], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", list(FORMS))
def test_modules_sweep_as_make_train_step_trains_them(form):
  init_fn, loss_fn = FORMS[form]
  # SGD, not Adam: a bias before BatchNorm has a gradient of rounding noise, which Adam
  # would blow up to full-size steps in both runs, differently.
  result = jaxl2.sweep(
    init_fn, None, loss_fn, optax.sgd(0.1), BATCH, BATCH, lams=LAMS, steps=STEPS, seeds=SEEDS
  )
  assert result.val_loss.shape == (len(LAMS), len(SEEDS)) and not result.diverged.any()
  _check_against_alone(result, init_fn, loss_fn)


@pytest.mark.parametrize(
  ("loss_fn", "first", "second"),
  [
    (_eqx_mlp_loss, _eqx_mlp(jax.nn.relu), _eqx_mlp(jnp.tanh)),
    (_nnx_ce, lambda key: ScaledNet(1.0, nnx.Rngs(key)), lambda key: ScaledNet(5.0, nnx.Rngs(key))),
  ],
  ids=["equinox-activation", "nnx-attribute"],
)
def test_a_second_sweep_of_another_static_part_runs_that_model(loss_fn, first, second):
  # Same shapes, functions and optimizer object (so the program cache is consulted), another
  # activation or NNX attribute: the second sweep must train its own model.
  optimizer = optax.sgd(0.1)
  run = lambda init_fn: jaxl2.sweep(  # noqa: E731
    init_fn, None, loss_fn, optimizer, BATCH, BATCH, lams=LAMS, steps=STEPS, seeds=SEEDS
  )
  a, b = run(first), run(second)
  assert not np.allclose(a.val_loss, b.val_loss, rtol=1e-3)
  _check_against_alone(b, second, loss_fn)


def test_seeds_whose_models_differ_in_their_static_part_are_an_error():
  def init_fn(key):  # another activation for the second seed
    return _eqx_mlp(jax.nn.relu if int(jax.random.key_data(key)[-1]) == 0 else jnp.tanh)(key)

  with pytest.raises(ValueError, match=r"differ in more than their arrays for seeds 0 and 1"):
    jaxl2.sweep(init_fn, None, _eqx_mlp_loss, optax.sgd(0.1), BATCH, BATCH, lams=[0.0], steps=1,
                seeds=(0, 1))  # fmt: skip


def test_a_lams_run_does_not_depend_on_the_rest_of_the_grid():
  # Dropout, a running statistic and minibatches: every key and the batch order must come
  # from the model's own λ, seed and fold, never from its position in the grid.
  def run(lams, seeds, folds):
    data = small._data(40, 0)
    return jaxl2.sweep(
      small._init, None, small._loss, optax.sgd(0.1), data, lams=lams, steps=12, seeds=seeds,
      batch_size=8, folds=folds,
    )  # fmt: skip

  # λ = 3 and seed 5: third λ and second seed of one grid, first of each in the other.
  big, other = run([0.0, 0.5, 3.0], (4, 5), 2), run([3.0, 7.0], (5,), 2)
  here = jax.tree_util.tree_map(lambda x: x[2, :, 1], big.params)
  there = jax.tree_util.tree_map(lambda x: x[0, :, 0], other.params)
  # Exact on CPU here; vmap over another number of models could reorder sums elsewhere: 1e-6.
  helpers.assert_trees_close(here, there, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(big.val_loss[2, :, 1], other.val_loss[0, :, 0], rtol=1e-6)


def test_lam_is_stored_in_the_params_accumulation_dtype():
  # float64 params under x64: λ must be float64 too. Reference: the penalty (λ/2m)·Σ‖W‖² in
  # float64 with λ = 0.3 exactly, and make_train_step (whose λ is float64) trained alone.
  with jax.enable_x64(True):
    x = np.random.default_rng(0).normal(size=(20, 3))
    data = (x, x @ np.ones((3, 1)))
    init_fn = lambda key: {"w": jnp.full((3, 1), 2.0)}  # noqa: E731
    apply_fn = lambda p, inputs: inputs @ p["w"]  # noqa: E731
    mse = lambda out, y: jnp.mean((out - y) ** 2)  # noqa: E731
    result = jaxl2.sweep(init_fn, apply_fn, mse, optax.sgd(0.05), data, data, lams=[0.3],
                         steps=20)  # fmt: skip
    train = jaxl2.make_train_step(apply_fn, mse, optax.sgd(0.05), lam=0.3, m=20)
    state = train.init(init_fn(None))
    for _ in range(20):
      state, _ = train(state, data)
  assert state.lam.dtype == np.float64 and result.params["w"].dtype == np.float64
  np.testing.assert_allclose(result.params["w"][0, 0], state.params["w"], rtol=1e-14)
  sq = float(np.sum(np.asarray(state.params["w"]) ** 2))
  np.testing.assert_allclose(result.penalty[0, 0], 0.3 / 40 * sq, rtol=1e-14)
