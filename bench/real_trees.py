"""Parameter trees with the leaf names and shapes of public models, at full size.

Written for the bench after reading the public model code and configs named
below; nothing was copied. Each builder returns ``{path: shape}`` with the
paths a Flax ``params`` dict flattens to, so `jaxl2`'s default mask (`jaxl2.by_role`)
picks leaves by the same names and modules it would see in the real model
(`nest` turns the paths into the nested dicts Flax returns).

* ViT-B/16: google-research/big_vision ``big_vision/models/vit.py`` (patch
  ``embedding`` conv, ``cls``, ``pos_embedding`` of 14 x 14 patches,
  ``Transformer/encoderblock_{i}`` with ``MultiHeadDotProductAttention_0``
  (``DenseGeneral`` kernels of (768, 12, 64)) and ``MlpBlock_0``, ``encoder_norm``,
  ``head``); width 768, depth 12, MLP 3072, 12 heads.
* ResNet-152: google/flax ``examples/imagenet/models.py`` (``conv_init``,
  ``bn_init``, ``BottleneckResNetBlock_{k}`` with ``Conv_0..2``, ``BatchNorm_0..2``,
  ``conv_proj``/``norm_proj``, bias-free convs, a ``Dense_0`` head); stages
  (3, 8, 36, 3).
* BERT-base: the Hugging Face ``bert-base-uncased`` config (vocab 30,522, 12
  layers, hidden 768, intermediate 3,072, 512 positions, 2 token types) and the
  parameter names of its Flax port (``embeddings/word_embeddings/embedding``,
  ``encoder/layer/{i}/attention/self/query``, ``pooler/dense``).
* GPT-2 small: the Hugging Face ``gpt2`` config (vocab 50,257, 1,024
  positions, 12 layers, width 768) and its Flax port's names (``wte``, ``wpe``,
  ``h/{i}/attn/c_attn`` with (out, in) ``Conv1D`` kernels, ``mlp/c_fc``, ``ln_f``).
* Gemma-2B, layers stacked as ``nn.scan`` stacks them: google-deepmind/gemma's
  Flax modules and the 2B config (width 2,048, 8 query heads and 1 key/value
  head of 256, GeGLU hidden 16,384, 18 layers, vocab 256,128):
  ``embedder/input_embedding``, ``layers/attn/{q,kv,attn_vec}_einsum/w``,
  ``layers/mlp/gating_einsum`` and ``linear``, RMSNorm ``scale``s, each layer
  leaf with a leading axis of ``layers``.
"""

from __future__ import annotations

from typing import Any

Shapes = dict[str, tuple[int, ...]]


