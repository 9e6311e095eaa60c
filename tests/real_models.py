"""Test models with the structure and parameter names of real public model code.

Each builder returns a `RealModel`: the pytree a user hands to `jaxl2.l2_penalty` and the exact
leaf paths (in `jax.tree_util` flatten order) that the by-role default mask must select. The
models were written for this file after reading the public code below; nothing was copied, and
widths and depths are tiny (except Haiku's own ResNet18, which has no width option: 11.2M params).

- linen ResNet: google/flax `examples/imagenet/models.py` (`conv_init`, `bn_init`,
  `ResNetBlock`/`BottleneckResNetBlock` with `conv_proj`/`norm_proj`, a `Dense` head).
- linen ViT: google-research/big_vision `big_vision/models/vit.py` (`embedding`, `cls`,
  `pos_embedding`, `Transformer/encoderblock_{i}` or one `nn.scan`-ned `encoderblock`).
- linen LM: google/flax `examples/lm1b/models.py` and `train.py` (`decoder/Embed_0`,
  `posembed_output`, `encoderdecoderblock_{i}`, bias-free `SelfAttention_0`, `logitdense`;
  initializers wrapped by `nn.with_logical_partitioning`, boxes that `train.py` keeps).
- NNX: google/flax `examples/nnx_toy_examples/06_scan_over_layers.py` and the NNX 0.10->0.11
  migration guide (`nnx.split_rngs` + `nnx.vmap` to stack layers, `nnx.scan` to apply them).
- Haiku: `hk.nets.ResNet18` itself (google-deepmind/dm-haiku `haiku/_src/nets/resnet.py`).
- Equinox: patrick-kidger/equinox `examples/mnist.ipynb` (CNN), `eqx.nn.MLP`, `stateful.ipynb`.
- Hand-written: Andrew Ng's course notation; HF transformers BERT and GPT-2 state-dict keys;
  Keras 3 weight paths and Keras 2 `:0` weight names.

Real initializers are kept, so some selected weights start at zero (ViT `head/kernel`, Haiku
`logits/w`). The first build in a process pays XLA's per-op compile cost (seconds on a 2-core
CPU); later builds take milliseconds.
"""

import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class RealModel(NamedTuple):
  name: str
  params: Any
  selected: tuple[str, ...]
  family: str  # "flax-linen" | "flax-nnx" | "haiku" | "equinox" | "hand-written"


def _key_name(key: Any) -> str:
  for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def paths(params: Any) -> list[str]:
  """`/`-joined key paths of the leaves; a trailing `.value` (NNX Variable, linen box) dropped."""
  out = []
  for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    last = key_path[-1] if key_path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
      key_path = key_path[:-1]
    out.append("/".join(_key_name(k) for k in key_path))
  return out


def leaves_with_paths(params: Any) -> list[tuple[str, Any]]:
  return list(zip(paths(params), jax.tree_util.tree_leaves(params), strict=True))


# --- flax linen: ImageNet ResNet --------------------------------------------------------------


class ResNetBlock(nn.Module):
  filters: int
  strides: tuple[int, int] = (1, 1)
  kernels: ClassVar[tuple[int, ...]] = (3, 3)  # conv sizes; the last one is `expansion` wider
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y, last = x, len(self.kernels) - 1
    for i, k in enumerate(self.kernels):
      strides = self.strides if i == self.kernels.index(3) else (1, 1)
      y = conv(self.filters * (self.expansion if i == last else 1), (k, k), strides)(y)
      y = y if i == last else nn.relu(norm()(y))
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = norm(name="norm_proj")(conv(y.shape[-1], (1, 1), self.strides, name="conv_proj")(x))
    return nn.relu(x + y)


class BottleneckResNetBlock(ResNetBlock):
  kernels: ClassVar[tuple[int, ...]] = (1, 3, 1)
  expansion: ClassVar[int] = 4


