"""Hypothesis: random pytrees, dtypes and masks against a float64 NumPy reference.

Two kinds of trees. Small nested ones (<= 8 leaves, any structure) take one
path of the reduction at a time; large ones take every path in one call (see
jaxl2/penalties/_reduce.py): >= 64 leaves of one small shape (summed in groups), a few
small leaves of other shapes (concatenated into pools) and a leaf of >= 2**14
elements (reduced alone), in each half of an {"encoder": ..., "decoder": ...}
tree. Either kind is drawn with 32-bit dtypes, or under `jax.enable_x64` with
float64 and complex128 leaves as well. Masks: shape and name rules, `by_regex`
(one pattern, or a {pattern: multiplier} table), callables ``(path, leaf)`` and
``params -> pytree``, and pytrees of bools/multipliers, full or a prefix of the
params. Each mask is drawn with its expected multipliers, computed here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import jaxl2
from tests import helpers

DTYPES_32 = [np.float32, jnp.bfloat16, np.float16, np.complex64]
DTYPES_64 = [*DTYPES_32, np.float64, np.complex128]
WIDE = (np.float64, np.complex128)
# float32 accumulation: inputs are exact in their own dtype and upcast, so the only
# error is float32 summation of positive terms, <= ~4e4 of them here: 1e-5 relative.
RTOL_32 = 1e-5
# float64 accumulation (a selected leaf is 64-bit): float64 summation, 1e-12 relative.
RTOL_64 = 1e-12
# The gradient (λ/m)·c·W is rounded once or twice to the leaf's dtype: relative
# tolerance per dtype (bf16 keeps 8 bits: 2^-8); below the normal range, the
# subnormal spacing (the `atol` in `_check`).
GRAD_RTOL = {jnp.bfloat16: 8e-3, np.float16: 1e-3, np.float64: 1e-12, np.complex128: 1e-12}


@st.composite
def arrays(draw, dtypes, shape=None):
  """A NumPy array of a drawn dtype; converted to JAX inside the test (x64 or not)."""
  if shape is None:
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
  dtype = draw(st.sampled_from(dtypes))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
  x = rng.normal(size=shape) * scale
  if np.issubdtype(np.dtype(dtype), np.complexfloating):
    x = x + 1j * rng.normal(size=shape) * scale
  return np.asarray(x).astype(dtype)


def small_trees(dtypes):
  return st.recursive(
    arrays(dtypes),
    lambda children: st.one_of(
      st.dictionaries(
        st.sampled_from(["kernel", "bias", "w", "scale", "emb"]), children, max_size=3
      ),
      st.lists(children, max_size=3),
      st.lists(children, max_size=2).map(tuple),
    ),
    max_leaves=8,
  )


_SMALL_SHAPES = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@st.composite
def large_trees(draw, dtypes):
  """Each half: 64-70 same-shape kernels, 2-5 rare small leaves, one leaf >= 2**14."""
  group_shape = draw(st.sampled_from([(2, 3), (5,), (1, 2, 2)]))

  def half():
    n_group = draw(st.integers(64, 70))
    return {
      "blocks": [{"kernel": draw(arrays(dtypes, group_shape))} for _ in range(n_group)],
      "rare": [
        draw(arrays(dtypes, s)) for s in draw(st.lists(_SMALL_SHAPES, min_size=2, max_size=5))
      ],
      "big": draw(arrays(dtypes, draw(st.sampled_from([(128, 128), (3, 80, 70), (16389,)])))),
    }

  return {"encoder": half(), "decoder": half()}


# Shape-only selection: the default `by_role` is checked on real models in test_models.py.
_BY_SHAPE = jaxl2.by_ndim(2)
_PATTERNS = [r".*kernel", r"encoder/.*", r".*/[0-9]+(/.*)?", r".*(scale|big)", r"w|bias|emb", ".*"]
_VALUES = st.sampled_from([False, True, 0.0, 0.5, 2.0])
_RULES = ["ndim", "all", "name", "regex", "callable", "tree_fn", "pytree"]
_KINDS = _RULES + ["regex_table", "prefix"] * 2  # most ways to get them wrong: twice as often


def _prefix_mask(draw, tree):
  """A mask pytree one level deep: a value per child of the root (or for the root leaf)."""
  if isinstance(tree, dict):
    return {k: draw(_VALUES) for k in tree}
  if isinstance(tree, (list, tuple)):
    return type(tree)(draw(_VALUES) for _ in tree)
  return draw(_VALUES)


def _prefix_value(mask, path):
  if not isinstance(mask, (dict, list, tuple)):
    return mask
  first = path.split("/")[0]
  return mask[first] if isinstance(mask, dict) else mask[int(first)]


@st.composite
def masks(draw, tree):
  """(mask, {path: expected multiplier}) with the expectation written independently."""
  leaves = helpers.leaves_by_path(tree)
  kind = draw(st.sampled_from(_KINDS))
  if kind == "ndim":
    return _BY_SHAPE, {p: float(w.ndim >= 2) for p, w in leaves.items()}
  if kind == "all":
    return jaxl2.all_floating, dict.fromkeys(leaves, 1.0)
  if kind == "name":
    mults = {p: float(p.rsplit("/", 1)[-1] in ("kernel", "w")) for p in leaves}
    return jaxl2.by_name("kernel", "w", strict=False), mults
  if kind == "regex":
    pattern = draw(st.sampled_from(_PATTERNS))
    mults = {p: float(re.fullmatch(pattern, p) is not None) for p in leaves}
    return jaxl2.by_regex(pattern, strict=False), mults
  if kind == "regex_table":
    # Generic patterns and exact paths of this tree, so that patterns overlap often.
    choices = _PATTERNS + [re.escape(p) for p in leaves]
    patterns = draw(st.lists(st.sampled_from(choices), min_size=2, max_size=3, unique=True))
    if ".*" not in patterns and draw(st.integers(0, 3)):
      patterns.append(".*")  # a fallback after the others (3 times in 4): order decides
    # Distinct multipliers, so that which pattern decides always shows in the value.
    mults = draw(st.permutations([0.0, 0.5, 1.0, 3.0]))
    table = dict(zip(patterns, mults, strict=False))
    # The first pattern that matches, in insertion order, gives the multiplier; else 0.
    first = {p: next((c for q, c in table.items() if re.fullmatch(q, p)), 0.0) for p in leaves}
    return jaxl2.by_regex(table, strict=False), first
  if kind == "callable":  # (path, leaf) -> multiplier, reading both arguments
    table = {p: draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])) for p in leaves}
    mults = {p: table[p] * (1.0 if w.ndim else 0.5) for p, w in leaves.items()}
    return (lambda path, leaf: table[path] * (1.0 if leaf.ndim else 0.5)), mults
  if kind == "tree_fn":  # params -> bool pytree, optax's callable form
    mults = {p: float(w.size > 4) for p, w in leaves.items()}
    return (lambda params: jax.tree_util.tree_map(lambda w: w.size > 4, params)), mults
  if kind == "pytree":  # full structure of the params
    values = [draw(_VALUES) for _ in leaves]
    mask = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), values)
    return mask, {p: float(v) for p, v in zip(leaves, values, strict=True)}
  mask = _prefix_mask(draw, tree)
  return mask, {p: float(_prefix_value(mask, p)) for p in leaves}


def _check(np_tree, mask, mults, lam, m, *, eager):
  """Penalty and both gradients, under `jax.jit` (and the penalty eagerly if ``eager``),
  against the float64 NumPy reference. The JAX leaves are made here (x64 or not)."""
  tree = jax.tree_util.tree_map(jnp.asarray, np_tree)
  leaves = helpers.leaves_by_path(tree)
  penalty = lambda t: jaxl2.l2_penalty(t, lam, m, mask=mask)  # noqa: E731
  if not leaves:
    assert float(penalty(tree)) == 0.0
    return
  if not any(mults.values()):
    try:
      penalty(tree)
    except ValueError as err:
      assert "selected no parameters" in str(err)
    else:
      raise AssertionError("a mask that selects nothing must raise")
    return

  # One program: value, jax.grad, and the analytic gradient.
  (got, auto), grads = jax.jit(
    lambda t: (jax.value_and_grad(penalty)(t), jaxl2.l2_penalty_grad(t, lam, m, mask=mask))
  )(tree)
  expected = helpers.ref_l2([(w, mults[p]) for p, w in leaves.items()], lam, m)
  wide = any(w.dtype in WIDE for p, w in leaves.items() if mults[p])
  rtol = RTOL_64 if wide else RTOL_32
  for value in [got, penalty(tree)] if eager else [got]:
    assert value.dtype == (jnp.float64 if wide else jnp.float32)
    np.testing.assert_allclose(float(value), expected, rtol=rtol, atol=1e-300)

  grads, auto = helpers.leaves_by_path(grads), helpers.leaves_by_path(auto)
  for path, w in leaves.items():
    assert grads[path].dtype == auto[path].dtype == w.dtype, path
    want = lam / m * mults[path] * np.conj(helpers.as_f64(w))
    rtol = GRAD_RTOL.get(w.dtype.type, 1e-6)
    atol = float(jnp.finfo(w.dtype).smallest_subnormal)
    np.testing.assert_allclose(
      helpers.as_f64(grads[path]), want, rtol=rtol, atol=atol, err_msg=path
    )
    np.testing.assert_allclose(helpers.as_f64(auto[path]), want, rtol=rtol, atol=atol, err_msg=path)


# λ > 0 only: at λ = 0 every mask gives 0, so a wrong mask would pass (λ = 0 is its own
# test below).
_LAMS = st.sampled_from([1e-3, 0.7, 5.0])
_MS = st.sampled_from([1, 7, 1000.0])


def _draw_and_check(data, trees, *, eager):
  """Draws 64-bit or not, a tree from ``trees``, a mask, λ and m; checks them."""
  x64 = data.draw(st.booleans(), label="x64")
  with jax.enable_x64(x64):
    tree = data.draw(trees(DTYPES_64 if x64 else DTYPES_32))
    mask, mults = data.draw(masks(tree))
    _check(tree, mask, mults, data.draw(_LAMS), data.draw(_MS), eager=eager)


@given(data=st.data())
def test_small_trees_match_float64_reference(data):
  _draw_and_check(data, small_trees, eager=True)


# Each example compiles its own program (~1 s): a fixed, small count whatever the
# profile, and no shrinking (minutes on trees of ~150 leaves; the failing draw is printed).
@settings(max_examples=12, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def test_large_trees_take_every_reduction_path_and_match_float64_reference(data):
  _draw_and_check(data, large_trees, eager=False)


def test_lam_zero_gives_exactly_zero_penalty_and_gradient():
  # The λ = 0 case the property tests no longer draw: exactly 0, not rounding noise, under
  # jit and eagerly, for float32, bfloat16 and complex leaves, whatever the mask selects.
  tree = {
    "w": np.full((3, 4), 2.5, np.float32),
    "h": np.full((4,), 3.0, jnp.bfloat16),
    "z": np.full((2, 2), 1 + 2j, np.complex64),
  }
  for mask in (None, jaxl2.all_floating, jaxl2.by_regex({"w": 0.5, "z": 3.0}, strict=False)):
    penalty = lambda t, mask=mask: jaxl2.l2_penalty(t, 0.0, 7, mask=mask)  # noqa: E731
    value, auto = jax.jit(jax.value_and_grad(penalty))(tree)
    grads = jaxl2.l2_penalty_grad(tree, 0.0, 7, mask=mask)
    assert float(value) == 0.0 and float(penalty(tree)) == 0.0
    for gradient in (auto, grads):
      for path, g in helpers.leaves_by_path(gradient).items():
        assert not np.any(helpers.as_f64(g)), path
