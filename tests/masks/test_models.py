"""The default mask on real architectures: exact selection, float64 values, gradients.

Models live in `tests/real_models.py` (flax ImageNet ResNet, big_vision ViT with and
without `nn.scan`, lm1b, NNX with `nnx.vmap`-stacked layers and tied weights, Haiku's
ResNet18 with its state, Equinox CNN/MLP/stateful/ensemble, PyTorch/GPT-2/Keras names).
Each lists, by hand, the leaves the default must select.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxl2
from tests import helpers, real_models

LAM, M = 0.3, 1000.0
MODELS = {real_models.builder_id(b): b for b in real_models.ALL_MODELS}


@functools.cache
def _model(name: str) -> real_models.RealModel:
  """The model with every floating leaf redrawn at random (zero-initialized heads and biases
  would make "the gradient is 0 there" true whatever the mask). NNX goes through its Param
  state, which holds a tied Variable once, so the tie survives."""
  model = MODELS[name]()
  params = model.params
  if isinstance(params, nnx.Module):
    nnx.update(params, helpers.randomize(nnx.state(params, nnx.Param), seed=5))
    return model
  return model._replace(params=helpers.randomize(params, seed=5))


def _floating(params):
  """{path: leaf} of the floating array leaves, paths written without jaxl2."""
  return {
    p: w
    for p, w in real_models.leaves_with_paths(params)
    if hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.inexact)
  }


def _autodiff(params, fn):
  """{path: ∂fn/∂leaf} over the floating leaves, the way each framework's users take it."""
  if isinstance(params, nnx.Module):
    return helpers.leaves_by_path(nnx.grad(fn)(params))  # one entry per Param Variable
  if isinstance(params, eqx.Module):
    grads = eqx.filter_grad(fn)(params)
    return {p: g for p, g in real_models.leaves_with_paths(grads) if g is not None}
  leaves, treedef = jax.tree_util.tree_flatten(params)
  index = [i for i, w in enumerate(leaves) if jnp.issubdtype(getattr(w, "dtype", int), jnp.inexact)]

  def on_floats(floats):
    full = list(leaves)
    for i, w in zip(index, floats, strict=True):
      full[i] = w
    return fn(jax.tree_util.tree_unflatten(treedef, full))

  grads = jax.grad(on_floats)([jnp.asarray(leaves[i]) for i in index])
  all_paths = real_models.paths(params)
  return {all_paths[i]: g for i, g in zip(index, grads, strict=True)}


@pytest.mark.parametrize("name", list(MODELS))
def test_default_selects_exactly_the_listed_leaves(name):
  model = _model(name)
  rows = jaxl2.describe(model.params).rows
  assert tuple(r.path for r in rows if r.selected) == model.selected
  assert all(r.multiplier == 1.0 for r in rows if r.selected)


@pytest.mark.parametrize("name", list(MODELS))
def test_default_value_equals_float64_reference(name):
  model = _model(name)
  floating = _floating(model.params)
  reference = helpers.ref_l2([(floating[p], 1.0) for p in model.selected], LAM, M)
  got = jaxl2.l2_penalty(model.params, LAM, M)
  # float32 sums of up to 11M squares (Haiku ResNet18): 1e-5 relative.
  np.testing.assert_allclose(float(got), reference, rtol=1e-5)
  np.testing.assert_allclose(jaxl2.describe(model.params, lam=LAM, m=M).penalty, reference, 1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_autodiff_gradient_is_lam_over_m_w_on_selected_and_zero_elsewhere(name):
  model = _model(name)
  floating = _floating(model.params)
  grads = _autodiff(model.params, lambda p: jaxl2.l2_penalty(p, LAM, M))
  assert set(model.selected) <= set(grads)
  for path, g in grads.items():
    if path in model.selected:
      expected = LAM / M * helpers.as_f64(floating[path])
      np.testing.assert_allclose(helpers.as_f64(g), expected, rtol=1e-6, atol=1e-12)
    else:
      np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=path)


@pytest.mark.parametrize("name", list(MODELS))
def test_analytic_gradient_matches_at_every_leaf(name):
  model = _model(name)
  floating = _floating(model.params)
  analytic = dict(real_models.leaves_with_paths(jaxl2.l2_penalty_grad(model.params, LAM, M)))
  for path, w in floating.items():
    expected = LAM / M * helpers.as_f64(w) if path in model.selected else 0.0
    np.testing.assert_allclose(helpers.as_f64(analytic[path]), expected, rtol=1e-6, atol=1e-12)


def test_scan_over_layers_changes_nothing():
  scanned = real_models.linen_vit(scan=True).params
  looped = real_models.vit_scan_to_loop(scanned)
  # The same weights, stacked or not: the same penalty (float32 summation order differs).
  np.testing.assert_allclose(
    float(jaxl2.l2_penalty(scanned, LAM, M)), float(jaxl2.l2_penalty(looped, LAM, M)), rtol=1e-6
  )
  # Shape alone cannot tell: `by_ndim` penalizes the stacked biases and norm scales.
  assert float(jaxl2.l2_penalty(scanned, LAM, M, mask=jaxl2.by_ndim(2))) > 1.1 * float(
    jaxl2.l2_penalty(looped, LAM, M, mask=jaxl2.by_ndim(2))
  )


