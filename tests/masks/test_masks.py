"""Masks: builders, pytree and callable forms, multipliers, and path strings."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxl2
from tests import helpers

K, B, E = "params/Dense_0/kernel", "params/Dense_0/bias", "params/Embed_0/embedding"
PARAMS = {
  "params": {
    "Dense_0": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones(4)},
    "Embed_0": {"embedding": jnp.ones((10, 3))},
    "LayerNorm_0": {"scale": jnp.ones(4)},
  },
  "step": jnp.int32(7),
}


def _selected(params, mask):
  return {r.path: r.multiplier for r in jaxl2.describe(params, mask=mask).rows if r.selected}


@pytest.mark.parametrize(
  ("mask", "expected"),
  [
    (None, {"params/Dense_0/kernel": 1.0, "params/Embed_0/embedding": 1.0}),
    (jaxl2.by_ndim(1), {
      "params/Dense_0/kernel": 1.0, "params/Dense_0/bias": 1.0,
      "params/Embed_0/embedding": 1.0, "params/LayerNorm_0/scale": 1.0,
    }),
    (jaxl2.by_name("kernel"), {"params/Dense_0/kernel": 1.0}),
    (jaxl2.by_name("kernel", "embedding"), {K: 1.0, E: 1.0}),
    (jaxl2.by_regex(r"params/Dense_\d+/.*"), {K: 1.0, B: 1.0}),
    (jaxl2.by_regex({r".*/embedding": 0.1, r".*/kernel": 1.0, r".*": 0.0}),
     {"params/Dense_0/kernel": 1.0, "params/Embed_0/embedding": 0.1}),
    # First match wins: the catch-all after `kernel` does not override it.
    (jaxl2.by_regex({r".*kernel": 2.0, r"params/.*": 0.5}), {
      "params/Dense_0/kernel": 2.0, "params/Dense_0/bias": 0.5,
      "params/Embed_0/embedding": 0.5, "params/LayerNorm_0/scale": 0.5,
    }),
    (lambda path, leaf: path.endswith("bias") * 3.0, {"params/Dense_0/bias": 3.0}),
  ],
)  # fmt: skip
def test_builders_select_and_weight(mask, expected):
  assert _selected(PARAMS, mask) == expected
  ref = helpers.ref_l2(
    [(helpers.leaves_by_path(PARAMS)[p], c) for p, c in expected.items()], 0.4, 2.0
  )
  np.testing.assert_allclose(float(jaxl2.l2_penalty(PARAMS, 0.4, 2.0, mask=mask)), ref, rtol=1e-6)


def test_all_floating_skips_integers():
  assert set(_selected(PARAMS, jaxl2.all_floating)) == {
    "params/Dense_0/kernel", "params/Dense_0/bias", "params/Embed_0/embedding",
    "params/LayerNorm_0/scale",
  }  # fmt: skip


def test_pytree_mask_full_structure_and_prefix():
  full = jax.tree_util.tree_map(lambda x: x.ndim == 1 and x.dtype == jnp.float32, PARAMS)
  assert _selected(PARAMS, full) == {"params/Dense_0/bias": 1.0, "params/LayerNorm_0/scale": 1.0}
  prefix = {"params": {"Dense_0": 0.5, "Embed_0": False, "LayerNorm_0": False}, "step": False}
  assert _selected(PARAMS, prefix) == {"params/Dense_0/kernel": 0.5, "params/Dense_0/bias": 0.5}


def test_callable_returning_a_mask_pytree_like_optax():
  def mask_fn(params):
    return jax.tree_util.tree_map(lambda x: x.ndim == 2 and x.shape[0] == 3, params)

  assert _selected(PARAMS, mask_fn) == {"params/Dense_0/kernel": 1.0}


def test_one_mask_spec_gives_the_same_selection_everywhere():
  mask = jaxl2.by_regex({r".*kernel": 2.0, r".*bias": 1.0})
  lam, m = 0.4, 2.0
  by_path = helpers.leaves_by_path(PARAMS)
  weights = {K: 2.0, B: 1.0}
  assert _selected(PARAMS, mask) == weights
  # float64 NumPy references, written from `weights`, not from jaxl2.
  value = helpers.ref_l2([(by_path[p], c) for p, c in weights.items()], lam, m)
  grads = {p: lam / m * weights.get(p, 0.0) * helpers.as_f64(x) for p, x in by_path.items()}
  np.testing.assert_allclose(float(jaxl2.l2_penalty(PARAMS, lam, m, mask=mask)), value, rtol=1e-6)
  analytic = helpers.leaves_by_path(jaxl2.l2_penalty_grad(PARAMS, lam, m, mask=mask))
  transform = jaxl2.add_l2_grad(lam, m, mask=mask)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  updates = transform.update(zeros, transform.init(PARAMS), PARAMS)[0]
  for tree in (analytic, helpers.leaves_by_path(updates)):
    for path, expected in grads.items():
      np.testing.assert_allclose(helpers.as_f64(tree[path]), expected, rtol=1e-6)


def test_callable_mask_never_sees_equinox_non_array_fields():
  import equinox as eqx

  mlp = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
  seen = []

  def mask(path, leaf):
    seen.append(path)
    return leaf.ndim >= 2  # a function or a string here would raise AttributeError

  assert set(_selected(mlp, mask)) == {"layers/0/weight", "layers/1/weight"}
  assert "activation" not in seen and "layers/0/weight" in seen


def test_regex_must_match_the_whole_path():
  # "kernel" is in every kernel's path but is no whole path: strict by_regex rejects it.
  with pytest.raises(ValueError, match="'kernel' matches no leaf"):
    jaxl2.l2_penalty(PARAMS, 0.1, 1.0, mask=jaxl2.by_regex("kernel"))
  mask = jaxl2.by_regex({r"Dense_0/kernel": 5.0, r".*/kernel": 0.5}, strict=False)
  assert _selected(PARAMS, mask) == {K: 0.5}


@pytest.mark.parametrize(
  ("value", "multiplier"),
  [
    (jnp.array(True), 1.0),
    (np.array(False), 0.0),
    (jnp.array(0.25), 0.25),
    (np.float32(0.5), 0.5),
    (np.array(3), 3.0),
  ],
)
def test_zero_dim_array_mask_values(value, multiplier):
  dense = {"kernel": value, "bias": True}
  mask = {"params": {"Dense_0": dense, "Embed_0": 0, "LayerNorm_0": 0}, "step": False}
  assert _selected(PARAMS, mask) == ({K: multiplier, B: 1.0} if multiplier else {B: 1.0})


@pytest.mark.parametrize(
  ("build", "error", "message"),
  [
    (lambda: jaxl2.by_ndim(-1), ValueError, "`min_ndim` must be an integer >= 0; got -1"),
    (lambda: jaxl2.by_ndim(True), ValueError, "`min_ndim` must be an integer >= 0; got True"),
    (lambda: jaxl2.by_name(), TypeError, "`by_name` takes one or more key names"),
    (lambda: jaxl2.by_name("kernel", 3), TypeError, "`by_name` takes one or more key names"),
    (lambda: jaxl2.by_regex(["kernel"]), TypeError, "`by_regex` takes a pattern string"),
    (lambda: jaxl2.by_regex({1: 1.0}), TypeError, "`by_regex` patterns must be strings; got 1"),
  ],
)
def test_builders_reject_bad_arguments(build, error, message):
  with pytest.raises(error, match=re.escape(message)):
    build()


class _TiedNNX(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.encoder = nnx.Linear(3, 3, rngs=rngs)
    self.decoder = nnx.Linear(3, 3, rngs=rngs)
    self.decoder.kernel = self.encoder.kernel


def test_tied_nnx_variable_counts_once_with_its_largest_multiplier():
  model = _TiedNNX(nnx.Rngs(0))
  kernel = model.encoder.kernel[...]
  # NNX flattens attributes in name order, so "decoder/kernel" is the first path.
  for weights in ({"decoder": 0.5, "encoder": 3.0}, {"decoder": 3.0, "encoder": 0.5}):
    mask = jaxl2.by_regex({rf"{name}/kernel": c for name, c in weights.items()})
    assert _selected(model, mask) == {"decoder/kernel": 3.0}
    reference = helpers.ref_l2([(kernel, 3.0)], 0.4, 2.0)  # once, at the largest multiplier
    np.testing.assert_allclose(
      float(jaxl2.l2_penalty(model, 0.4, 2.0, mask=mask)), reference, rtol=1e-6
    )


# ---- path strings ------------------------------------------------------------


@dataclasses.dataclass
class _Linear:
  w: jax.Array
  b: jax.Array


jax.tree_util.register_dataclass(_Linear, data_fields=["w", "b"], meta_fields=[])


def test_paths_for_dicts_sequences_and_attributes():
  tree = {"layers": [_Linear(jnp.ones((2, 2)), jnp.ones(2)), (jnp.ones((1, 1)),)]}
  paths = [r.path for r in jaxl2.describe(tree).rows]
  assert paths == ["layers/0/w", "layers/0/b", "layers/1/0"]


def test_nnx_paths_drop_the_value_wrapper():
  model = helpers.nnx_net(0)
  paths = {r.path for r in jaxl2.describe(model).rows}
  assert {"dense1/kernel", "dense1/bias", "bn/mean", "bn/scale"} <= paths
  assert not any(p.endswith("/value") for p in paths)
  assert _selected(model, jaxl2.by_name("kernel")) == {"dense1/kernel": 1.0, "dense2/kernel": 1.0}


def test_a_dict_key_named_value_is_kept():
  paths = [r.path for r in jaxl2.describe({"head": {"value": jnp.ones((2, 2))}}).rows]
  assert paths == ["head/value"]
