"""The reduction behind every penalty, on trees that take each of its paths.

Large leaves (>= 2**14 elements) are reduced one by one; many (>= 64) small
leaves of one shape are summed elementwise in groups; the other small leaves
are flattened and concatenated. Every path must give the float64 reference value,
the analytic gradient (first and second order, forward and reverse mode), and
work under jit and vmap. The tests go through the public API only.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import jaxl2
from tests import helpers

LAM, M = 0.3, 50.0


def _mixed_tree(seed: int = 0) -> dict:
  """~260 leaves: large ones, 70 + 64 of two shapes, 60 of rare shapes, complex, a scalar."""
  rng = np.random.default_rng(seed)

  def normal(shape, dtype=np.float32, scale=1.0):
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32), dtype)

  tree: dict = {
    "large": [normal((128, 256)), normal((3, 3, 64, 64)), normal((40000,), jnp.bfloat16)],
    "same": [normal((8, 16)) for _ in range(70)],  # three groups of 24, 23, 23
    "same_fp16": [normal((4, 4), jnp.float16, scale=300.0) for _ in range(64)],
    "rare": [normal((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) for _ in range(60)],
    "complex": [
      jnp.asarray(rng.standard_normal((3, 5)) + 1j * rng.standard_normal((3, 5)), jnp.complex64)
      for _ in range(3)
    ],
    "empty": jnp.zeros((0, 4)),
    "scalar": 1.5,
  }
  return tree


def _multiplier(path: str) -> float:
  # Different multipliers inside one group, and per pool.
  if path.startswith("same/"):
    return 2.0 if int(path.split("/")[1]) % 3 == 0 else 1.0
  return {"large": 0.5, "rare": 3.0}.get(path.split("/")[0], 1.0)


def _mask(path: str, leaf) -> float:
  del leaf
  return _multiplier(path)


def _reference(tree: dict, lam: float = LAM, m: float = M) -> float:
  """(λ/2m) · Σ c·‖W‖² in float64, over every leaf."""
  return helpers.ref_l2(
    [(w, _multiplier(p)) for p, w in helpers.leaves_by_path(tree).items()], lam, m
  )


@pytest.mark.parametrize("jit", [False, True])
def test_value_of_every_path_matches_float64_reference(jit):
  tree = _mixed_tree()
  fn = lambda t: jaxl2.l2_penalty(t, LAM, M, mask=_mask)  # noqa: E731
  got = (jax.jit(fn) if jit else fn)(tree)
  assert got.dtype == jnp.float32 and got.shape == ()
  # float32 accumulation over ~10^5 elements, pairwise: relative error well under 1e-6.
  np.testing.assert_allclose(float(got), _reference(tree), rtol=1e-6)


def test_grad_of_every_path_equals_analytic_and_reference():
  tree = _mixed_tree(1)
  auto = jax.jit(jax.grad(lambda t: jaxl2.l2_penalty(t, LAM, M, mask=_mask)))(tree)
  analytic = jax.jit(lambda t: jaxl2.l2_penalty_grad(t, LAM, M, mask=_mask))(tree)
  auto, analytic = helpers.leaves_by_path(auto), helpers.leaves_by_path(analytic)
  # (λ/2m)·2c·w by autodiff vs (λ/m)·c·w: equal up to an ulp or two of the leaf dtype.
  for path, w in helpers.leaves_by_path(tree).items():
    got, want = auto[path], analytic[path]
    assert got.dtype == jnp.asarray(w).dtype, path
    rtol = 1e-2 if jnp.asarray(w).dtype in (jnp.bfloat16, jnp.float16) else 1e-6
    np.testing.assert_allclose(helpers.as_f64(got), helpers.as_f64(want), rtol=rtol, err_msg=path)
    ref = LAM / M * _multiplier(path) * np.conj(helpers.as_f64(w))
    np.testing.assert_allclose(helpers.as_f64(got), ref, rtol=rtol, atol=1e-30, err_msg=path)


def test_l1_penalty_value_and_grad_on_every_path():
  # abs has no closed-form slope registered: its tangent goes through jax.jvp.
  tree = _mixed_tree(2)
  leaves = helpers.leaves_by_path(tree)
  ref = LAM / M * sum(_multiplier(p) * np.sum(np.abs(helpers.as_f64(w))) for p, w in leaves.items())
  got = jax.jit(lambda t: jaxl2.l1_penalty(t, LAM, M, mask=_mask))(tree)
  np.testing.assert_allclose(float(got), ref, rtol=1e-6)
  auto = jax.jit(jax.grad(lambda t: jaxl2.l1_penalty(t, LAM, M, mask=_mask)))(tree)
  analytic = jax.jit(lambda t: jaxl2.l1_penalty_grad(t, LAM, M, mask=_mask))(tree)
  helpers.assert_trees_close(auto, analytic, rtol=1e-6)


def _small_tree_with_every_path() -> dict:
  """Few elements (for Hessians), yet a group (64 leaves of one shape) and a pool."""
  rng = np.random.default_rng(3)
  return {
    "group": [jnp.asarray(rng.standard_normal((1, 2))) for _ in range(64)],
    "pool": [jnp.asarray(rng.standard_normal((2, 1))), jnp.asarray(rng.standard_normal((3,)))],
  }


def test_hessian_is_lam_over_m_times_multiplier_identity():
  tree = _small_tree_with_every_path()
  mask = {"group": [1.0, 2.0] * 32, "pool": [3.0, 3.0]}
  flat, unravel = ravel_pytree(tree)
  hess = jax.hessian(lambda v: jaxl2.l2_penalty(unravel(v), LAM, M, mask=mask))(flat)
  mults, _ = ravel_pytree(jax.tree_util.tree_map(lambda w, c: jnp.full(w.shape, c), tree, mask))
  # Exact up to float32 rounding of λ/m·c: the Hessian of (λ/2m)·c·w² is (λ/m)·c.
  np.testing.assert_allclose(np.asarray(hess), LAM / M * np.diag(mults), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("penalty", [jaxl2.l2_penalty, jaxl2.l1_penalty])
def test_check_grads_second_order_forward_and_reverse_in_float64(penalty):
  with jax.enable_x64(True):
    tree = jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, jnp.float64), _small_tree_with_every_path()
    )
    mask = {"group": [1.0, 2.0] * 32, "pool": [3.0, 3.0]}
    # Central differences with eps=1e-4: JAX's float64 default tolerance (1e-5) applies.
    check_grads(lambda t: penalty(t, LAM, M, mask=mask), (tree,), order=2, modes=("fwd", "rev"))


def test_vmap_over_lam_and_over_stacked_params():
  tree = _mixed_tree(4)
  lams = jnp.array([0.0, 0.1, 1.0])
  over_lam = jax.jit(jax.vmap(lambda lam: jaxl2.l2_penalty(tree, lam, M, mask=_mask)))(lams)
  np.testing.assert_allclose(
    np.asarray(over_lam), [_reference(tree, lam) for lam in [0, 0.1, 1]], rtol=1e-6
  )
  # One model per λ, as `jaxl2.sweep` trains them: params batched along a leading axis.
  other = jax.tree_util.tree_map(lambda x: -0.5 * x, tree)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), tree, other)
  batched = jax.jit(jax.vmap(lambda t: jaxl2.l2_penalty(t, LAM, M, mask=_mask)))(stacked)
  np.testing.assert_allclose(np.asarray(batched), [_reference(tree), _reference(other)], rtol=1e-6)


# A reduction in the optimized HLO: `reduce(`, not `all-reduce(` or `reduce-window(`
# (as bench/suite_multidevice.py counts them).
_REDUCE = re.compile(r"(?<![\w-])reduce\(")


def _ones(shape, dtype=np.float32):
  # NumPy first: `jnp.ones` would compile a broadcast per distinct shape.
  return jnp.asarray(np.ones(shape, np.float32), dtype)


def _reductions(fn, tree) -> int:
  """Reductions in ``jit(fn)``'s optimized HLO, compiled for the CPU.

  On CPU each kernel of the plan is one reduction; other backends may split a
  large one in two (GPU's tree-reduction rewrite), so the count is taken on CPU.
  """
  tree = jax.device_put(tree, jax.devices("cpu")[0])
  return len(_REDUCE.findall(jax.jit(fn).lower(tree).compile().as_text()))


# (tree, mask, kernels in the plan of jaxl2/_reduce.py): leaves >= 2**14 elements
# alone; >= 64 small leaves of one shape in groups of at most 32 (sizes within one);
# other small leaves concatenated per (dtype, multiplier), <= 256 leaves and <= 2**20
# elements per pool. XLA turns a pool of one element into a reshape (no reduction).
_PLANS = {
  # ceil(1000 / 32) = 32 groups (8 of 32, 24 of 31). Per-leaf reductions would be 1000.
  "1000 of one shape": ({f"layer{i}": _ones((10, 20)) for i in range(1000)}, None, 32),
  "64 of one shape": ({f"layer{i}": _ones((4, 4)) for i in range(64)}, None, 2),  # 2 x 32
  "63 of one shape": ({f"layer{i}": _ones((4, 4)) for i in range(63)}, None, 1),  # a pool
  "every path": (
    {
      "large": [_ones((128, 256)), _ones((40000,), jnp.bfloat16), _ones((3, 3, 64, 64))],  # 3
      "same": [_ones((8, 16)) for _ in range(100)],  # 4 groups of 25
      "rare": [_ones((2, i + 1)) for i in range(300)],  # float32 x 1: pools of 256 and 44
      "big": [_ones((16383 - i,)) for i in range(70)],  # float32 x 2: 64 leaves fill 2**20: 2
      "rare_bf16": [_ones((i + 1,), jnp.bfloat16) for i in range(10)],  # 1 pool
      "complex": [_ones((3, 5), jnp.complex64) for _ in range(3)],  # 1 pool
    },
    lambda path, leaf: 2.0 if path.startswith("big/") else 1.0,
    3 + 4 + 2 + 2 + 1 + 1,
  ),
}


@pytest.mark.parametrize("case", list(_PLANS))
def test_penalty_compiles_to_one_reduction_per_kernel_of_the_plan(case):
  tree, mask, kernels = _PLANS[case]
  fn = lambda t: jaxl2.l2_penalty(t, LAM, M, mask=mask)  # noqa: E731
  assert _reductions(fn, tree) == kernels


def test_many_leaves_value_and_a_gradient_with_no_reduction():
  tree, _, _ = _PLANS["1000 of one shape"]
  fn = lambda t: jaxl2.l2_penalty(t, LAM, M)  # noqa: E731
  # Σ of 1000·200 ones: exact in float32.
  np.testing.assert_allclose(float(jax.jit(fn)(tree)), LAM / (2 * M) * 1000 * 200, rtol=1e-6)
  # The gradient is elementwise: (λ/m)·W on each leaf, no reduction left after XLA's DCE.
  grad_hlo = jax.jit(jax.grad(fn)).lower(tree).compile().as_text()
  assert not re.search(r"\breduce(-window)?\(", grad_hlo)


def test_large_leaves_are_never_copied():
  tree = {"a": jnp.ones((256, 256)), "c": jnp.ones((512, 128)), "d": jnp.ones((1, 1 << 16))}
  lowered = jax.jit(lambda t: jaxl2.l2_penalty(t, LAM, M)).lower(tree).as_text()
  assert "concatenate" not in lowered  # each large leaf is reduced where it is
  np.testing.assert_allclose(
    float(jaxl2.l2_penalty(tree, LAM, M)), LAM / (2 * M) * 3 * (1 << 16), rtol=1e-6
  )


def test_fp16_leaves_upcast_before_squaring_in_groups_and_pools():
  # 1800² overflows float16 (max 65504); the sum must be exact to float32.
  tree = {
    "group": [jnp.full((4, 4), 1800.0, jnp.float16)] * 64,
    "rare": jnp.full((3, 7), -1800.0, jnp.float16),
  }
  got = jaxl2.l2_penalty(tree, 2.0, 1.0)
  np.testing.assert_allclose(float(got), 1800.0**2 * (64 * 16 + 21), rtol=1e-6)