@pytest.mark.parametrize(
  ("name", "path", "why"),
  [
    ("linen_vit[scan=True]", "Transformer/encoderblock/LayerNorm_0/scale", "norm scale"),
    ("linen_vit[scan=True]", "Transformer/encoderblock/MlpBlock_0/Dense_0/bias", "bias"),
    ("linen_vit[scan=True]", "Transformer/encoderblock/MultiHeadDotProductAttention_0/query/bias",
     "bias"),
    ("linen_vit[scan=True]", "cls", "class token"),
    ("linen_vit[scan=True]", "pos_embedding", "positional embedding"),
    ("linen_vit[scan=True]", "embedding/kernel", "kernel"),
    ("linen_resnet", "batch_stats/bn_init/mean", "running statistic"),
    ("linen_lm1b", "decoder/Embed_0/embedding", "token embedding"),
    ("haiku_resnet", "res_net18/~/initial_batchnorm/scale", "norm scale"),
    ("haiku_resnet", "res_net18/~/initial_batchnorm/~/mean_ema/average", "running statistic"),
    ("haiku_resnet", "res_net18/~/logits/b", "bias"),
    ("nnx_stacked_tied", "layers/bn/scale", "norm scale"),
    ("nnx_stacked_tied", "layers/bn/mean", "not an nnx.Param (BatchStat)"),
    ("equinox_stateful", "norm/axis_name", "not an array (Equinox field)"),
    ("gpt2_state_dict", "wpe.weight", "positional embedding"),
    ("gpt2_state_dict", "h.0.ln_1.weight", "norm scale"),
    ("gpt2_state_dict", "wte.weight", "token embedding"),
    ("torch_bert_state_dict", "embeddings.LayerNorm.bias", "norm offset"),
    ("course_notation", "b1", "bias"),
    ("keras_names[keras2=True]", "batch_normalization/moving_mean:0", "running statistic"),
  ],
)  # fmt: skip
def test_describe_says_which_rule_decided(name, path, why):
  rows = {r.path: r for r in jaxl2.describe(_model(name).params).rows}
  assert rows[path].why == why


def test_tied_nnx_weight_listed_once_with_its_other_path():
  rows = jaxl2.describe(_model("nnx_stacked_tied").params).rows
  paths = [r.path for r in rows]
  assert "decoder/kernel" in paths and "encoder/kernel" not in paths
  tied = next(r for r in rows if r.path == "decoder/kernel")
  assert tied.aliases == ("encoder/kernel",) and tied.selected


@pytest.mark.parametrize(
  ("mask", "added", "removed"),
  [
    (
      jaxl2.by_role(positional=True),
      {"cls", "pos_embedding", "decoder/posembed_output/pos_embedding"},
      set(),
    ),
    (jaxl2.by_role(embeddings=False), set(), {"decoder/Embed_0/embedding"}),
  ],
)
def test_by_role_options(mask, added, removed):
  for name in ("linen_vit", "linen_lm1b"):
    model = _model(name)
    rows = jaxl2.describe(model.params, mask=mask).rows
    selected = {r.path for r in rows if r.selected}
    paths = {r.path for r in rows}
    assert selected == (set(model.selected) | (added & paths)) - removed


def test_equinox_model_in_filter_value_and_grad_needs_no_filtering():
  model = _model("equinox_cnn").params
  images = jnp.ones((2, 1, 8, 8))

  lam, m = 50.0, 1.0  # a penalty gradient much larger than the data's: no cancellation below

  def loss(model, x):
    return jnp.mean(jax.vmap(model)(x) ** 2) + jaxl2.l2_penalty(model, lam, m)

  _, grads = eqx.filter_value_and_grad(loss)(model, images)
  _, data_grads = eqx.filter_value_and_grad(lambda mdl, x: jnp.mean(jax.vmap(mdl)(x) ** 2))(
    model, images
  )
  conv = model.layers[0]
  np.testing.assert_allclose(
    helpers.as_f64(grads.layers[0].weight) - helpers.as_f64(data_grads.layers[0].weight),
    lam / m * helpers.as_f64(conv.weight),
    rtol=1e-5,
  )
  np.testing.assert_allclose(grads.layers[0].bias, data_grads.layers[0].bias, rtol=1e-6)


def test_plain_containers_still_reject_non_array_leaves_with_the_path():
  def activation(x):
    return x

  with pytest.raises(TypeError, match=r"leaf at 'layers/1' is a function"):
    jaxl2.l2_penalty({"layers": [jnp.ones((2, 2)), activation]}, LAM, M)
  with pytest.raises(TypeError, match=r"leaf at 'name' is a str"):
    jaxl2.l2_penalty({"w": jnp.ones((2, 2)), "name": "dense"}, LAM, M)


def test_add_l2_grad_in_the_equinox_optax_loop_equals_the_penalty():
  import optax

  model = _model("equinox_mlp").params
  x, y = jnp.ones((5, 4)), jnp.zeros((5, 3))

  def data_loss(mdl):
    return jnp.mean((jax.vmap(mdl)(x) - y) ** 2)

  def step(tx, loss):
    params = eqx.filter(model, eqx.is_array)  # Equinox's own pattern for optax
    grads = eqx.filter_grad(loss)(model)
    updates, _ = tx.update(grads, tx.init(params), params)
    return eqx.apply_updates(model, updates)

  coupled = step(optax.chain(jaxl2.add_l2_grad(LAM, 10.0), optax.sgd(0.1)), data_loss)
  penalized = step(optax.sgd(0.1), lambda mdl: data_loss(mdl) + jaxl2.l2_penalty(mdl, LAM, 10.0))
  for a, b in zip(
    jax.tree_util.tree_leaves(eqx.filter(coupled, eqx.is_array)),
    jax.tree_util.tree_leaves(eqx.filter(penalized, eqx.is_array)),
    strict=True,
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