class LinenResNet(nn.Module):
  stage_sizes: tuple[int, ...] = (1, 1)
  block_cls: type[ResNetBlock] = ResNetBlock
  num_classes: int = 3
  num_filters: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.Conv(self.num_filters, (3, 3), (2, 2), use_bias=False, name="conv_init")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def linen_resnet(bottleneck: bool = False) -> RealModel:
  """The FULL variables `{"batch_stats": ..., "params": ...}`; 2 stages of 1 block."""
  block = BottleneckResNetBlock if bottleneck else ResNetBlock
  variables = LinenResNet(block_cls=block).init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))
  n_conv, projected = (3, (0, 1)) if bottleneck else (2, (1,))
  selected = []
  for b in range(2):
    selected += [f"params/{block.__name__}_{b}/Conv_{i}/kernel" for i in range(n_conv)]
    selected += [f"params/{block.__name__}_{b}/conv_proj/kernel"] * (b in projected)
  # dict keys flatten sorted: "BottleneckResNetBlock_*" < "Dense_0" < "ResNetBlock_*" < "conv_init"
  selected.insert(len(selected) if bottleneck else 0, "params/Dense_0/kernel")
  selected.append("params/conv_init/kernel")
  name = "linen_resnet_bottleneck" if bottleneck else "linen_resnet"
  return RealModel(name, variables, tuple(selected), "flax-linen")


# --- flax linen: big_vision ViT ---------------------------------------------------------------


class VitMlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform())
    y = nn.gelu(dense(self.mlp_dim)(x))  # Dense_0 (built first), then Dense_1
    return dense(x.shape[-1])(y)


class VitEncoderBlock(nn.Module):
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, None]:
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    attn = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, deterministic=deterministic)
    x = x + attn(y, y)
    mlp = VitMlpBlock(self.mlp_dim, name="MlpBlock_0")
    return x + mlp(nn.LayerNorm(name="LayerNorm_1")(x)), None


class VitEncoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kw = {"mlp_dim": self.mlp_dim, "num_heads": self.num_heads}
    if self.scan:
      stack = nn.scan(
        VitEncoderBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=self.depth,
      )
      x, _ = stack(name="encoderblock", **kw)(x, deterministic)
    else:
      for i in range(self.depth):
        x, _ = VitEncoderBlock(name=f"encoderblock_{i}", **kw)(x, deterministic)
    return nn.LayerNorm(name="encoder_norm")(x)


class LinenViT(nn.Module):
  num_classes: int = 3
  patch: int = 4
  width: int = 8
  scan: bool = False

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
    p = (self.patch, self.patch)
    x = nn.Conv(self.width, p, strides=p, padding="VALID", name="embedding")(image)
    n, h, w, c = x.shape
    posemb_init = nn.initializers.normal(stddev=c**-0.5)
    x = x.reshape(n, h * w, c) + self.param("pos_embedding", posemb_init, (1, h * w, c))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = VitEncoder(2, 2 * c, 2, self.scan, name="Transformer")(x, deterministic=not train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x[:, 0])


VIT_IMAGE = (1, 8, 8, 3)


