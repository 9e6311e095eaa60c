"""add_l2_grad and the λ conversions: each equivalence proven numerically."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

import jaxl2
from tests import helpers

LAM, M, LR, STEPS = 0.5, 64.0, 0.05, 100


def _run(tx, loss, params, steps=STEPS):
  return helpers.optax_trajectory(tx, loss, params, steps)


def test_sgd_penalty_equals_add_l2_grad_equals_add_decayed_weights():
  with jax.enable_x64(True):
    params, _, _, _, loss = helpers.mlp_problem(dtype=jnp.float64)
    mask = helpers.kernel_mask(params)
    by_penalty = _run(optax.sgd(LR), jaxl2.regularized(loss, LAM, M), params)
    by_transform = _run(optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(LR)), loss, params)
    by_optax = _run(
      optax.chain(optax.add_decayed_weights(jaxl2.to_weight_decay(LAM, M), mask), optax.sgd(LR)),
      loss,
      params,
    )
    # float64: the three differ only by summation order, ~1e-16 per step.
    for a, b, c in zip(by_penalty, by_transform, by_optax, strict=True):
      helpers.assert_trees_close(a, b, rtol=0, atol=1e-10)
      helpers.assert_trees_close(a, c, rtol=0, atol=1e-10)
    moved = np.abs(
      helpers.as_f64(by_penalty[-1]["Dense_0"]["kernel"]) - params["Dense_0"]["kernel"]
    )
    assert moved.max() > 1e-3  # the comparison is not of frozen parameters


def test_lam_schedule_matches_penalty_following_the_same_schedule():
  schedule = optax.linear_schedule(init_value=2.0, end_value=0.1, transition_steps=50)
  with jax.enable_x64(True):
    params, _, _, _, loss = helpers.mlp_problem(dtype=jnp.float64)
    by_transform = _run(optax.chain(jaxl2.add_l2_grad(schedule, M), optax.sgd(LR)), loss, params)

    # Both sides jitted, so XLA fuses (and rounds) them alike.
    @jax.jit
    def reference_step(p, t):
      lam_t = schedule(t)  # evaluated at the int32 count, as the transform does
      g = jax.grad(lambda q: loss(q) + jaxl2.l2_penalty(q, lam_t, M))(p)
      return jax.tree_util.tree_map(lambda w, gw: w - LR * gw, p, g)

    p = params
    for t in range(STEPS):
      p = reference_step(p, jnp.asarray(t, jnp.int32))
      helpers.assert_trees_close(p, by_transform[t], rtol=0, atol=1e-10)


def test_multipliers_and_masks_are_shared_with_the_penalty():
  mask = jaxl2.by_regex({r".*kernel": 1.0, r".*bias": 0.25})
  with jax.enable_x64(True):
    params, _, _, _, loss = helpers.mlp_problem(dtype=jnp.float64)
    a = _run(optax.sgd(LR), jaxl2.regularized(loss, LAM, M, mask=mask), params, steps=20)
    b = _run(optax.chain(jaxl2.add_l2_grad(LAM, M, mask=mask), optax.sgd(LR)), loss, params, 20)
    helpers.assert_trees_close(a[-1], b[-1], rtol=0, atol=1e-10)


def test_adam_with_l2_is_not_adamw():
  with jax.enable_x64(True):
    params, _, _, _, loss = helpers.mlp_problem(dtype=jnp.float64)
    lam = 20.0  # strong enough that the decay term matters
    coupled = _run(optax.adam(LR), jaxl2.regularized(loss, lam, M), params)
    coupled_tx = _run(optax.chain(jaxl2.add_l2_grad(lam, M), optax.adam(LR)), loss, params)
    decoupled = _run(
      optax.adamw(LR, weight_decay=jaxl2.to_weight_decay(lam, M), mask=helpers.kernel_mask(params)),
      loss,
      params,
    )
    # Coupled L2 through Adam: the penalty and the transform agree (float64)...
    helpers.assert_trees_close(coupled[-1], coupled_tx[-1], rtol=0, atol=1e-10)
    # ...while AdamW parts ways: Adam divides the L2 gradient by √v, AdamW does not.
    gaps = [
      float(
        np.max(
          np.abs(helpers.as_f64(a["Dense_0"]["kernel"]) - helpers.as_f64(b["Dense_0"]["kernel"]))
        )
      )
      for a, b in zip(coupled, decoupled, strict=True)
    ]
    assert gaps[-1] > 1e-2 and gaps[-1] > 10 * gaps[0]


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_ridge_optimum_equals_sklearn(lam):
  rng = np.random.default_rng(0)
  m, d = 60, 4
  x = rng.normal(size=(m, d))
  y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=m) + 2.0
  with jax.enable_x64(True):
    params = {"kernel": jnp.zeros((d, 1)), "bias": jnp.zeros(1)}  # default mask: kernel only

    def objective(p):
      pred = (jnp.asarray(x) @ p["kernel"] + p["bias"])[:, 0]
      return jnp.mean((jnp.asarray(y) - pred) ** 2) + jaxl2.l2_penalty(p, lam, m)

    opt = _newton(objective, params, iterations=1)  # quadratic: one Newton step is exact
  ridge = Ridge(alpha=jaxl2.to_sklearn_alpha(lam)).fit(x, y)
  np.testing.assert_allclose(np.asarray(opt["kernel"])[:, 0], ridge.coef_, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(float(opt["bias"][0]), ridge.intercept_, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.5, 2.0, 8.0])
def test_logistic_regression_optimum_equals_sklearn(lam):
  rng = np.random.default_rng(1)
  m, d = 80, 3
  x = rng.normal(size=(m, d))
  y = (x @ np.array([1.5, -2.0, 0.5]) + 0.5 * rng.normal(size=m) > 0).astype(np.float64)
  with jax.enable_x64(True):
    params = {"kernel": jnp.zeros((d, 1)), "bias": jnp.zeros(1)}

    def objective(p):
      logits = (jnp.asarray(x) @ p["kernel"] + p["bias"])[:, 0]
      bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(y)))
      return bce + jaxl2.l2_penalty(p, lam, m)

    opt = _newton(objective, params, iterations=30)
  clf = LogisticRegression(C=jaxl2.to_sklearn_C(lam), tol=1e-12, max_iter=10_000).fit(x, y)
  np.testing.assert_allclose(np.asarray(opt["kernel"])[:, 0], clf.coef_[0], rtol=1e-5)
  np.testing.assert_allclose(float(opt["bias"][0]), clf.intercept_[0], rtol=1e-5)


def _newton(objective, params, iterations):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  f = lambda v: objective(unravel(v))  # noqa: E731
  for _ in range(iterations):
    flat = flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))
  return unravel(flat)


@pytest.mark.parametrize(
  ("fn", "args", "expected"),
  [
    (jaxl2.to_weight_decay, (0.5, 1000), 0.5 / 1000),
    (jaxl2.to_keras_l2, (0.5, 1000), 0.5 / 2000),
    (jaxl2.to_sklearn_alpha, (0.5,), 0.25),
    (jaxl2.to_sklearn_C, (0.5,), 2.0),
    (jaxl2.to_sklearn_C, (0.0,), float("inf")),
  ],
)
def test_conversion_values(fn, args, expected):
  assert fn(*args) == expected


# Keras and torch themselves, with these conversions: tests/transforms/test_peers.py.


@pytest.mark.parametrize(
  ("call", "error", "message"),
  [
    (lambda: jaxl2.add_l2_grad(-1.0, 10), ValueError, "`lam` must be a finite number >= 0"),
    (lambda: jaxl2.add_l2_grad(float("nan"), 10), ValueError, "got nan"),
    (lambda: jaxl2.add_l2_grad(0.1, 0), ValueError, "`m` (the number of training inputs)"),
    (lambda: jaxl2.add_l2_grad(lambda c: -1.0, 10), ValueError, "`lam(0)` must be a finite"),
    (lambda: jaxl2.to_weight_decay(-1.0, 10), ValueError, "`lam` must be"),
    (lambda: jaxl2.to_sklearn_C("1"), TypeError, "`lam` must be a real number"),
  ],
)
def test_bad_construction(call, error, message):
  with pytest.raises(error, match=re.escape(message)):
    call()


def test_update_without_params_is_an_error():
  tx = jaxl2.add_l2_grad(0.1, 10)
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=re.escape("`add_l2_grad` needs the current parameters")):
    tx.update(params, tx.init(params))


def test_bad_mask_fails_at_init():
  with pytest.raises(ValueError, match="selected no parameters"):
    jaxl2.add_l2_grad(0.1, 10, mask=jaxl2.by_name("weight", strict=False)).init(
      {"w": jnp.ones((2, 2))}
    )
  with pytest.raises(ValueError, match="`by_name` 'weight' matches no leaf"):
    jaxl2.add_l2_grad(0.1, 10, mask=jaxl2.by_name("weight")).init({"w": jnp.ones((2, 2))})


def test_add_l2_grad_passes_unselected_updates_through_untouched():
  # Nothing is traced for a leaf the mask leaves out (no zeros filled, none added): its
  # update comes out as the very input, which keeps the step's compile time at the
  # hand-written update's. The selected leaves get u + (λ/m)·W exactly.
  params = {
    "dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones(4)},
    "ln": {"scale": jnp.ones(4)},
  }
  grads = jax.tree_util.tree_map(lambda w: 0.5 * jnp.ones_like(w), params)
  tx = jaxl2.add_l2_grad(LAM, M)
  state = tx.init(params)
  closed = jax.make_jaxpr(lambda g: tx.update(g, state, params)[0])(grads)
  ins, outs = closed.jaxpr.invars, closed.jaxpr.outvars
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
  passed = {path for path, a, b in zip(paths, ins, outs, strict=True) if a is b}
  assert passed == {"['dense']['bias']", "['ln']['scale']"}
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(
    np.asarray(updates["dense"]["kernel"]), np.float32(0.5) + np.float32(LAM / M) * np.float32(2.0)
  )


def test_count_advances_for_a_schedule_only():
  params = {"w": jnp.ones((2, 2))}
  constant, scheduled = jaxl2.add_l2_grad(LAM, M), jaxl2.add_l2_grad(lambda n: LAM, M)
  for tx, after_three in ((constant, 0), (scheduled, 3)):
    state = tx.init(params)
    for _ in range(3):
      _, state = jax.jit(tx.update)(params, state, params)
    assert int(state.count) == after_three
  # A constant λ's step carries the state through: no kernel computes it.
  state = constant.init(params)
  closed = jax.make_jaxpr(lambda s: constant.update(params, s, params)[1])(state)
  assert closed.jaxpr.outvars == closed.jaxpr.invars


def test_complex_weights_decay_toward_zero_like_add_decayed_weights():
  params = {"w": jnp.full((2, 2), 1j, jnp.complex64)}
  zero = {"w": jnp.zeros((2, 2), jnp.complex64)}
  ours = optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(1.0))
  theirs = optax.chain(optax.add_decayed_weights(jaxl2.to_weight_decay(LAM, M)), optax.sgd(1.0))
  for tx in (ours, theirs):
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # W = i shrinks to (1 − λ/m)·i: the imaginary part falls, never grows.
    np.testing.assert_allclose(np.asarray(new["w"]), (1 - LAM / M) * 1j, rtol=1e-6)


@pytest.mark.parametrize("m", [2_000_000_000_000, np.int64(2_000_000_000_000)])
def test_huge_integer_m_in_add_l2_grad(m):
  params = {"w": jnp.full((2, 2), 3.0)}
  tx = jaxl2.add_l2_grad(0.5, m)
  updates, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["w"]), 0.5 / 2e12 * 3.0, rtol=1e-7)