def vit_b16_shapes(
  *, width: int = 768, depth: int = 12, mlp: int = 3072, heads: int = 12, classes: int = 1000
) -> Shapes:
  """big_vision ViT-B/16 at 224 x 224: 86M params, 200 leaves, 74 kernels (by default)."""
  shapes: Shapes = {
    "embedding/kernel": (16, 16, 3, width),
    "embedding/bias": (width,),
    "cls": (1, 1, width),
    "pos_embedding": (1, 14 * 14, width),
  }
  for i in range(depth):
    block = f"Transformer/encoderblock_{i}"
    for norm in ("LayerNorm_0", "LayerNorm_1"):
      shapes[f"{block}/{norm}/scale"] = (width,)
      shapes[f"{block}/{norm}/bias"] = (width,)
    attention = f"{block}/MultiHeadDotProductAttention_0"
    for proj in ("query", "key", "value"):
      shapes[f"{attention}/{proj}/kernel"] = (width, heads, width // heads)
      shapes[f"{attention}/{proj}/bias"] = (heads, width // heads)
    shapes[f"{attention}/out/kernel"] = (heads, width // heads, width)
    shapes[f"{attention}/out/bias"] = (width,)
    for j, (a, b) in enumerate(((width, mlp), (mlp, width))):
      shapes[f"{block}/MlpBlock_0/Dense_{j}/kernel"] = (a, b)
      shapes[f"{block}/MlpBlock_0/Dense_{j}/bias"] = (b,)
  shapes["Transformer/encoder_norm/scale"] = (width,)
  shapes["Transformer/encoder_norm/bias"] = (width,)
  shapes["head/kernel"] = (width, classes)
  shapes["head/bias"] = (classes,)
  return shapes


def resnet152_shapes(
  *, stages: tuple[int, ...] = (3, 8, 36, 3), width: int = 64, classes: int = 1000
) -> Shapes:
  """flax examples' ResNet-152: 60M params, 467 leaves, 156 kernels (by default; no batch_stats)."""
  shapes: Shapes = {}

  def conv_bn(conv: str, norm: str, k: int, cin: int, cout: int) -> None:
    shapes[f"{conv}/kernel"] = (k, k, cin, cout)
    shapes[f"{norm}/scale"] = (cout,)
    shapes[f"{norm}/bias"] = (cout,)

  conv_bn("conv_init", "bn_init", 7, 3, width)
  cin, block = width, 0
  for stage, blocks in enumerate(stages):
    filters = width * 2**stage
    for _ in range(blocks):
      name = f"BottleneckResNetBlock_{block}"
      conv_bn(f"{name}/Conv_0", f"{name}/BatchNorm_0", 1, cin, filters)
      conv_bn(f"{name}/Conv_1", f"{name}/BatchNorm_1", 3, filters, filters)
      conv_bn(f"{name}/Conv_2", f"{name}/BatchNorm_2", 1, filters, 4 * filters)
      if cin != 4 * filters:  # the residual changes shape: a projection
        conv_bn(f"{name}/conv_proj", f"{name}/norm_proj", 1, cin, 4 * filters)
      cin, block = 4 * filters, block + 1
  shapes["Dense_0/kernel"] = (cin, classes)
  shapes["Dense_0/bias"] = (classes,)
  return shapes


def bert_base_shapes(
  *, width: int = 768, depth: int = 12, mlp: int = 3072, vocab: int = 30522
) -> Shapes:
  """BERT-base (uncased) with its pooler: 110M params, 199 leaves, 75 selected (by default)."""
  shapes: Shapes = {
    "embeddings/word_embeddings/embedding": (vocab, width),
    "embeddings/position_embeddings/embedding": (512, width),
    "embeddings/token_type_embeddings/embedding": (2, width),
    "embeddings/LayerNorm/scale": (width,),
    "embeddings/LayerNorm/bias": (width,),
  }

  def dense(path: str, a: int, b: int) -> None:
    shapes[f"{path}/kernel"] = (a, b)
    shapes[f"{path}/bias"] = (b,)

  for i in range(depth):
    layer = f"encoder/layer/{i}"
    for proj in ("query", "key", "value"):
      dense(f"{layer}/attention/self/{proj}", width, width)
    dense(f"{layer}/attention/output/dense", width, width)
    dense(f"{layer}/intermediate/dense", width, mlp)
    dense(f"{layer}/output/dense", mlp, width)
    for norm in ("attention/output/LayerNorm", "output/LayerNorm"):
      shapes[f"{layer}/{norm}/scale"] = (width,)
      shapes[f"{layer}/{norm}/bias"] = (width,)
  dense("pooler/dense", width, width)
  return shapes


def gpt2_small_shapes(*, width: int = 768, depth: int = 12, vocab: int = 50257) -> Shapes:
  """GPT-2 small: 124M params, 148 leaves, 49 selected (by default)."""
  shapes: Shapes = {
    "transformer/wte/embedding": (vocab, width),
    "transformer/wpe/embedding": (1024, width),
  }
  for i in range(depth):
    block = f"transformer/h/{i}"
    for norm in ("ln_1", "ln_2"):
      shapes[f"{block}/{norm}/scale"] = (width,)
      shapes[f"{block}/{norm}/bias"] = (width,)
    # Conv1D kernels are stored (out, in).
    for path, out, inp in (
      ("attn/c_attn", 3 * width, width),
      ("attn/c_proj", width, width),
      ("mlp/c_fc", 4 * width, width),
      ("mlp/c_proj", width, 4 * width),
    ):
      shapes[f"{block}/{path}/kernel"] = (out, inp)
      shapes[f"{block}/{path}/bias"] = (out,)
  shapes["transformer/ln_f/scale"] = (width,)
  shapes["transformer/ln_f/bias"] = (width,)
  return shapes


def gemma_2b_shapes(
  *,
  layers: int = 18,
  vocab: int = 256_128,
  width: int = 2048,
  heads: int = 8,
  head_dim: int = 256,
  hidden: int = 16384,
) -> Shapes:
  """Gemma-2B, its layers stacked along a leading axis of ``layers``: 9 leaves, 6 selected.

  The default is the real model (2.5B params, 10 GB in float32); the suite
  takes fewer layers and a smaller vocabulary so that the tree, the flat copy
  of the limit and the gradients fit a small machine, with every per-layer
  shape as in the model.
  """
  return {
    "transformer/embedder/input_embedding": (vocab, width),
    "transformer/layers/pre_attention_norm/scale": (layers, width),
    "transformer/layers/attn/q_einsum/w": (layers, heads, width, head_dim),
    "transformer/layers/attn/kv_einsum/w": (layers, 2, 1, width, head_dim),
    "transformer/layers/attn/attn_vec_einsum/w": (layers, heads, head_dim, width),
    "transformer/layers/pre_ffw_norm/scale": (layers, width),
    "transformer/layers/mlp/gating_einsum": (layers, 2, hidden, width),
    "transformer/layers/mlp/linear": (layers, hidden, width),
    "transformer/final_norm/scale": (width,),
  }


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``: the nested dicts Flax's ``init`` returns."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, name = path.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[name] = value
  return out
