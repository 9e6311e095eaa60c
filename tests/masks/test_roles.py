"""by_role's rules one by one: a leaf's name, module and shape against the role it gets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxl2


@pytest.mark.parametrize(
  ("path", "shape", "why", "selected"),
  [
    # kernels and token embeddings, any stacking
    ("params/Dense_0/kernel", (4, 3), "kernel", True),
    ("encoderblock/MlpBlock_0/Dense_0/kernel", (6, 4, 8), "kernel", True),
    ("res_net/~/conv_0/w", (3, 3, 8, 8), "kernel", True),
    ("layers/0/weight", (8, 4), "kernel", True),
    ("W1", (5, 3), "kernel", True),
    ("decoder/Embed_0/embedding", (100, 8), "token embedding", True),
    ("embed/embeddings", (100, 8), "token embedding", True),
    ("model.embed_tokens.weight", (100, 8), "token embedding", True),
    ("transformer/wte/embedding", (100, 8), "token embedding", True),
    # biases, whatever their shape
    ("encoderblock/Dense_0/bias", (6, 8), "bias", False),
    ("MultiHeadDotProductAttention_0/query/bias", (4, 2), "bias", False),
    ("layers/0/bias", (2, 1, 1), "bias", False),
    ("b1", (5, 1), "bias", False),
    ("res_net/~/logits/b", (10,), "bias", False),
    # normalization layers, stacked or not, in every naming
    ("encoderblock/LayerNorm_0/scale", (6, 8), "norm scale", False),
    ("res_net/~/batchnorm_0/scale", (1, 1, 1, 8), "norm scale", False),
    ("res_net/~/batchnorm_0/offset", (1, 1, 1, 8), "norm offset", False),
    ("h.0.ln_1.weight", (8,), "norm scale", False),
    ("ln_f.bias", (8,), "norm offset", False),
    ("encoder.layer.0.output.LayerNorm.weight", (8,), "norm scale", False),
    ("model.layers.0.post_attention_layernorm.weight", (8,), "norm scale", False),
    ("blocks/norm1/weight", (6, 8), "norm scale", False),
    ("bn_init/scale", (8,), "norm scale", False),
    ("batch_normalization/gamma:0", (8,), "norm scale", False),
    ("layer_normalization/beta", (8,), "norm offset", False),
    ("LayerNorm_0/mu", (8,), "norm parameter", False),
    ("blocks/0/scale", (6, 8), "norm scale", False),  # scale/gamma/offset/beta: any module
    ("head/gamma", (8,), "norm scale", False),
    ("head/offset", (8,), "norm offset", False),
    ("beta", (8,), "norm offset", False),
    # state
    ("batch_stats/bn_init/mean", (8,), "running statistic", False),
    ("res_net/~/batchnorm_0/~/var_ema/average", (1, 1, 1, 8), "running statistic", False),
    ("bn1.running_var", (8,), "running statistic", False),
    ("batch_normalization/moving_mean:0", (8,), "running statistic", False),
    ("cache/decoder/cached_key", (2, 4, 8), "cache", False),
    # positions and class tokens
    ("pos_embedding", (1, 5, 8), "positional embedding", False),
    ("decoder/posembed_output/pos_embedding", (1, 16, 8), "positional embedding", False),
    ("wpe.weight", (16, 8), "positional embedding", False),
    ("embeddings.position_embeddings.weight", (16, 8), "positional embedding", False),
    ("encoder/relative_attention_bias", (32, 4), "positional embedding", False),
    ("cls", (1, 1, 8), "class token", False),
    ("cls_token", (1, 1, 8), "class token", False),
    # unknown names: shape decides
    ("probe", (1, 1, 8), "ndim >= 2 (role unknown)", True),
    ("temperature", (), "ndim < 2 (role unknown)", False),
    ("0", (3, 3), "ndim >= 2 (role unknown)", True),
  ],
)  # fmt: skip
def test_rule_table(path, shape, why, selected):
  mask = jaxl2.by_role()
  row = jaxl2.describe({path: jnp.ones(shape)}, mask=mask).rows[0]
  assert (row.why, row.selected) == (why, selected)
  assert mask(path, jnp.ones(shape)) is selected  # the same answer as a plain callable


def test_integer_leaves_are_never_selected():
  row = jaxl2.describe({"kernel": jnp.ones((2, 2), jnp.int32)}).rows[0]
  assert (row.why, row.selected) == ("not floating", False)


@pytest.mark.parametrize(
  ("kwargs", "path", "expected"),
  [
    ({"positional": True}, "pos_embedding", True),
    ({"positional": True}, "cls", True),
    ({"embeddings": False}, "Embed_0/embedding", False),
    ({"embeddings": False}, "Dense_0/kernel", True),
  ],
)
def test_options(kwargs, path, expected):
  assert jaxl2.by_role(**kwargs)(path, np.ones((3, 4), np.float32)) is expected


def test_options_must_be_bools():
  with pytest.raises(TypeError, match=r"`by_role` option `positional` must be True or False"):
    jaxl2.by_role(positional="yes")
