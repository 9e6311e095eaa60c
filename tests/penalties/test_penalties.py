"""l2_penalty, l2_penalty_grad and regularized against float64 references."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxl2
from tests import helpers

LAM, M = 0.3, 50.0

# ---- values against the float64 NumPy reference ------------------------------


def _kernels_only(tree):
  """Reference selection for the default mask, written without jaxl2."""
  return [
    (w, 1.0)
    for w in helpers.leaves_by_path(tree).values()
    if jnp.issubdtype(w.dtype, jnp.inexact) and w.ndim >= 2
  ]


def _trees():
  mlp = helpers.randomize(helpers.linen_mlp_params(0), seed=1)
  cnn = helpers.randomize(helpers.linen_cnn_variables(0), seed=2)
  nested = {
    "a": [jnp.arange(6.0).reshape(2, 3), (jnp.ones((2, 2)), jnp.ones(3))],
    "b": {"c": jnp.full((3, 1), -2.0), "scalar": jnp.float32(4.0)},
  }
  return {"linen_mlp": mlp, "linen_cnn_with_norms": cnn, "nested": nested}


@pytest.mark.parametrize("name", list(_trees()))
def test_value_matches_float64_reference(name):
  tree = _trees()[name]
  expected = helpers.ref_l2(_kernels_only(tree), LAM, M)
  got = jaxl2.l2_penalty(tree, LAM, M)
  assert got.dtype == jnp.float32 and got.shape == ()
  # float32 accumulation of O(100) terms: relative error well under 1e-6.
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_cnn_default_mask_skips_norm_scales_and_batch_stats():
  variables = helpers.linen_cnn_variables(0)
  rows = {r.path: r.selected for r in jaxl2.describe(variables).rows}
  assert rows["params/Conv_0/kernel"] and rows["params/Dense_0/kernel"]
  assert not rows["params/BatchNorm_0/scale"] and not rows["params/LayerNorm_0/scale"]
  assert not rows["batch_stats/BatchNorm_0/mean"] and not rows["params/Conv_0/bias"]


@pytest.mark.parametrize("form", ["module", "state"])
def test_nnx_module_and_state(form):
  model = helpers.nnx_net(0)
  params = model if form == "module" else nnx.state(model, nnx.Param)
  expected = helpers.ref_l2(
    [(model.dense1.kernel[...], 1.0), (model.dense2.kernel[...], 1.0)], LAM, M
  )
  np.testing.assert_allclose(float(jaxl2.l2_penalty(params, LAM, M)), expected, rtol=1e-6)
  # The default mask never selects RNG keys, counters or batch statistics.
  selected = {r.path for r in jaxl2.describe(params).rows if r.selected}
  assert selected == {"dense1/kernel", "dense2/kernel"}


def test_nnx_non_param_variable_is_never_selected():
  class Cached(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 2)))
      self.cache = nnx.Cache(jnp.full((4, 4), 100.0))

  model = Cached()
  np.testing.assert_allclose(float(jaxl2.l2_penalty(model, 1.0, 1.0)), 2.0, rtol=1e-7)
  # Whatever the mask, only nnx.Param can be penalized on a module.
  for mask in (jaxl2.all_floating, jaxl2.by_ndim(1), jaxl2.by_regex(".*")):
    np.testing.assert_allclose(float(jaxl2.l2_penalty(model, 1.0, 1.0, mask=mask)), 2.0, rtol=1e-7)


def test_grad_through_nnx_module_matches_analytic():
  model = helpers.nnx_net(0)
  grads = jax.grad(lambda mdl: jaxl2.l2_penalty(mdl, LAM, M))(nnx.state(model, nnx.Param))
  np.testing.assert_allclose(
    np.asarray(grads["dense1"]["kernel"][...]),
    LAM / M * helpers.as_f64(model.dense1.kernel[...]),
    rtol=1e-6,
  )
  np.testing.assert_array_equal(np.asarray(grads["dense1"]["bias"][...]), 0.0)


# ---- gradients ---------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, jaxl2.by_regex({r".*kernel": 2.0, r".*bias": 0.5})])
def test_autodiff_equals_analytic_equals_reference(mask):
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=3)
  auto = jax.grad(jaxl2.l2_penalty)(params, LAM, M, mask=mask)
  analytic = jaxl2.l2_penalty_grad(params, LAM, M, mask=mask)
  # float32: (λ/2m)·2w by autodiff vs (λ/m)·w directly differ by at most an ulp or two.
  helpers.assert_trees_close(auto, analytic, rtol=1e-6)
  for path, w in helpers.leaves_by_path(params).items():
    mult = 1.0 if mask is None else (2.0 if path.endswith("kernel") else 0.5)
    selected = mask is not None or path.endswith("kernel")
    got = helpers.leaves_by_path(analytic)[path]
    if selected:
      np.testing.assert_allclose(helpers.as_f64(got), LAM / M * mult * helpers.as_f64(w), rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(got), 0.0)  # exactly zero, not small
      np.testing.assert_array_equal(np.asarray(helpers.leaves_by_path(auto)[path]), 0.0)


def test_complex_leaves_follow_jax_gradient_convention():
  params = {"w": jnp.array([[1 + 2j, 3 - 1j], [0.5j, -2.0]], jnp.complex64)}
  value = jaxl2.l2_penalty(params, 2.0, 4.0)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), 2.0 / 8.0 * (5 + 10 + 0.25 + 4), rtol=1e-7)
  auto = jax.grad(jaxl2.l2_penalty)(params, 2.0, 4.0)
  helpers.assert_trees_close(auto, jaxl2.l2_penalty_grad(params, 2.0, 4.0), rtol=1e-7)
  np.testing.assert_allclose(
    np.asarray(auto["w"]), 0.5 * np.conj(helpers.as_f64(params["w"])), rtol=1e-7
  )


def test_check_grads_to_second_order_in_float64():
  with jax.enable_x64(True):
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2))), "b": jnp.ones(2)}

    def f(p):
      return jaxl2.l2_penalty(p, 0.7, 3.0)

    # Central differences with eps=1e-4: JAX's float64 default tolerance (1e-5) applies.
    check_grads(f, (params,), order=2, modes=("fwd", "rev"))


def test_hessian_is_lam_over_m_times_identity_with_multipliers():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((1, 3)), "bias": jnp.ones(2)}
  mask = {"a": 1.0, "b": 3.0, "bias": False}
  hess = jax.hessian(jaxl2.l2_penalty)(params, LAM, M, mask=mask)
  for k, mult in [("a", 1.0), ("b", 3.0)]:
    n = params[k].size
    np.testing.assert_allclose(
      np.asarray(hess[k][k]).reshape(n, n), LAM / M * mult * np.eye(n), rtol=1e-6
    )
  np.testing.assert_array_equal(np.asarray(hess["bias"]["bias"]), 0.0)
  np.testing.assert_array_equal(np.asarray(hess["a"]["b"]), 0.0)


def test_grad_with_respect_to_lam_and_m():
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=4)
  sq = sum(helpers.ref_sq_norm(w) for w, _ in _kernels_only(params))
  d_lam, d_m = jax.grad(lambda lam, m: jaxl2.l2_penalty(params, lam, m), argnums=(0, 1))(LAM, M)
  np.testing.assert_allclose(float(d_lam), sq / (2 * M), rtol=1e-6)
  np.testing.assert_allclose(float(d_m), -LAM * sq / (2 * M**2), rtol=1e-6)


# ---- transformations and retracing --------------------------------------------


def test_jit_vmap_over_lam_and_no_retrace():
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=5)
  expected_sq = sum(helpers.ref_sq_norm(w) for w, _ in _kernels_only(params))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def penalty(p, lam, m):
    return jaxl2.l2_penalty(p, lam, m)

  for lam in [0.0, 0.1, 1.0, 10.0]:  # four values, one trace
    np.testing.assert_allclose(
      float(penalty(params, lam, M)), lam * expected_sq / (2 * M), rtol=1e-6
    )
  lams = jnp.array([0.0, 0.5, 2.0])
  batched = jax.vmap(lambda lam: jaxl2.l2_penalty(params, lam, M))(lams)
  np.testing.assert_allclose(
    np.asarray(batched), np.asarray(lams) * expected_sq / (2 * M), rtol=1e-6
  )


@pytest.mark.parametrize(
  ("lam", "m"),
  [(0.5, 4), (np.float64(0.5), np.int64(4)), (jnp.float16(0.5), jnp.int32(4)), (True * 0.5, 4.0)],
)
def test_result_dtype_is_float32_whatever_lam_and_m(lam, m):
  out = jaxl2.l2_penalty({"w": jnp.ones((2, 2), jnp.bfloat16)}, lam, m)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(float(out), 0.25, rtol=0)


def test_float64_leaf_accumulates_in_float64():
  with jax.enable_x64(True):
    params = {"w": jnp.full((3, 3), 1.0 + 1e-12, jnp.float64), "v": jnp.ones((2, 2), jnp.float32)}
    out = jaxl2.l2_penalty(params, 1.0, 0.5)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(float(out), 9 * (1.0 + 1e-12) ** 2 + 4, rtol=1e-15)


# ---- low precision -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_million_elements_within_1e_5(dtype):
  params = helpers.low_precision_tree(dtype)
  expected = helpers.ref_l2([(params["w_a"], 1.0), (params["w_b"], 1.0)], LAM, M)
  got = jaxl2.l2_penalty(params, LAM, M)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_fp16_magnitudes_of_1000_do_not_overflow():
  rng = np.random.default_rng(1)
  w = jnp.asarray(
    rng.uniform(800, 1800, size=(400, 300)) * rng.choice([-1, 1], (400, 300)), jnp.float16
  )
  assert not np.isfinite(np.asarray(w[:2, :2] * w[:2, :2])).all()  # squares overflow in fp16
  got = jaxl2.l2_penalty({"w": w}, 1.0, 1.0)
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), helpers.ref_l2([(w, 1.0)], 1.0, 1.0), rtol=1e-5)
  grad = jaxl2.l2_penalty_grad({"w": w}, 1.0, 1.0)["w"]
  assert grad.dtype == jnp.float16 and np.isfinite(np.asarray(grad)).all()


# ---- edge cases --------------------------------------------------------------


def test_none_leaves_are_ignored_and_zero_size_adds_nothing():
  params = {"w": jnp.ones((2, 2)), "skip": None, "empty": jnp.zeros((0, 5))}
  np.testing.assert_allclose(float(jaxl2.l2_penalty(params, 1.0, 1.0)), 2.0, rtol=0)
  grads = jaxl2.l2_penalty_grad(params, 1.0, 1.0)
  assert grads["skip"] is None and grads["empty"].shape == (0, 5)


def test_empty_params_give_zero():
  out = jaxl2.l2_penalty({}, 1.0, 1.0)
  assert out.dtype == jnp.float32 and float(out) == 0.0
  assert jaxl2.l2_penalty_grad([], 1.0, 1.0) == []


def test_nan_weight_gives_nan_penalty():
  params = {"w": jnp.array([[1.0, jnp.nan]])}
  assert np.isnan(float(jaxl2.l2_penalty(params, 1.0, 1.0)))


def test_lam_zero_gives_zero_and_zero_gradient():
  params = helpers.linen_mlp_params(0)
  assert float(jaxl2.l2_penalty(params, 0.0, 10)) == 0.0
  for g in jax.tree_util.tree_leaves(jaxl2.l2_penalty_grad(params, 0.0, 10)):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---- regularized -----------------------------------------------------------


def _mse(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def test_regularized_adds_the_penalty_to_value_and_gradient():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32), "b": jnp.ones(1)}
  x, y = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), jnp.zeros((8, 1))
  loss = jaxl2.regularized(_mse, LAM, M)
  assert loss.__name__ == "_mse"
  np.testing.assert_allclose(
    float(loss(params, x, y)),
    float(_mse(params, x, y)) + helpers.ref_l2([(params["w"], 1.0)], LAM, M),
    rtol=1e-6,
  )
  g = jax.jit(jax.grad(loss))(params, x, y)
  g_data = jax.grad(_mse)(params, x, y)
  # Compare sums, not differences: g - g_data would cancel in float32.
  np.testing.assert_allclose(
    helpers.as_f64(g["w"]),
    helpers.as_f64(g_data["w"]) + LAM / M * helpers.as_f64(params["w"]),
    rtol=1e-6,
  )
  np.testing.assert_allclose(np.asarray(g["b"]), np.asarray(g_data["b"]), rtol=1e-6)


def test_regularized_has_aux_passes_aux_through():
  def loss_with_aux(params, x):
    return jnp.sum(x), {"note": x * 2}

  loss = jaxl2.regularized(loss_with_aux, 1.0, 2.0, has_aux=True)
  (value, aux), grads = jax.value_and_grad(loss, has_aux=True)({"w": jnp.ones((2, 2))}, jnp.ones(3))
  np.testing.assert_allclose(float(value), 3.0 + 1.0, rtol=0)
  np.testing.assert_array_equal(np.asarray(aux["note"]), 2.0)
  np.testing.assert_allclose(np.asarray(grads["w"]), 0.5, rtol=0)


# ---- m of any size and integer type ----------------------------------------------

BIG_M = 2_000_000_000_000  # a token count: overflows int32, wraps in a cast to int32


@pytest.mark.parametrize(
  "m", [BIG_M, np.int64(BIG_M), np.uint64(BIG_M), float(BIG_M), np.float32(BIG_M)]
)
def test_huge_m_of_any_integer_or_float_type_is_exact(m):
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=3)
  kernels = _kernels_only(params)
  lam = 0.1
  m_exact = float(m)  # np.float32(2e12) is not exactly 2e12: compare with what was passed
  reference = helpers.ref_l2(kernels, lam, m_exact)
  # float32 result: one rounding of λ/2m and a float32 sum of < 500 squares.
  np.testing.assert_allclose(float(jaxl2.l2_penalty(params, lam, m)), reference, rtol=1e-6)
  np.testing.assert_allclose(jaxl2.describe(params, lam=lam, m=m).penalty, reference, rtol=1e-12)
  grads = helpers.leaves_by_path(jaxl2.l2_penalty_grad(params, lam, m))
  for path, w in helpers.leaves_by_path(params).items():
    expected = lam / m_exact * helpers.as_f64(w) if path.endswith("kernel") else 0.0
    np.testing.assert_allclose(helpers.as_f64(grads[path]), expected, rtol=1e-6)
  wrapped = jaxl2.regularized(lambda p: 0.0, lam, m)
  np.testing.assert_allclose(float(wrapped(params)), reference, rtol=1e-6)


def test_huge_m_traced_as_a_float():
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=3)
  reference = helpers.ref_l2(_kernels_only(params), 0.1, float(np.float32(BIG_M)))
  traced = jax.jit(lambda p, m: jaxl2.l2_penalty(p, 0.1, m))(params, np.float32(BIG_M))
  np.testing.assert_allclose(float(traced), reference, rtol=1e-6)


def test_numpy_float64_leaves_without_x64_do_not_warn():
  params = {"w": np.random.default_rng(0).normal(size=(4, 3))}  # NumPy float64
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    value = jaxl2.l2_penalty(params, 0.5, 10)
    jaxl2.l2_penalty_grad(params, 0.5, 10)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), helpers.ref_l2([(params["w"], 1.0)], 0.5, 10), rtol=1e-6)


# ---- Flax NNX: tied weights are one parameter --------------------------------------


class _Tied(nnx.Module):
  """Input and output projections sharing one kernel (flax's model-surgery pattern)."""

  def __init__(self, rngs: nnx.Rngs):
    self.encoder = nnx.Linear(4, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.decoder = nnx.Linear(4, 4, rngs=rngs)
    self.decoder.kernel = self.encoder.kernel

  def __call__(self, x):
    return self.decoder(self.bn(self.encoder(x), use_running_average=True))


def test_tied_nnx_weight_counts_once_in_penalty_and_gradient():
  model = _Tied(nnx.Rngs(0))
  kernel = model.encoder.kernel[...]
  reference = helpers.ref_l2([(kernel, 1.0)], LAM, M)  # once, not twice
  np.testing.assert_allclose(float(jaxl2.l2_penalty(model, LAM, M)), reference, rtol=1e-6)
  state = nnx.state(model, nnx.Param)
  np.testing.assert_allclose(float(jaxl2.l2_penalty(state, LAM, M)), reference, rtol=1e-6)
  grads = helpers.leaves_by_path(nnx.grad(lambda mdl: jaxl2.l2_penalty(mdl, LAM, M))(model))
  # NNX reports a shared Variable once, at its first path in graph order.
  kernels = [p for p in grads if p.endswith("kernel")]
  assert kernels == ["decoder/kernel"]
  expected = LAM / M * helpers.as_f64(kernel)
  np.testing.assert_allclose(helpers.as_f64(grads["decoder/kernel"]), expected, rtol=1e-6)
  # The analytic gradient has the module's structure: (λ/m)·W at that first
  # path, 0 at the second reference (summed, the two give the same total).
  analytic = jaxl2.l2_penalty_grad(model, LAM, M)
  np.testing.assert_allclose(helpers.as_f64(analytic.decoder.kernel[...]), expected, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(analytic.encoder.kernel[...]), 0.0)


class _TiedPytreeParam(nnx.Module):
  """A Param holding a dict of arrays, referenced twice."""

  def __init__(self):
    rng = np.random.default_rng(3)
    self.first = nnx.Param({"x": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)})
    self.second = self.first


def test_tied_pytree_valued_param_counts_once_and_is_named_without_value():
  model = _TiedPytreeParam()
  reference = helpers.ref_l2([(model.first.get_value()["x"], 1.0)], LAM, M)  # once, not twice
  penalty = jaxl2.l2_penalty(model, LAM, M, mask=jaxl2.all_floating)
  np.testing.assert_allclose(float(penalty), reference, rtol=1e-6)
  # One row, named by the Param's path (no `value/` between), its alias beside it.
  (row,) = jaxl2.describe(model, mask=jaxl2.all_floating).rows
  assert (row.path, row.selected, row.aliases) == ("first/x", True, ("second/x",))


def test_tied_nnx_weight_is_decayed_once_per_step_by_nnx_optimizer():
  model = _Tied(nnx.Rngs(0))
  before = np.asarray(model.encoder.kernel[...], np.float64)
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
  grads = nnx.grad(lambda mdl: jaxl2.l2_penalty(mdl, LAM, M))(model)
  optimizer.update(model, grads)
  # One SGD step on the penalty alone: W ← W − lr·(λ/m)·W, once.
  np.testing.assert_allclose(model.encoder.kernel[...], (1 - LAM / M) * before, rtol=1e-6)
  assert model.decoder.kernel is model.encoder.kernel
