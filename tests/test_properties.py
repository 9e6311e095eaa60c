"""Hypothesis: random pytrees, shapes, dtypes and masks against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxl2
from tests import helpers

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64]
# The penalty accumulates in float32; inputs are exact in their own dtype, so
# the only error is float32 summation: 1e-5 relative covers trees of <= 1e4 elements.
RTOL = 1e-5


@st.composite
def leaves(draw):
  shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
  dtype = draw(st.sampled_from(DTYPES))
  seed = draw(st.integers(0, 2**31 - 1))
  scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
  x = np.random.default_rng(seed).normal(size=shape) * scale
  if dtype == jnp.complex64:
    x = x + 1j * np.random.default_rng(seed + 1).normal(size=shape) * scale
  return jnp.asarray(x, dtype)


trees = st.recursive(
  leaves(),
  lambda children: st.one_of(
    st.dictionaries(st.sampled_from(["kernel", "bias", "w", "scale", "emb"]), children, max_size=3),
    st.lists(children, max_size=3),
    st.lists(children, max_size=2).map(tuple),
  ),
  max_leaves=8,
)


# Shape-only selection: the default `by_role` is checked on real models in test_models.py.
_BY_SHAPE = jaxl2.by_ndim(2)


@st.composite
def masks(draw, tree):
  paths = list(helpers.leaves_by_path(tree))
  kind = draw(st.sampled_from(["default", "all", "mult", "name", "pytree"]))
  if kind == "default":
    return _BY_SHAPE
  if kind == "all":
    return jaxl2.all_floating
  if kind == "name":
    return jaxl2.by_name("kernel", "w", strict=False)
  mults = draw(
    st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=len(paths), max_size=len(paths))
  )
  if kind == "mult":
    table = dict(zip(paths, mults, strict=True))
    return lambda path, leaf: table[path]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), mults)


def _reference_selection(tree, mask):
  out = []
  for path, w in helpers.leaves_by_path(tree).items():
    floating = jnp.issubdtype(w.dtype, jnp.inexact)
    if mask is _BY_SHAPE:
      c = float(floating and w.ndim >= 2)
    elif mask is jaxl2.all_floating:
      c = float(floating)
    elif not callable(mask) or getattr(mask, "__name__", "") == "<lambda>":
      c = float(mask(path, w)) if callable(mask) else None
    else:
      c = float(path.rsplit("/", 1)[-1] in ("kernel", "w"))
    out.append((path, w, c))
  if not callable(mask):
    flat = jax.tree_util.tree_leaves(mask)
    out = [(p, w, float(c)) for (p, w, _), c in zip(out, flat, strict=True)]
  return out


@given(data=st.data())
def test_penalty_and_gradient_match_float64_reference(data):
  tree = data.draw(trees)
  mask = data.draw(masks(tree))
  lam = data.draw(st.sampled_from([0.0, 1e-3, 0.7, 5.0]))
  m = data.draw(st.sampled_from([1, 7, 1000.0]))
  reference = _reference_selection(tree, mask)
  if not reference:
    assert float(jaxl2.l2_penalty(tree, lam, m, mask=mask)) == 0.0
    return
  if not any(c for _, _, c in reference):
    try:
      jaxl2.l2_penalty(tree, lam, m, mask=mask)
    except ValueError as err:
      assert "selected no parameters" in str(err)
    else:
      raise AssertionError("a mask that selects nothing must raise")
    return

  expected = helpers.ref_l2([(w, c) for _, w, c in reference], lam, m)
  got = jaxl2.l2_penalty(tree, lam, m, mask=mask)
  wide = any(w.dtype in (jnp.float64, jnp.complex128) for _, w, c in reference if c)
  assert got.dtype == (jnp.float64 if wide else jnp.float32)
  np.testing.assert_allclose(float(got), expected, rtol=RTOL, atol=1e-30)

  grads = helpers.leaves_by_path(jaxl2.l2_penalty_grad(tree, lam, m, mask=mask))
  auto = helpers.leaves_by_path(jax.grad(jaxl2.l2_penalty)(tree, lam, m, mask=mask))
  for path, w, c in reference:
    assert grads[path].dtype == w.dtype
    want = lam / m * c * np.conj(helpers.as_f64(w))
    # The gradient is rounded once to the leaf's dtype (bf16 keeps 8 bits: 2^-8
    # relative), and below the normal range to its subnormal spacing.
    tol = {jnp.bfloat16: 8e-3, jnp.float16: 1e-3}.get(w.dtype.type, 1e-6)
    atol = float(jnp.finfo(w.dtype).smallest_subnormal)
    np.testing.assert_allclose(helpers.as_f64(grads[path]), want, rtol=tol, atol=atol)
    np.testing.assert_allclose(helpers.as_f64(auto[path]), want, rtol=tol, atol=atol)