def vit_scan_to_loop(params: dict[str, Any]) -> dict[str, Any]:
  """Unstacks `Transformer/encoderblock` (leading layer axis) into `encoderblock_{i}`."""
  transformer = dict(params["Transformer"])
  stacked = transformer.pop("encoderblock")
  for i in range(jax.tree_util.tree_leaves(stacked)[0].shape[0]):
    transformer[f"encoderblock_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  return {**params, "Transformer": transformer}


def linen_vit(scan: bool = False) -> RealModel:
  """ViT `params`, 2 layers; both variants hold the SAME weights (loop = unstacked scan)."""
  params = LinenViT(scan=True).init(jax.random.key(1), jnp.ones(VIT_IMAGE))["params"]
  params = params if scan else vit_scan_to_loop(params)
  selected = []
  for block in ["encoderblock"] if scan else ["encoderblock_0", "encoderblock_1"]:
    selected += [f"Transformer/{block}/MlpBlock_0/Dense_{i}/kernel" for i in range(2)]
    attn = f"Transformer/{block}/MultiHeadDotProductAttention_0"
    selected += [f"{attn}/{proj}/kernel" for proj in ("key", "out", "query", "value")]
  selected += ["embedding/kernel", "head/kernel"]
  return RealModel("linen_vit_scan" if scan else "linen_vit", params, tuple(selected), "flax-linen")


# --- flax linen: lm1b decoder-only Transformer ------------------------------------------------


def _logical(init: Callable[..., Any], *names: str) -> Callable[..., Any]:
  return nn.with_logical_partitioning(init, names)


_XAVIER, _TINY = nn.initializers.xavier_uniform(), nn.initializers.normal(stddev=1e-6)
_LN = {"scale_init": _logical(nn.initializers.ones, "embed")}
_LN["bias_init"] = _logical(nn.initializers.zeros, "embed")


class Lm1bMlpBlock(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k_in, k_out = _logical(_XAVIER, "embed", "mlp"), _logical(_XAVIER, "mlp", "embed")
    y = nn.Dense(2 * x.shape[-1], kernel_init=k_in, bias_init=_logical(_TINY, "mlp"))(x)
    return nn.Dense(x.shape[-1], kernel_init=k_out, bias_init=_logical(_TINY, "embed"))(nn.relu(y))


class Lm1bBlock(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    kernel_init = _logical(_XAVIER, "embed", "kv")
    attn = nn.SelfAttention(
      num_heads=2, kernel_init=kernel_init, use_bias=False, deterministic=True
    )
    x = x + attn(nn.LayerNorm(**_LN)(x), mask)  # use_bias=False as in lm1b: no attention biases
    return x + Lm1bMlpBlock(name="MlpBlock_0")(nn.LayerNorm(**_LN)(x))


class Lm1bPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # learned (a posemb_init), not sinusoidal
    pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1, LM1B_LEN, x.shape[-1]))
    return x + pe[:, : x.shape[1]]


class Lm1bDecoder(nn.Module):
  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    emb_init = _logical(nn.initializers.normal(stddev=1.0), "vocab", "embed")
    y = nn.Embed(LM1B_VOCAB, 8, embedding_init=emb_init, name="Embed_0")(tokens)
    y = Lm1bPositionEmbs(name="posembed_output")(y)
    for i in range(2):
      y = Lm1bBlock(name=f"encoderdecoderblock_{i}")(y, nn.make_causal_mask(tokens))
    y = nn.LayerNorm(name="encoderdecoder_norm", **_LN)(y)
    k, b = _logical(_XAVIER, "embed", "vocab"), _logical(_TINY, "vocab")
    return nn.Dense(LM1B_VOCAB, kernel_init=k, bias_init=b, name="logitdense")(y)


class LinenLm1b(nn.Module):  # lm1b's TransformerLM: everything lives under "decoder"
  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    return Lm1bDecoder(name="decoder")(tokens)


LM1B_VOCAB, LM1B_LEN = 11, 6


def linen_lm1b(boxed: bool = False) -> RealModel:
  """lm1b `params`, 2 layers; `boxed=True` keeps the `nn.LogicallyPartitioned` boxes of `init`
  (every leaf but `pos_embedding`), whose key paths end in `.value`."""
  variables = LinenLm1b().init(jax.random.key(2), jnp.ones((1, LM1B_LEN), jnp.int32))
  params = variables["params"] if boxed else nn.unbox(variables["params"])
  selected = ["decoder/Embed_0/embedding"]
  for i in range(2):
    block = f"decoder/encoderdecoderblock_{i}"
    selected += [f"{block}/MlpBlock_0/Dense_{j}/kernel" for j in range(2)]
    selected += [f"{block}/SelfAttention_0/{p}/kernel" for p in ("key", "out", "query", "value")]
  selected.append("decoder/logitdense/kernel")
  name = "linen_lm1b_boxed" if boxed else "linen_lm1b"
  return RealModel(name, params, tuple(selected), "flax-linen")


# --- flax nnx: vmap-stacked layers, tied weights ----------------------------------------------


class NnxBlock(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs) -> None:
    self.linear = nnx.Linear(dim, dim, rngs=rngs)
    self.bn = nnx.BatchNorm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.dropout(self.bn(self.linear(x))))


