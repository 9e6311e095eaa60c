"""L1, elastic net and L2-SP: values, gradients, transformations, precision and bad input.

References are float64 NumPy (tests/helpers.py). Unless a test says otherwise,
float32 results are compared at rtol=1e-6: the penalties accumulate a few
hundred float32 terms of one sign, whose rounding stays well under 1e-6.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.test_util import check_grads

import jaxl2
from tests import helpers

LAM, M, RHO = 0.3, 50.0, 0.3
RTOL = 1e-6
# ρ = 0 / ρ = 1 against l2_penalty / l1_penalty, and L2-SP at a zero anchor against
# l2_penalty: the same sums, scaled in another order by exact powers of two, so at
# most one float32 rounding apart (2^-23 relative); observed bit-equal on CPU.
ONE_ULP = 2.0**-23


def _mults(path: str, leaf) -> float:
  """A user mask with multipliers: 2 on matrices, 0.5 on everything else (biases, scalars)."""
  del path
  return 2.0 if np.ndim(leaf) >= 2 else 0.5


def _selection(tree, mask=None):
  """[(path, leaf, c)] for the default mask (floating, ndim ≥ 2) or _mults, without jaxl2."""
  default = lambda path, w: float(jnp.issubdtype(w.dtype, jnp.inexact) and w.ndim >= 2)  # noqa: E731
  mask = mask or default
  return [(path, w, mask(path, w)) for path, w in helpers.leaves_by_path(tree).items()]


def _trees():
  mlp = helpers.randomize(helpers.linen_mlp_params(0), seed=1)
  nested = {
    "a": [jnp.arange(-3.0, 3.0).reshape(2, 3), (jnp.ones((2, 2)), jnp.ones(3))],
    "b": {"c": jnp.full((3, 1), -2.0), "scalar": jnp.float32(4.0)},
  }
  return {"linen_mlp": mlp, "nested": nested}


def _anchor(tree, seed=7):
  return helpers.randomize(tree, seed=seed, scale=0.5)


def _ref_direction(name: str, w, w0, rho: float = RHO) -> np.ndarray:
  """∂P/∂W divided by (λ/m)·c, in float64, as `jax.grad` defines it (conjugated if complex)."""
  wf = helpers.as_f64(w)
  if name == "l1":
    return helpers.ref_sign(w)
  if name == "elastic_net":
    return rho * helpers.ref_sign(w) + (1 - rho) * np.conj(wf)
  return np.conj(wf - helpers.as_f64(w0))


# Each penalty as f(params, lam, m, mask), with its analytic gradient, for parametrized
# tests; the L2-SP anchor is `_anchor(params)`, which depends only on the tree's shapes.
def _l1(p, lam, m, mask=None):
  return jaxl2.l1_penalty(p, lam, m, mask=mask)


def _l1_grad(p, lam, m, mask=None):
  return jaxl2.l1_penalty_grad(p, lam, m, mask=mask)


def _en(p, lam, m, mask=None):
  return jaxl2.elastic_net_penalty(p, lam, m, l1_ratio=RHO, mask=mask)


def _en_grad(p, lam, m, mask=None):
  return jaxl2.elastic_net_penalty_grad(p, lam, m, l1_ratio=RHO, mask=mask)


def _sp(p, lam, m, mask=None):
  return jaxl2.l2_sp_penalty(p, _anchor(p), lam, m, mask=mask)


def _sp_grad(p, lam, m, mask=None):
  return jaxl2.l2_sp_penalty_grad(p, _anchor(p), lam, m, mask=mask)


PENALTIES = {"l1": (_l1, _l1_grad), "elastic_net": (_en, _en_grad), "l2_sp": (_sp, _sp_grad)}


def _reference(name: str, triples, lam: float, m: float, rho: float = RHO) -> float:
  """The float64 reference value over [(leaf, anchor leaf, c)]."""
  if name == "l1":
    return helpers.ref_l1([(w, c) for w, _, c in triples], lam, m)
  if name == "elastic_net":
    return helpers.ref_elastic_net([(w, c) for w, _, c in triples], lam, m, rho)
  return helpers.ref_l2_sp(triples, lam, m)


def _triples(tree, mask=None):
  anchors = helpers.leaves_by_path(_anchor(tree))
  return [(path, w, anchors[path], c) for path, w, c in _selection(tree, mask)]


# ---- values against the float64 NumPy reference --------------------------------


@pytest.mark.parametrize("mask", [None, _mults], ids=["default", "multipliers"])
@pytest.mark.parametrize("tree_name", list(_trees()))
@pytest.mark.parametrize("name", list(PENALTIES))
def test_value_matches_float64_reference(name, tree_name, mask):
  penalty, _ = PENALTIES[name]
  tree = _trees()[tree_name]
  triples = [(w, w0, c) for _, w, w0, c in _triples(tree, mask) if c]
  got = penalty(tree, LAM, M, mask)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), _reference(name, triples, LAM, M), rtol=RTOL)


def test_multiplier_scales_the_whole_elastic_net_term():
  w = jnp.array([[1.0, -2.0]])
  one = jaxl2.elastic_net_penalty({"w": w}, 1.0, 1.0, l1_ratio=RHO, mask={"w": 1.0})
  three = jaxl2.elastic_net_penalty({"w": w}, 1.0, 1.0, l1_ratio=RHO, mask={"w": 3.0})
  # c·(L1 part + L2 part): 3 × [0.3·3 + 0.35·5] = 7.95. float32 of small exact inputs.
  np.testing.assert_allclose([float(one), float(three)], [2.65, 7.95], rtol=RTOL)


@pytest.mark.parametrize("form", ["module", "state"])
def test_nnx_module_and_state(form):
  model, pretrained = helpers.nnx_net(0), helpers.nnx_net(1)
  params = model if form == "module" else nnx.state(model, nnx.Param)
  anchor = pretrained if form == "module" else nnx.state(pretrained, nnx.Param)
  kernels = [(model.dense1.kernel[...], 1.0), (model.dense2.kernel[...], 1.0)]
  anchors = [pretrained.dense1.kernel[...], pretrained.dense2.kernel[...]]
  np.testing.assert_allclose(
    float(jaxl2.l1_penalty(params, LAM, M)), helpers.ref_l1(kernels, LAM, M), rtol=RTOL
  )
  np.testing.assert_allclose(
    float(jaxl2.elastic_net_penalty(params, LAM, M, l1_ratio=RHO)),
    helpers.ref_elastic_net(kernels, LAM, M, RHO),
    rtol=RTOL,
  )
  triples = [(w, w0, c) for (w, c), w0 in zip(kernels, anchors, strict=True)]
  np.testing.assert_allclose(
    float(jaxl2.l2_sp_penalty(params, anchor, LAM, M)),
    helpers.ref_l2_sp(triples, LAM, M),
    rtol=RTOL,
  )
  assert float(jaxl2.l2_sp_penalty(params, params, LAM, M)) == 0.0


def test_complex_leaves_use_the_modulus():
  params = {"w": jnp.array([[3 + 4j, -1j], [0j, 2.0]], jnp.complex64)}
  anchor = {"w": jnp.array([[3 + 0j, 0j], [1j, 2.0]], jnp.complex64)}
  # Σ|w| = 5 + 1 + 0 + 2 = 8 and Σ|w|² = 25 + 1 + 0 + 4 = 30, exact in float32.
  assert float(jaxl2.l1_penalty(params, 2.0, 4.0)) == 0.5 * 8
  assert float(jaxl2.elastic_net_penalty(params, 2.0, 4.0, l1_ratio=0.5)) == 0.5 * (4 + 7.5)
  # ‖W − W₀‖² = |4j|² + |−j|² + |−j|² = 18.
  assert float(jaxl2.l2_sp_penalty(params, anchor, 2.0, 4.0)) == 0.25 * 18
  for got in [jaxl2.l1_penalty(params, 2.0, 4.0), jaxl2.l2_sp_penalty(params, anchor, 2.0, 4.0)]:
    assert got.dtype == jnp.float32


# ---- gradients -----------------------------------------------------------------


@pytest.mark.parametrize("mask", [None, _mults], ids=["default", "multipliers"])
@pytest.mark.parametrize("name", list(PENALTIES))
def test_autodiff_equals_analytic_equals_reference(name, mask):
  penalty, analytic_fn = PENALTIES[name]
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=3)
  auto = helpers.leaves_by_path(jax.grad(penalty)(params, LAM, M, mask))
  analytic = helpers.leaves_by_path(analytic_fn(params, LAM, M, mask))
  for path, w, w0, c in _triples(params, mask):
    assert analytic[path].dtype == w.dtype
    if c:
      want = LAM / M * c * _ref_direction(name, w, w0)
      # One float32 rounding per term; autodiff multiplies in another order (≤ 2 ulp).
      np.testing.assert_allclose(helpers.as_f64(analytic[path]), want, rtol=RTOL)
      np.testing.assert_allclose(helpers.as_f64(auto[path]), want, rtol=RTOL)
    else:
      np.testing.assert_array_equal(np.asarray(analytic[path]), 0.0)  # exactly zero
      np.testing.assert_array_equal(np.asarray(auto[path]), 0.0)


def test_l1_gradient_at_exactly_zero_is_plus_lam_over_m_like_jax_grad_of_abs():
  # jax.grad(jnp.abs)(0.0) is +1 (JAX's rule: +g where x >= 0), also at -0.0.
  assert float(jax.grad(jnp.abs)(0.0)) == 1.0 and float(jax.grad(jnp.abs)(-0.0)) == 1.0
  params = {"w": jnp.array([[0.0, -0.0, 2.0, -2.0]]), "z": jnp.zeros((2, 2), jnp.complex64)}
  mask = {"w": True, "z": True}
  analytic = jaxl2.l1_penalty_grad(params, 1.0, 4.0, mask=mask)
  auto = jax.grad(jaxl2.l1_penalty)(params, 1.0, 4.0, mask=mask)
  # Exact: ±(1/4) is a power of two. The complex subgradient at 0 is 0.
  np.testing.assert_array_equal(np.asarray(analytic["w"]), [[0.25, 0.25, 0.25, -0.25]])
  np.testing.assert_array_equal(np.asarray(auto["w"]), np.asarray(analytic["w"]))
  np.testing.assert_array_equal(np.asarray(analytic["z"]), 0.0)
  np.testing.assert_array_equal(np.asarray(auto["z"]), 0.0)
  # Elastic net at w = 0: only the L1 part remains, +(λ/m)·ρ.
  en = jaxl2.elastic_net_penalty_grad({"w": jnp.zeros((1, 2))}, 1.0, 4.0, l1_ratio=0.5)
  np.testing.assert_array_equal(np.asarray(en["w"]), 0.125)


def test_l1_gradient_of_nan_weight_matches_jax_grad():
  params = {"w": jnp.array([[jnp.nan, 1.0]])}
  auto = jax.grad(jaxl2.l1_penalty)(params, 1.0, 2.0)
  analytic = jaxl2.l1_penalty_grad(params, 1.0, 2.0)
  np.testing.assert_array_equal(np.asarray(analytic["w"]), np.asarray(auto["w"]))  # [-0.5, 0.5]
  assert np.isnan(float(jaxl2.l1_penalty(params, 1.0, 2.0)))


def test_complex_gradients_follow_jax_convention():
  params = {"w": jnp.array([[3 + 4j, -1j], [0j, 2.0]], jnp.complex64)}
  anchor = {"w": jnp.array([[1 + 1j, 0j], [1j, -2.0]], jnp.complex64)}
  w, w0 = helpers.as_f64(params["w"]), helpers.as_f64(anchor["w"])
  cases = [
    (jaxl2.l1_penalty, jaxl2.l1_penalty_grad, (), {}, 0.5 * helpers.ref_sign(w)),
    (
      jaxl2.elastic_net_penalty,
      jaxl2.elastic_net_penalty_grad,
      (),
      {"l1_ratio": RHO},
      0.5 * (RHO * helpers.ref_sign(w) + (1 - RHO) * np.conj(w)),
    ),
    (jaxl2.l2_sp_penalty, jaxl2.l2_sp_penalty_grad, (anchor,), {}, 0.5 * np.conj(w - w0)),
  ]
  for penalty, analytic_fn, extra, kwargs, want in cases:
    auto = jax.grad(penalty)(params, *extra, 2.0, 4.0, mask={"w": True}, **kwargs)["w"]
    analytic = analytic_fn(params, *extra, 2.0, 4.0, mask={"w": True}, **kwargs)["w"]
    assert analytic.dtype == jnp.complex64
    # complex64: one rounding of a modulus and a division, within 1e-6.
    np.testing.assert_allclose(helpers.as_f64(analytic), want, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(helpers.as_f64(auto), want, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("name", list(PENALTIES))
def test_check_grads_in_float64(name):
  penalty, _ = PENALTIES[name]
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2))
    w = w + 0.5 * np.sign(w)  # |w| > 0.5: finite differences never straddle the kink of |w|
    params = {"w": jnp.asarray(w), "b": jnp.ones(2)}

    # Central differences with eps=1e-4: JAX's float64 default tolerance (1e-5) applies.
    check_grads(lambda p: penalty(p, 0.7, 3.0), (params,), order=2, modes=("fwd", "rev"))


def test_l2_sp_anchor_gradient_is_minus_the_params_gradient():
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=3)
  anchor = _anchor(params)
  d_params, d_anchor = jax.grad(jaxl2.l2_sp_penalty, argnums=(0, 1))(params, anchor, LAM, M)
  helpers.assert_trees_close(
    d_anchor, jax.tree_util.tree_map(jnp.negative, d_params), rtol=0, atol=0
  )


# ---- special cases: ρ = 0, ρ = 1, anchor = params, anchor = 0 --------------------


@pytest.mark.parametrize("tree_name", list(_trees()))
def test_rho_zero_is_l2_and_rho_one_is_l1(tree_name):
  tree = _trees()[tree_name]
  pairs = [
    (jaxl2.elastic_net_penalty(tree, LAM, M, l1_ratio=0.0), jaxl2.l2_penalty(tree, LAM, M)),
    (jaxl2.elastic_net_penalty(tree, LAM, M, l1_ratio=1.0), jaxl2.l1_penalty(tree, LAM, M)),
  ]
  for got, want in pairs:
    np.testing.assert_allclose(float(got), float(want), rtol=ONE_ULP)
  grads = [
    (
      jaxl2.elastic_net_penalty_grad(tree, LAM, M, l1_ratio=0.0),
      jaxl2.l2_penalty_grad(tree, LAM, M),
    ),
    (
      jaxl2.elastic_net_penalty_grad(tree, LAM, M, l1_ratio=1.0),
      jaxl2.l1_penalty_grad(tree, LAM, M),
    ),
  ]
  for got, want in grads:
    helpers.assert_trees_close(got, want, rtol=ONE_ULP)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64])
def test_l2_sp_at_its_anchor_is_exactly_zero(dtype):
  params = {"k": helpers.randomize({"k": jnp.ones((4, 3))}, seed=2)["k"].astype(dtype)}
  params["b"] = jnp.ones(3, dtype)
  anchor = jax.tree_util.tree_map(jnp.copy, params)
  for mask in [None, jaxl2.all_floating]:
    assert float(jaxl2.l2_sp_penalty(params, anchor, LAM, M, mask=mask)) == 0.0  # exactly
    assert float(jaxl2.l2_sp_penalty(params, params, LAM, M, mask=mask)) == 0.0
    for grads in [
      jaxl2.l2_sp_penalty_grad(params, params, LAM, M, mask=mask),
      jax.grad(jaxl2.l2_sp_penalty)(params, params, LAM, M, mask=mask),
    ]:
      for g in jax.tree_util.tree_leaves(grads):
        assert g.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("tree_name", list(_trees()))
def test_l2_sp_with_a_zero_anchor_is_l2(tree_name):
  tree = _trees()[tree_name]
  zeros = jax.tree_util.tree_map(jnp.zeros_like, tree)
  np.testing.assert_allclose(
    float(jaxl2.l2_sp_penalty(tree, zeros, LAM, M)),
    float(jaxl2.l2_penalty(tree, LAM, M)),
    rtol=ONE_ULP,
  )
  helpers.assert_trees_close(
    jaxl2.l2_sp_penalty_grad(tree, zeros, LAM, M),
    jaxl2.l2_penalty_grad(tree, LAM, M),
    rtol=ONE_ULP,
  )


def test_lam_zero_gives_exact_zeros():
  params = helpers.linen_mlp_params(0)
  anchor = _anchor(params)
  values = [
    jaxl2.l1_penalty(params, 0.0, 10),
    jaxl2.elastic_net_penalty(params, 0.0, 10, l1_ratio=RHO),
    jaxl2.l2_sp_penalty(params, anchor, 0.0, 10),
  ]
  assert [float(v) for v in values] == [0.0, 0.0, 0.0]
  grads = [
    jaxl2.l1_penalty_grad(params, 0.0, 10),
    jaxl2.elastic_net_penalty_grad(params, 0.0, 10, l1_ratio=RHO),
    jaxl2.l2_sp_penalty_grad(params, anchor, 0.0, 10),
  ]
  for g in jax.tree_util.tree_leaves(grads):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_none_and_empty_leaves():
  params = {"w": jnp.array([[1.0, -1.0]]), "skip": None, "empty": jnp.zeros((0, 5))}
  assert float(jaxl2.l1_penalty(params, 1.0, 1.0)) == 2.0
  assert float(jaxl2.l2_sp_penalty(params, params, 1.0, 1.0)) == 0.0
  grads = jaxl2.l2_sp_penalty_grad(params, params, 1.0, 1.0)
  assert grads["skip"] is None and grads["empty"].shape == (0, 5)
  assert float(jaxl2.l1_penalty({}, 1.0, 1.0)) == 0.0
  assert jaxl2.elastic_net_penalty_grad([], 1.0, 1.0, l1_ratio=0.5) == []


# ---- transformations and retracing -----------------------------------------------


def test_jit_over_lam_and_l1_ratio_and_anchor_traces_once():
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=5)
  kernels = [(w, c) for _, w, c in _selection(params) if c]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def penalties(p, anchor, lam, m, rho):
    return (
      jaxl2.l1_penalty(p, lam, m),
      jaxl2.elastic_net_penalty(p, lam, m, l1_ratio=rho),
      jaxl2.l2_sp_penalty(p, anchor, lam, m),
    )

  for seed, (lam, rho) in enumerate([(0.0, 0.0), (0.1, 0.25), (1.0, 1.0), (10.0, 0.5)]):
    anchor = _anchor(params, seed=seed)  # a new anchor each time, one trace
    l1, en, sp = penalties(params, anchor, lam, M, rho)
    anchors = helpers.leaves_by_path(anchor)
    triples = [(w, anchors[p], c) for p, w, c in _selection(params) if c]
    np.testing.assert_allclose(float(l1), helpers.ref_l1(kernels, lam, M), rtol=RTOL)
    np.testing.assert_allclose(float(en), helpers.ref_elastic_net(kernels, lam, M, rho), rtol=RTOL)
    np.testing.assert_allclose(float(sp), helpers.ref_l2_sp(triples, lam, M), rtol=RTOL)


@pytest.mark.parametrize("name", list(PENALTIES))
def test_vmap_over_lam(name):
  penalty, _ = PENALTIES[name]
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=5)
  triples = [(w, w0, c) for _, w, w0, c in _triples(params) if c]
  lams = jnp.array([0.0, 0.5, 2.0])
  batched = jax.vmap(lambda lam: penalty(params, lam, M))(lams)
  want = [_reference(name, triples, float(lam), M) for lam in lams]
  np.testing.assert_allclose(np.asarray(batched), want, rtol=RTOL)


def test_vmap_over_l1_ratio_and_grad_with_respect_to_it():
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=6)
  kernels = [(w, c) for _, w, c in _selection(params) if c]
  rhos = jnp.array([0.0, 0.3, 1.0])
  batched = jax.vmap(lambda r: jaxl2.elastic_net_penalty(params, LAM, M, l1_ratio=r))(rhos)
  want = [helpers.ref_elastic_net(kernels, LAM, M, float(r)) for r in rhos]
  np.testing.assert_allclose(np.asarray(batched), want, rtol=RTOL)
  # ∂/∂ρ = (λ/m)·(Σ|w| − ½Σw²), a difference of two positive sums: 1e-5 covers cancellation.
  d_rho = jax.grad(lambda r: jaxl2.elastic_net_penalty(params, LAM, M, l1_ratio=r))(RHO)
  l1 = sum(helpers.ref_abs_sum(w) for w, _ in kernels)
  sq = sum(helpers.ref_sq_norm(w) for w, _ in kernels)
  np.testing.assert_allclose(float(d_rho), LAM / M * (l1 - sq / 2), rtol=1e-5)


@pytest.mark.parametrize("name", list(PENALTIES))
def test_grad_with_respect_to_lam_is_penalty_over_lam(name):
  penalty, _ = PENALTIES[name]
  params = helpers.randomize(helpers.linen_mlp_params(0), seed=4)
  d_lam = jax.grad(lambda lam: penalty(params, lam, M))(LAM)
  # Every penalty is linear in λ: ∂P/∂λ = P/λ.
  np.testing.assert_allclose(float(d_lam), float(penalty(params, LAM, M)) / LAM, rtol=RTOL)


def test_float64_leaf_accumulates_in_float64():
  with jax.enable_x64(True):
    w = jnp.full((3, 3), 1.0 + 1e-12, jnp.float64)
    params = {"w": w, "v": jnp.ones((2, 2), jnp.float32)}
    anchor = {"w": jnp.ones((3, 3), jnp.float32), "v": jnp.ones((2, 2), jnp.float32)}
    l1 = jaxl2.l1_penalty(params, 1.0, 0.5)
    sp = jaxl2.l2_sp_penalty(params, anchor, 1.0, 0.5)
    assert l1.dtype == sp.dtype == jnp.float64
    # float64: the 1e-12 survives (float32 would round it away); a few float64 ulps.
    np.testing.assert_allclose(float(l1), 2 * (9 * (1.0 + 1e-12) + 4), rtol=1e-15)
    # W − W₀ ≈ 1e-12 is taken in float64 (in float32 it would be exactly 0): the float64
    # reference makes the same single rounding, so they agree to float64 precision.
    want = helpers.ref_l2_sp([(w, anchor["w"], 1.0), (params["v"], anchor["v"], 1.0)], 1.0, 0.5)
    assert want > 0
    np.testing.assert_allclose(float(sp), want, rtol=1e-12)


@pytest.mark.parametrize(
  ("lam", "m", "rho"),
  [(0.5, 4, 0.5), (np.float64(0.5), np.int64(4), np.float64(0.5)), (jnp.float16(0.5), 4, 1)],
)
def test_result_dtype_is_float32_whatever_lam_m_and_rho(lam, m, rho):
  params = {"w": jnp.ones((2, 2), jnp.bfloat16)}
  values = [
    jaxl2.l1_penalty(params, lam, m),
    jaxl2.elastic_net_penalty(params, lam, m, l1_ratio=rho),
    jaxl2.l2_sp_penalty(params, {"w": jnp.zeros((2, 2))}, lam, m),
  ]
  assert all(v.dtype == jnp.float32 for v in values)
  # Exact: 0.5/4·4, 0.5/4·(ρ·4 + (1−ρ)/2·4), 0.5/8·4.
  assert [float(v) for v in values] == [0.5, 0.125 * (4 * rho + 2 * (1 - rho)), 0.25]


# ---- low precision -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_million_elements_within_1e_5(dtype):
  params = helpers.low_precision_tree(dtype)
  anchor = helpers.low_precision_tree(dtype, seed=1)
  kernels = [(params["w_a"], 1.0), (params["w_b"], 1.0)]
  triples = [(params[k], anchor[k], 1.0) for k in ("w_a", "w_b")]
  cases = [
    (jaxl2.l1_penalty(params, LAM, M), helpers.ref_l1(kernels, LAM, M)),
    (
      jaxl2.elastic_net_penalty(params, LAM, M, l1_ratio=RHO),
      helpers.ref_elastic_net(kernels, LAM, M, RHO),
    ),
    (jaxl2.l2_sp_penalty(params, anchor, LAM, M), helpers.ref_l2_sp(triples, LAM, M)),
  ]
  for got, want in cases:
    assert got.dtype == jnp.float32
    # Inputs are exact in their dtype; 1.1e6 float32 additions stay within 1e-5 relative.
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_fp16_magnitudes_of_1000_do_not_overflow():
  rng = np.random.default_rng(1)
  shape = (400, 300)
  w = jnp.asarray(rng.uniform(800, 1800, size=shape) * rng.choice([-1, 1], shape), jnp.float16)
  w0 = -w  # W − W₀ = 2W: up to 3600, whose square overflows fp16 (max 65504)
  assert not np.isfinite(np.asarray(w[:2, :2] * w[:2, :2])).all()
  cases = [
    (jaxl2.l1_penalty({"w": w}, 1.0, 1.0), helpers.ref_l1([(w, 1.0)], 1.0, 1.0)),
    (
      jaxl2.elastic_net_penalty({"w": w}, 1.0, 1.0, l1_ratio=RHO),
      helpers.ref_elastic_net([(w, 1.0)], 1.0, 1.0, RHO),
    ),
    (jaxl2.l2_sp_penalty({"w": w}, {"w": w0}, 1.0, 1.0), helpers.ref_l2_sp([(w, w0, 1.0)], 1, 1)),
  ]
  for got, want in cases:
    assert np.isfinite(float(got))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)  # as above: float32 summation
  grads = [
    jaxl2.l1_penalty_grad({"w": w}, 1.0, 1.0)["w"],
    jaxl2.elastic_net_penalty_grad({"w": w}, 1.0, 1.0, l1_ratio=RHO)["w"],
    jaxl2.l2_sp_penalty_grad({"w": w}, {"w": w0}, 1.0, 1.0)["w"],
  ]
  for g in grads:
    assert g.dtype == jnp.float16 and np.isfinite(np.asarray(g)).all()


def test_bf16_params_take_the_difference_in_float32():
  # bf16 keeps 8 significant bits, so 257 is not a bf16 number; the float32 anchor is not
  # rounded to bf16 (both sides go to float32 before W − W₀), so the difference of 1 stays.
  params = {"w": jnp.full((2, 2), 256.0, jnp.bfloat16)}
  anchor = {"w": jnp.full((2, 2), 257.0, jnp.float32)}
  assert float(jaxl2.l2_sp_penalty(params, anchor, 2.0, 1.0)) == 4.0  # exact: 4 · 1²
  grad = jaxl2.l2_sp_penalty_grad(params, anchor, 2.0, 1.0)["w"]
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(grad, np.float32), -2.0)


# ---- hypothesis: random trees, dtypes, masks, anchors ------------------------------

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64]


@st.composite
def _leaf_pairs(draw):
  """(leaf, anchor leaf) of one shape and dtype; some entries exactly zero."""
  shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
  dtype = draw(st.sampled_from(DTYPES))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
  zeros = draw(st.sampled_from([0.0, 0.3]))

  def sample():
    x = rng.normal(size=shape) * scale
    if dtype == jnp.complex64:
      x = x + 1j * rng.normal(size=shape) * scale
    return jnp.asarray(np.where(rng.random(shape) < zeros, 0, x), dtype)

  return sample(), sample()


_pair_trees = st.recursive(
  _leaf_pairs(),
  lambda children: st.one_of(
    st.dictionaries(st.sampled_from(["kernel", "bias", "w", "emb"]), children, max_size=3),
    st.lists(children, max_size=3),
  ),
  max_leaves=6,
)


def _split(pair_tree):
  """A tree of (leaf, anchor) pairs -> (params, anchor)."""
  is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
  return (
    jax.tree_util.tree_map(lambda p: p[0], pair_tree, is_leaf=is_pair),
    jax.tree_util.tree_map(lambda p: p[1], pair_tree, is_leaf=is_pair),
  )


_FAMILY = {
  "l1": (jaxl2.l1_penalty, jaxl2.l1_penalty_grad),
  "elastic_net": (jaxl2.elastic_net_penalty, jaxl2.elastic_net_penalty_grad),
  "l2_sp": (jaxl2.l2_sp_penalty, jaxl2.l2_sp_penalty_grad),
}


@pytest.mark.parametrize("name", list(_FAMILY))
@given(data=st.data())
def test_family_matches_float64_reference(name, data):
  params, anchor = _split(data.draw(_pair_trees))
  paths = list(helpers.leaves_by_path(params))
  if data.draw(st.booleans()):
    mask = jaxl2.by_ndim(2)
    cs = [float(w.ndim >= 2) for w in helpers.leaves_by_path(params).values()]
  else:
    cs = data.draw(
      st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=len(paths), max_size=len(paths))
    )
    mask = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), cs)
  lam = data.draw(st.sampled_from([0.0, 1e-3, 0.7, 5.0]))
  m = data.draw(st.sampled_from([1, 7, 1000.0]))
  rho = data.draw(st.sampled_from([0.0, 0.25, 1.0]))

  def call(f):
    if name == "l2_sp":
      return f(params, anchor, lam, m, mask=mask)
    if name == "elastic_net":
      return f(params, lam, m, l1_ratio=rho, mask=mask)
    return f(params, lam, m, mask=mask)

  penalty, analytic_fn = _FAMILY[name]
  if paths and not any(cs):
    with pytest.raises(ValueError, match=re.escape("`mask` selected no parameters")):
      call(penalty)
    return

  anchors = list(helpers.leaves_by_path(anchor).values())
  triples = list(zip(helpers.leaves_by_path(params).values(), anchors, cs, strict=True))
  selected = [t for t in triples if t[2]]
  reference = _reference(name, selected, lam, m, rho)
  got = call(penalty)
  assert got.dtype == jnp.float32
  # Inputs are exact in their dtype; float32 summation of <= 1e3 terms: 1e-5 relative.
  np.testing.assert_allclose(float(got), reference, rtol=1e-5, atol=1e-30)

  analytic = jax.tree_util.tree_leaves(call(analytic_fn))
  auto = jax.tree_util.tree_leaves(call(jax.grad(penalty)))
  for (w, w0, c), g_analytic, g_auto in zip(triples, analytic, auto, strict=True):
    assert g_analytic.dtype == g_auto.dtype == w.dtype
    want = lam / m * c * _ref_direction(name, w, w0, rho)
    # One rounding to the leaf's dtype (bf16 keeps 8 bits: 2^-8 relative), and below
    # the normal range its subnormal spacing.
    tol = {jnp.bfloat16: 8e-3, jnp.float16: 1e-3}.get(w.dtype.type, 1e-6)
    atol = float(jnp.finfo(w.dtype).smallest_subnormal)
    np.testing.assert_allclose(helpers.as_f64(g_analytic), want, rtol=tol, atol=atol)
    np.testing.assert_allclose(helpers.as_f64(g_auto), want, rtol=tol, atol=atol)


# ---- bad input ---------------------------------------------------------------------

PARAMS = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}


def _all_six(params=PARAMS, anchor=PARAMS, lam=0.1, m=10, rho=0.5, mask=None):
  return [
    lambda: jaxl2.l1_penalty(params, lam, m, mask=mask),
    lambda: jaxl2.l1_penalty_grad(params, lam, m, mask=mask),
    lambda: jaxl2.elastic_net_penalty(params, lam, m, l1_ratio=rho, mask=mask),
    lambda: jaxl2.elastic_net_penalty_grad(params, lam, m, l1_ratio=rho, mask=mask),
    lambda: jaxl2.l2_sp_penalty(params, anchor, lam, m, mask=mask),
    lambda: jaxl2.l2_sp_penalty_grad(params, anchor, lam, m, mask=mask),
  ]


@pytest.mark.parametrize(
  ("kwargs", "error", "message"),
  [
    ({"lam": -0.1}, ValueError, "`lam` must be a finite number >= 0; got -0.1"),
    ({"lam": float("nan")}, ValueError, "`lam` must be a finite number >= 0; got nan"),
    ({"lam": "0.1"}, TypeError, "`lam` must be a real number; got '0.1' (str)"),
    ({"lam": jnp.ones(3)}, ValueError, "`lam` must be a scalar (0-d); got an array of shape (3,)"),
    ({"m": 0}, ValueError, "`m` (the number of training inputs) must be a finite number > 0"),
    ({"m": "100"}, TypeError, "`m` must be a real number; got '100' (str)"),
    (
      {"mask": jaxl2.by_name("weight", strict=False)},
      ValueError,
      "`mask` selected no parameters out of 2 leaves",
    ),
    (
      {"mask": jaxl2.by_name("weight")},
      ValueError,
      "`by_name` 'weight' matches no leaf of these params",
    ),
  ],
)
def test_bad_lam_m_and_mask(kwargs, error, message):
  for call in _all_six(**kwargs):
    with pytest.raises(error, match=re.escape(message)):
      call()


@pytest.mark.parametrize(
  ("rho", "error", "message"),
  [
    (-0.1, ValueError, "`l1_ratio` must be a number in [0, 1]; got -0.1."),
    (1.5, ValueError, "`l1_ratio` must be a number in [0, 1]; got 1.5. It is the L1 share"),
    (float("nan"), ValueError, "`l1_ratio` must be a number in [0, 1]; got nan."),
    (float("inf"), ValueError, "`l1_ratio` must be a number in [0, 1]; got inf."),
    (np.float32(2), ValueError, "got 2.0."),
    (jnp.array(-1.0), ValueError, "got -1.0."),
    ("0.5", TypeError, "`l1_ratio` must be a real number; got '0.5' (str)"),
    (None, TypeError, "`l1_ratio` must be a real number; got None"),
    (0.5j, TypeError, "`l1_ratio` must be a real number"),
    (True, TypeError, "`l1_ratio` must be a real number; got the bool True"),
    (jnp.ones(2), ValueError, "`l1_ratio` must be a scalar (0-d); got an array of shape (2,)"),
  ],
)
def test_bad_l1_ratio(rho, error, message):
  calls = [
    lambda: jaxl2.elastic_net_penalty(PARAMS, 0.1, 10, l1_ratio=rho),
    lambda: jaxl2.elastic_net_penalty_grad(PARAMS, 0.1, 10, l1_ratio=rho),
  ]
  for call in calls:
    with pytest.raises(error, match=re.escape(message)):
      call()


def test_l1_ratio_is_required():
  with pytest.raises(TypeError, match="l1_ratio"):
    jaxl2.elastic_net_penalty(PARAMS, 0.1, 10)  # type: ignore[call-arg]


def test_traced_l1_ratio_is_checked_under_checkify():
  def f(rho):
    return jaxl2.elastic_net_penalty(PARAMS, 1.0, 1.0, l1_ratio=rho)

  checked = checkify.checkify(jax.jit(f))
  for bad in [-0.5, 1.5, float("nan")]:
    err, _ = checked(bad)
    with pytest.raises(checkify.JaxRuntimeError, match=re.escape("`l1_ratio` must be a number")):
      err.throw()
  err, value = checked(1.0)
  err.throw()  # a good value passes
  assert float(value) == 6.0  # ρ = 1: Σ|w| = 6, exact
  # Without checkify a traced ρ cannot be checked: it is computed as given.
  assert float(jax.jit(f)(2.0)) == 2 * 6 - 0.5 * 6
  with pytest.raises(ValueError, match=re.escape("`l1_ratio` must be a scalar (0-d)")):
    jax.jit(f)(jnp.ones(2))


@pytest.mark.parametrize(
  ("anchor", "error", "message"),
  [
    (
      {"dense": {"kernel": jnp.ones((2, 3))}},
      ValueError,
      "`anchor` and `params` differ in structure at leaf 0: `params` has 'dense/bias' where "
      "`anchor` has 'dense/kernel'.",
    ),
    (
      {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "scale": jnp.ones(3)}},
      ValueError,
      "at leaf 2: `params` has no further leaf where `anchor` has 'dense/scale'",
    ),
    (
      {"dense": {"bias": jnp.ones(3)}, "head": {"kernel": jnp.ones((2, 3))}},
      ValueError,
      "at leaf 1: `params` has 'dense/kernel' where `anchor` has 'head/kernel'",
    ),
    (
      {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(3)}},
      ValueError,
      "`anchor` leaf at 'dense/kernel' has shape (3, 2) but the `params` leaf has shape (2, 3).",
    ),
    (
      {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(1)}},
      ValueError,
      "`anchor` leaf at 'dense/bias' has shape (1,)",
    ),
    (
      {"dense": {"kernel": "pretrained.ckpt", "bias": jnp.ones(3)}},
      TypeError,
      "`anchor` leaf at 'dense/kernel' is a str ('pretrained.ckpt'); anchor leaves must be arrays",
    ),
    (
      {"dense": {"kernel": jnp.ones((2, 3), jnp.complex64), "bias": jnp.ones(3)}},
      TypeError,
      "`anchor` leaf at 'dense/kernel' is complex but the `params` leaf is real",
    ),
  ],
)
def test_bad_anchor_names_the_first_differing_path(anchor, error, message):
  for call in _all_six(anchor=anchor)[4:]:
    with pytest.raises(error, match=re.escape(message) + ".*" + re.escape("taken before fine")):
      call()


def test_anchor_with_other_containers_shows_both_structures():
  params = {"layers": [jnp.ones((2, 2)), jnp.ones((2, 2))]}
  anchor = {"layers": (jnp.ones((2, 2)), jnp.ones((2, 2)))}  # same paths, tuple for list
  with pytest.raises(
    ValueError, match=r"(?s)same leaf paths but different containers.*params:.*anchor:"
  ):
    jaxl2.l2_sp_penalty(params, anchor, 0.1, 10)
  model = helpers.nnx_net(0)
  with pytest.raises(ValueError, match=re.escape("differ in structure")):
    jaxl2.l2_sp_penalty(model, nnx.state(model, nnx.Param), 0.1, 10)


# ---- optax: l2_sp_grad follows SGD on loss + l2_sp_penalty -------------------------


def test_l2_sp_grad_follows_sgd_on_the_penalized_loss_for_100_steps():
  assert hasattr(jaxl2, "l2_sp_grad"), (
    "jaxl2.l2_sp_grad (jaxl2/transforms/_transforms.py) is missing"
  )
  lam, m, lr = 4.0, 20.0, 0.05
  with jax.enable_x64(True):
    model = helpers.MLP(features=(8, 3))
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(16, 4))), jnp.asarray(rng.normal(size=(16, 3)))
    anchor = jax.tree_util.tree_map(  # the "pretrained" weights, in float64
      lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0), x)["params"]
    )
    start = helpers.randomize(anchor, seed=9, scale=0.3)  # fine-tuning starts elsewhere

    def loss(p):
      return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    def penalized(p):
      return loss(p) + jaxl2.l2_sp_penalty(p, anchor, lam, m)

    def run(tx, objective):
      @jax.jit
      def step(p, state):
        updates, state = tx.update(jax.grad(objective)(p), state, p)
        return optax.apply_updates(p, updates), state

      p, state, path = start, tx.init(start), []
      for _ in range(100):
        p, state = step(p, state)
        path.append(p)
      return path

    by_penalty = run(optax.sgd(lr), penalized)
    by_transform = run(optax.chain(jaxl2.l2_sp_grad(anchor, lam, m), optax.sgd(lr)), loss)
    for p_a, p_b in zip(by_penalty, by_transform, strict=True):
      # float64 on both sides: the two differ only in where (λ/m)(W − W₀) is added.
      helpers.assert_trees_close(p_a, p_b, rtol=0, atol=1e-10)

    def sq_dist(p):
      pairs = zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(anchor), strict=True)
      return sum(helpers.ref_sq_norm(helpers.as_f64(a) - helpers.as_f64(b)) for a, b in pairs)

    # The anchor term mattered: plain SGD ends farther from the anchor.
    assert sq_dist(by_penalty[-1]) < sq_dist(run(optax.sgd(lr), loss)[-1]) - 1e-3


def test_l2_sp_grad_keeps_its_anchor_in_the_state_not_in_the_compiled_update():
  # A closure over the anchor is baked into a compiled update as a constant, and cannot be
  # compiled at all once the anchor spans several processes (tests/test_multiprocess.py):
  # the anchor is an argument, from the state.
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(4)}
  anchor = {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
  tx = optax.chain(jaxl2.l2_sp_grad(anchor, 2.0, 10.0), optax.sgd(1.0))
  state = tx.init(params)
  assert isinstance(state[0], jaxl2.L2SPGradState)
  assert all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(state[0].anchor))
  np.testing.assert_array_equal(state[0].anchor["w"], anchor["w"])
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  closed = jax.make_jaxpr(tx.update)(zeros, state, params)
  assert not [c for c in closed.consts if np.size(c) > 1], closed.consts
  updates, state = jax.jit(tx.update)(zeros, state, params)
  # SGD on the decay alone: −(λ/m)·(W − W₀) on the kernel, the bias unselected; float32.
  expected = -0.2 * (helpers.as_f64(params["w"]) - anchor["w"])
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], 0.0)
  assert int(state[0].count) == 0  # a constant λ: the count only drives a schedule
