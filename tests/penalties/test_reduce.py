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
import jaxlib.version
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import jaxl2
from tests import helpers

LAM, M = 0.3, 50.0


def _mixed_tree(seed: int = 0) -> dict:
  """~270 leaves: large and mid-size ones (reduced alone), 70 + 64 of two shapes (groups),
  60 of rare shapes (pools), complex, an empty leaf, a scalar."""
  rng = np.random.default_rng(seed)

  def normal(shape, dtype=np.float32, scale=1.0):
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32), dtype)

  tree: dict = {
    "large": [normal((128, 256)), normal((3, 3, 64, 64)), normal((40000,), jnp.bfloat16)],
    "mid": [normal((64, 70)), normal((5000,), jnp.bfloat16)],
    "same": [normal((8, 16)) for _ in range(70)],  # five groups of 14
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


def _small_tree_with_every_path(*, single: bool = True) -> tuple[dict, dict]:
  """(tree, mask): few elements, yet groups (64 leaves of one shape, multipliers differing
  within a group), a pool and, with ``single``, a leaf of 2**12 elements reduced alone.
  Values are >= 0.5 away from 0, where |x| has its kink (central differences step over it)."""
  rng = np.random.default_rng(3)

  def away_from_0(shape):
    return jnp.asarray(rng.choice([-1.0, 1.0], shape) * (0.5 + rng.random(shape)))

  tree = {
    "group": [away_from_0((1, 2)) for _ in range(64)],
    "pool": [away_from_0((2, 1)), away_from_0((3,))],
  }
  mask = {"group": [1.0, 2.0] * 32, "pool": [3.0, 3.0]}
  if single:
    tree["single"], mask["single"] = away_from_0((1, 1 << 12)), 0.5
  return tree, mask


def test_hessian_is_lam_over_m_times_multiplier_identity():
  tree, mask = _small_tree_with_every_path(single=False)  # a Hessian of 133²
  flat, unravel = ravel_pytree(tree)
  hess = jax.hessian(lambda v: jaxl2.l2_penalty(unravel(v), LAM, M, mask=mask))(flat)
  mults, _ = ravel_pytree(jax.tree_util.tree_map(lambda w, c: jnp.full(w.shape, c), tree, mask))
  # Exact up to float32 rounding of λ/m·c: the Hessian of (λ/2m)·c·w² is (λ/m)·c.
  np.testing.assert_allclose(np.asarray(hess), LAM / M * np.diag(mults), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("penalty", [jaxl2.l2_penalty, jaxl2.l1_penalty])
def test_check_grads_second_order_forward_and_reverse_in_float64(penalty):
  with jax.enable_x64(True):
    tree, mask = _small_tree_with_every_path()
    tree = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)
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


# (tree, mask, reductions in the plan of jaxl2/penalties/_reduce.py): leaves >= 2**14 elements,
# and leaves >= 2**12 of a shape fewer than 64 leaves share, one reduction each; >= 64
# small leaves of one shape in groups of at most 16 (32 from 256 leaves on; sizes within
# one); other leaves concatenated per (dtype, multiplier), <= 256 per pool (sizes within
# one). XLA turns a pool of one element into a reshape (no reduction).
_PLANS = {
  # ceil(1000 / 32) = 32 groups (8 of 32, 24 of 31). Per-leaf reductions would be 1000.
  "1000 of one shape": ({f"layer{i}": _ones((10, 20)) for i in range(1000)}, None, 32),
  "64 of one shape": ({f"layer{i}": _ones((4, 4)) for i in range(64)}, None, 4),  # 4 x 16
  "63 of one shape": ({f"layer{i}": _ones((4, 4)) for i in range(63)}, None, 1),  # a pool
  "every path": (
    {
      "large": [_ones((128, 256)), _ones((40000,), jnp.bfloat16), _ones((3, 3, 64, 64))],  # 3
      "same": [_ones((8, 16)) for _ in range(100)],  # 7 groups of 14 or 15
      "rare": [_ones((2, i + 1)) for i in range(300)],  # float32 x 1: 2 pools of 150
      "mid": [_ones((4096 + 7 * i,)) for i in range(5)],  # >= 2**12: never pooled, 5
      "under": [_ones((4095 - i,)) for i in range(5)],  # float32 x 2: 1 pool
      "rare_bf16": [_ones((i + 1,), jnp.bfloat16) for i in range(10)],  # 1 pool
      "complex": [_ones((3, 5), jnp.complex64) for _ in range(3)],  # 1 pool
    },
    lambda path, leaf: 2.0 if path.startswith("under/") else 1.0,
    3 + 7 + 2 + 5 + 1 + 1 + 1,
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


def test_large_and_mid_size_leaves_are_never_copied():
  # >= 2**14 elements, and >= 2**12 elements of a shape fewer than 64 leaves share:
  # each reduced where it is (XLA CPU's library reduction), never concatenated.
  tree = {
    "a": jnp.ones((256, 256)),
    "c": jnp.ones((512, 128)),
    "d": jnp.ones((1, 1 << 16)),
    "mid": [jnp.ones((64, 64)), jnp.ones((3, 3, 32, 33)), jnp.ones((1, 16383))],
  }
  lowered = jax.jit(lambda t: jaxl2.l2_penalty(t, LAM, M)).lower(tree).as_text()
  assert "concatenate" not in lowered
  np.testing.assert_allclose(
    float(jaxl2.l2_penalty(tree, LAM, M)),
    LAM / (2 * M) * (3 * (1 << 16) + 4096 + 9504 + 16383),
    rtol=1e-6,
  )


def _large_leaves() -> dict:
  """20 leaves of distinct shapes, >= 2**14 elements each: one kernel of single leaves."""
  rng = np.random.default_rng(5)
  return {
    f"layer{i}": jnp.asarray(rng.standard_normal((128 + i, 130)), jnp.float32) for i in range(20)
  }


def test_large_leaves_share_one_traced_kernel():
  # One jitted function for all of them (traced, lowered and differentiated once),
  # not one per leaf or per shape: what keeps compile time at the per-leaf sum's.
  lowered = jax.jit(lambda t: jaxl2.l2_penalty(t, LAM, M)).lower(_large_leaves()).as_text()
  assert len(re.findall(r"func\.func private @", lowered)) == 1


def test_gradient_of_large_leaves_is_one_multiply_per_leaf_and_exact():
  tree = _large_leaves()
  fn = lambda t: jaxl2.l2_penalty(t, LAM, M)  # noqa: E731
  # The forward dots are dead code: the lowered gradient holds no dot (whose
  # transpose XLA compiles slowly) and no reduction, only (λ/m)·W per leaf.
  lowered = jax.jit(jax.grad(fn)).lower(tree).as_text()
  assert "dot_general" not in lowered and "reduce" not in lowered
  # (λ/2m)·2·W in float32 equals (λ/m)·W bit for bit: doubling is exact.
  got = jax.jit(jax.grad(fn))(tree)
  for path, w in tree.items():
    np.testing.assert_array_equal(np.asarray(got[path]), np.float32(LAM / M) * np.asarray(w))


def test_pools_are_copied_not_fused_on_cpu():
  # XLA CPU fuses a concatenation of up to 8 vectors into a loop kernel of its own
  # (tens of ms of LLVM per pool); rows joined along the minor axis stay a memcpy.
  tree = {f"rare{i}": _ones((3, 10 + i)) for i in range(5)}
  tree = jax.device_put(tree, jax.devices("cpu")[0])
  hlo = jax.jit(lambda t: jaxl2.l2_penalty(t, LAM, M)).lower(tree).compile().as_text()
  entry = hlo[hlo.index("ENTRY") :]
  assert re.search(r"= f32\[1,\d+\]\S* concatenate\(", entry), entry
  assert not re.search(r"concatenate", hlo[: hlo.index("ENTRY")])  # in no fused computation


def _jaxlib_version() -> tuple[int, ...]:
  return tuple(int(n) for n in re.findall(r"\d+", jaxlib.version.__version__)[:3])


def test_fp16_leaves_upcast_before_squaring_on_every_path():
  # 1800² overflows float16 (max 65504); the sum must be exact to float32.
  tree = {
    "large": jnp.full((128, 130), 1800.0, jnp.float16),
    "mid": jnp.full((64, 70), 1800.0, jnp.float16),
    "group": [jnp.full((4, 4), 1800.0, jnp.float16)] * 64,
    "rare": jnp.full((3, 7), -1800.0, jnp.float16),
  }
  got = jaxl2.l2_penalty(tree, 2.0, 1.0)
  # XLA CPU sums the 16,640 equal float32 squares of "large" in a tree from jaxlib 0.10.2
  # (exact here); before, in sequence, as `jnp.sum` does: 1.2e-5 off. Overflow would be inf.
  rtol = 1e-6 if _jaxlib_version() >= (0, 10, 2) else 2e-5
  np.testing.assert_allclose(
    float(got), 1800.0**2 * (128 * 130 + 64 * 70 + 64 * 16 + 21), rtol=rtol
  )
