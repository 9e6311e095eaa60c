"""Masks: builders, pytree and callable forms, multipliers, and path strings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  grads = jaxl2.l2_penalty_grad(PARAMS, 1.0, 1.0, mask=mask)
  assert float(grads["params"]["Dense_0"]["kernel"][0, 0]) == 4.0  # 2 · w with w = 2
  assert float(grads["params"]["Dense_0"]["bias"][0]) == 1.0
  assert float(grads["params"]["Embed_0"]["embedding"][0, 0]) == 0.0


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