class NnxTiedStack(nnx.Module):
  def __init__(self, vocab: int = 11, dim: int = 8, n_layers: int = 3, *, rngs: nnx.Rngs) -> None:
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.encoder = nnx.Linear(dim, dim, rngs=rngs)
    self.bn = nnx.BatchNorm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_layers(rngs: nnx.Rngs) -> NnxBlock:
      return NnxBlock(dim, rngs=rngs)

    self.layers = create_layers(rngs)  # every leaf (RNG keys too) gets a leading (n_layers,)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.decoder = nnx.Linear(dim, dim, rngs=rngs)
    self.decoder.kernel = self.encoder.kernel  # tied: ONE Param reachable from two attributes

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.dropout(nnx.relu(self.bn(self.encoder(self.embed(tokens)))))

    @nnx.scan
    def apply_layers(x: jax.Array, layer: NnxBlock) -> tuple[jax.Array, None]:
      return layer(x), None

    x, _ = apply_layers(x, self.layers)
    return self.embed.attend(self.decoder(self.norm(x)))


def nnx_stacked_tied() -> RealModel:
  """The NNX module itself. Attributes flatten in name order, so the tied kernel is met first as
  `decoder/kernel` and again as `encoder/kernel` (`nnx.state` also keeps only the first)."""
  model = NnxTiedStack(rngs=nnx.Rngs(3))
  selected = ("decoder/kernel", "embed/embedding", "layers/linear/kernel")
  return RealModel("nnx_stacked_tied", model, selected, "flax-nnx")


# --- haiku: hk.nets.ResNet18 -----------------------------------------------------------------


def _haiku_resnet_forward(images: jax.Array, is_training: bool) -> jax.Array:
  return hk.nets.ResNet18(num_classes=10)(images, is_training)


HAIKU_RESNET = hk.transform_with_state(_haiku_resnet_forward)
HAIKU_IMAGES = (1, 32, 32, 3)


@functools.cache
def _haiku_resnet_init() -> tuple[hk.Params, hk.State]:  # arrays are immutable: safe to share
  init = jax.jit(HAIKU_RESNET.init, static_argnums=2)
  return init(jax.random.key(4), jnp.ones(HAIKU_IMAGES), True)


def _haiku_resnet(name: str, with_state: bool) -> RealModel:
  params, state = _haiku_resnet_init()
  tree = {k: dict(v) for k, v in {**params, **(state if with_state else {})}.items()}
  selected = []
  for g in range(4):
    for b in range(2):
      block = f"res_net18/~/block_group_{g}/~/block_{b}/~/"
      selected += [f"{block}conv_0/w", f"{block}conv_1/w"]
      selected += [f"{block}shortcut_conv/w"] * (g > 0 and b == 0)  # projection in groups 1-3
  selected += ["res_net18/~/initial_conv/w", "res_net18/~/logits/w"]
  return RealModel(name, tree, tuple(selected), "haiku")


def haiku_resnet() -> RealModel:
  """`{**params, **state}` of the full-width ResNet18: BatchNorm `mean_ema`/`var_ema` (`average`,
  `hidden`, an int32 `counter`) sort between the params (`.../batchnorm_0/~/mean_ema` right after
  `.../batchnorm_0`); BatchNorm `scale`/`offset` are (1, 1, 1, C)."""
  return _haiku_resnet("haiku_resnet", with_state=True)


def haiku_resnet_params() -> RealModel:
  return _haiku_resnet("haiku_resnet_params", with_state=False)


# --- equinox ---------------------------------------------------------------------------------


class EqxCNN(eqx.Module):
  layers: list

  def __init__(self, key: jax.Array) -> None:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    self.layers = [
      eqx.nn.Conv2d(1, 2, kernel_size=3, key=k1),  # (1, 8, 8) -> (2, 6, 6); bias (2, 1, 1)
      eqx.nn.MaxPool2d(kernel_size=2),  # two leaves: init=-inf (a Python float), lax.max
      jax.nn.relu,
      jnp.ravel,
      eqx.nn.Linear(50, 16, key=k2),
      jax.nn.sigmoid,
      eqx.nn.Linear(16, 8, key=k3),
      jax.nn.relu,
      eqx.nn.Linear(8, 4, key=k4),
      jax.nn.log_softmax,
    ]

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


def equinox_cnn() -> RealModel:
  selected = tuple(f"layers/{i}/weight" for i in (0, 4, 6, 8))
  return RealModel("equinox_cnn", EqxCNN(jax.random.key(5)), selected, "equinox")


def equinox_mlp() -> RealModel:
  mlp = eqx.nn.MLP(in_size=4, out_size=3, width_size=8, depth=2, key=jax.random.key(6))
  selected = tuple(f"layers/{i}/weight" for i in range(3))
  return RealModel("equinox_mlp", mlp, selected, "equinox")


class EqxStateful(eqx.Module):
  # equinox 0.13.8: `eqx.nn.BatchNorm` flattens to `weight`, `bias`, `axis_name` (a str) and
  # `inference` (a bool). Its `StateIndex` fields flatten to NO leaves; the running statistics
  # and counter live only in the separate `eqx.nn.State`.
  embedding: eqx.nn.Embedding
  linear: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  layer_norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear

  def __init__(self, key: jax.Array) -> None:
    k1, k2, k3 = jax.random.split(key, 3)
    self.embedding = eqx.nn.Embedding(11, 8, key=k1)
    self.linear = eqx.nn.Linear(8, 8, key=k2)
    self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch")
    self.layer_norm = eqx.nn.LayerNorm(8)
    self.head = eqx.nn.Linear(8, 3, key=k3)

  def __call__(self, tokens: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
    x = self.linear(jax.vmap(self.embedding)(tokens).mean(axis=0))
    x, state = self.norm(x, state)
    return self.head(self.layer_norm(x)), state


def equinox_stateful() -> RealModel:
  """The model from `eqx.nn.make_with_state` (its `State` is not part of `params`)."""
  model, _ = eqx.nn.make_with_state(EqxStateful)(jax.random.key(7))
  selected = ("embedding/weight", "linear/weight", "head/weight")
  return RealModel("equinox_stateful", model, selected, "equinox")


def equinox_ensemble() -> RealModel:
  """Three MLPs stacked by `eqx.filter_vmap`: weights (3, out, in), biases (3, out)."""
  make = eqx.filter_vmap(lambda k: eqx.nn.MLP(2, 2, width_size=4, depth=1, key=k))
  ensemble = make(jax.random.split(jax.random.key(8), 3))
  return RealModel("equinox_ensemble", ensemble, ("layers/0/weight", "layers/1/weight"), "equinox")


# --- hand-written notations (NumPy float32) ---------------------------------------------------


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
  return rng.standard_normal(shape).astype(np.float32)


def course_notation() -> RealModel:
  """`W1` (n_h, n_x), `b1` (n_h, 1) column biases, `W2` (n_y, n_h), `b2` (n_y, 1)."""
  rng = np.random.default_rng(9)
  shapes = {"W1": (5, 4), "b1": (5, 1), "W2": (1, 5), "b2": (1, 1)}
  params = {k: _rand(rng, *s) for k, s in shapes.items()}
  return RealModel("course_notation", params, ("W1", "W2"), "hand-written")


def _affine(rng: np.random.Generator, prefix: str, *w_shape: int) -> dict[str, np.ndarray]:
  """PyTorch `{prefix}.weight` and `{prefix}.bias` (bias length: the first weight dimension)."""
  return {f"{prefix}.weight": _rand(rng, *w_shape), f"{prefix}.bias": _rand(rng, w_shape[0])}


def torch_bert_state_dict() -> RealModel:
  """HF `BertModel.state_dict()` keys, 2 layers; Linear weights are (out, in). The int64
  `embeddings.position_ids` buffer is in checkpoints saved by older transformers versions."""
  rng, h, ff = np.random.default_rng(10), 8, 16
  tables = {"word": 11, "position": 6, "token_type": 2}
  sd = {f"embeddings.{t}_embeddings.weight": _rand(rng, n, h) for t, n in tables.items()}
  sd["embeddings.position_ids"] = np.arange(6, dtype=np.int64)[None]
  sd |= _affine(rng, "embeddings.LayerNorm", h)
  linears = {f"attention.self.{p}": (h, h) for p in ("query", "key", "value")}
  linears |= {
    "attention.output.dense": (h, h),
    "intermediate.dense": (ff, h),
    "output.dense": (h, ff),
  }
  for i in range(2):
    for name, shape in linears.items():
      sd |= _affine(rng, f"encoder.layer.{i}.{name}", *shape)
    sd |= _affine(rng, f"encoder.layer.{i}.attention.output.LayerNorm", h)
    sd |= _affine(rng, f"encoder.layer.{i}.output.LayerNorm", h)
  sd |= _affine(rng, "pooler.dense", h, h)
  selected = ["embeddings.token_type_embeddings.weight", "embeddings.word_embeddings.weight"]
  selected += [f"encoder.layer.{i}.{n}.weight" for i in range(2) for n in sorted(linears)]
  return RealModel("torch_bert_state_dict", sd, (*selected, "pooler.dense.weight"), "hand-written")


def gpt2_state_dict() -> RealModel:
  """HF `GPT2Model.state_dict()` keys, 2 layers; `Conv1D` weights are (in, out). `h.{i}.attn.bias`
  (the (1, 1, n_ctx, n_ctx) causal-mask buffer, float32 in the original hub checkpoints, bool in
  later transformers) and `h.{i}.attn.masked_bias` (a scalar) are not weights."""
  rng, d, ctx = np.random.default_rng(11), 8, 6
  sd = {"wte.weight": _rand(rng, 11, d), "wpe.weight": _rand(rng, ctx, d)}
  convs = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d)}
  convs["mlp.c_proj"] = (4 * d, d)
  for i in range(2):
    sd |= _affine(rng, f"h.{i}.ln_1", d) | _affine(rng, f"h.{i}.ln_2", d)
    for name, (n_in, n_out) in convs.items():
      sd |= {
        f"h.{i}.{name}.weight": _rand(rng, n_in, n_out),
        f"h.{i}.{name}.bias": _rand(rng, n_out),
      }
    sd[f"h.{i}.attn.bias"] = np.tril(np.ones((ctx, ctx), np.float32))[None, None]
    sd[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  sd |= _affine(rng, "ln_f", d)
  selected = [f"h.{i}.{n}.weight" for i in range(2) for n in sorted(convs)]
  return RealModel("gpt2_state_dict", sd, (*selected, "wte.weight"), "hand-written")


def keras_names(keras2: bool = False) -> RealModel:
  """Keras 3 weight paths (`dense/kernel`), or Keras 2 weight names (`dense/kernel:0`)."""
  rng, sfx = np.random.default_rng(12), ":0" if keras2 else ""

  def weights(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {name + sfx: _rand(rng, *shape) for name, shape in shapes.items()}

  heads = {p: weights(kernel=(8, 2, 4), bias=(2, 4)) for p in ("query", "key", "value")}
  tree = {
    "conv2d": weights(kernel=(3, 3, 1, 2), bias=(2,)),
    "batch_normalization": weights(gamma=(2,), beta=(2,), moving_mean=(2,), moving_variance=(2,)),
    "embedding": weights(embeddings=(11, 8)),
    "multi_head_attention": {**heads, "attention_output": weights(kernel=(2, 4, 8), bias=(8,))},
    "layer_normalization": weights(gamma=(8,), beta=(8,)),
    "dense": weights(kernel=(8, 16), bias=(16,)),
    "dense_1": weights(kernel=(16, 3), bias=(3,)),
  }
  mha = [f"multi_head_attention/{p}/kernel" for p in ("attention_output", "key", "query", "value")]
  selected = ["conv2d/kernel", "dense/kernel", "dense_1/kernel", "embedding/embeddings", *mha]
  name = "keras2_names" if keras2 else "keras_names"
  return RealModel(name, tree, tuple(s + sfx for s in selected), "hand-written")


ALL_MODELS: tuple[Callable[[], RealModel], ...] = (
  linen_resnet,
  functools.partial(linen_resnet, bottleneck=True),
  linen_vit,
  functools.partial(linen_vit, scan=True),
  linen_lm1b,
  functools.partial(linen_lm1b, boxed=True),
  nnx_stacked_tied,
  haiku_resnet,
  haiku_resnet_params,
  equinox_cnn,
  equinox_mlp,
  equinox_stateful,
  equinox_ensemble,
  course_notation,
  torch_bert_state_dict,
  gpt2_state_dict,
  keras_names,
  functools.partial(keras_names, keras2=True),
)


def builder_id(builder: Callable[[], RealModel]) -> str:
  """A pytest id for an `ALL_MODELS` entry, e.g. `linen_vit[scan=True]`."""
  if isinstance(builder, functools.partial):
    kw = ",".join(f"{k}={v}" for k, v in builder.keywords.items())
    return f"{builder.func.__name__}[{kw}]"
  return builder.__name__
