"""`by_role`, the default mask: which leaves are weight matrices, decided by role.

A leaf's role is read from its name (the last path key), the name of the
module that holds it (the key before), the class of that module (Equinox and
Flax NNX modules are pytrees, so `jaxl2` sees ``LayerNorm``, ``Embedding``) and
its path. Shape alone cannot tell: stacked layers (``nn.scan``, ``nnx.vmap``,
``eqx.filter_vmap``) turn every bias and norm scale into a matrix, Haiku norm
scales are (1, 1, 1, C), Equinox conv biases (C, 1, 1) and course-notation
biases (n, 1). Shape is only the fallback for names no rule knows.

The rules, first match wins (names compared in lower case, a Keras ``:0``
suffix dropped, ``/`` and ``.`` both separate keys, Haiku's ``~`` ignored):

=====================  ==================================================  ========
role                   when                                                selected
=====================  ==================================================  ========
not floating           integer, bool or key dtype                          no
running statistic      under ``batch_stats``; ``mean``, ``var``,           no
                       ``running_*``, ``moving_*``, ``num_batches_tracked``;
                       under a Haiku ``*_ema`` module; an Equinox
                       ``StateIndex``
cache                  under ``cache``; ``cached_key``, ``cached_value``    no
positional embedding   ``pos_embedding``, ``posembed_*``, ``wpe``,          ``positional``
                       ``position_embeddings``, ``embed_positions``,
                       relative position biases
class token            ``cls``, ``cls_token``, ``class_token``,             ``positional``
                       ``dist_token``, ``reg_token``, ``register_tokens``
norm scale / offset    in a module named like a norm (``LayerNorm_0``,      no
                       ``ln_1``, ``ln_f``, ``bn1``, ``norm``,
                       ``batch_normalization``...) or of a norm class;
                       anywhere: ``scale``, ``gamma``, ``offset``, ``beta``
bias                   ``bias``, ``b``, ``b1``, ``*_bias``                  no
token embedding        ``embedding``, ``embeddings``, ``wte``,              ``embeddings``
                       ``word_embeddings``, ``embed_tokens``...; a
                       ``weight`` in a module named ``*emb*``/``wte`` or
                       of class ``Embed``/``Embedding``
kernel                 ``kernel``, ``w``, ``weight``, ``weights``, ``W1``   yes if ndim ≥ 2
role unknown           anything else                                       ndim ≥ 2
=====================  ==================================================  ========
"""

from __future__ import annotations

import re

import numpy as np

from jaxl2.core._dtypes import is_inexact
from jaxl2.core._paths import Leaf

__all__ = ["Role", "role_of", "role_selected"]

_STATE_TOKENS = frozenset({"batch_stats"})
_CACHE_TOKENS = frozenset({"cache"})
_STATE_LEAVES = frozenset(
  {
    "mean",
    "var",
    "variance",
    "running_mean",
    "running_var",
    "moving_mean",
    "moving_variance",
    "num_batches_tracked",
  }
)
_CACHE_LEAVES = frozenset({"cached_key", "cached_value", "cache_index"})
_POSITIONAL = re.compile(
  r"wpe|pe|.*(pos_?emb|posemb|position_?emb|positional|rel(ative)?_?pos|relative_attention_bias"
  r"|embed_?pos|pos_?enc|position_?enc).*"
)
_CLASS_TOKENS = frozenset(
  {"cls", "cls_token", "class_token", "dist_token", "reg_token", "register_tokens"}
)
_NORM_WORDS = frozenset({"ln", "bn", "gn"})
_SCALE_NAMES = frozenset({"scale", "gamma", "weight", "g", "w"})
_OFFSET_NAMES = frozenset({"offset", "beta", "bias", "b"})
_BIAS = re.compile(r"b|b_?\d+|bias(es)?|.*_bias|bias_.*")
_EMBEDDING_NAMES = frozenset(
  {
    "embedding",
    "embeddings",
    "embedding_table",
    "wte",
    "word_embeddings",
    "embed_tokens",
    "tok_embeddings",
    "token_embedding",
    "token_embeddings",
  }
)
_EMBEDDING_OWNERS = frozenset({"embed", "embedding"})
_KERNEL = re.compile(r"kernel|w|weights?|w_?\d+")


class Role:
  """The role names `by_role` reports (`jaxl2.describe`'s "why" column)."""

  NOT_FLOATING = "not floating"
  RUNNING_STAT = "running statistic"
  CACHE = "cache"
  POSITIONAL = "positional embedding"
  CLASS_TOKEN = "class token"
  NORM_SCALE = "norm scale"
  NORM_OFFSET = "norm offset"
  NORM_OTHER = "norm parameter"
  BIAS = "bias"
  EMBEDDING = "token embedding"
  KERNEL = "kernel"
  VECTOR_WEIGHT = "weight with ndim < 2"
  UNKNOWN_MATRIX = "ndim >= 2 (role unknown)"
  UNKNOWN_VECTOR = "ndim < 2 (role unknown)"


def _names(path: str) -> list[str]:
  """Path keys in lower case, without Haiku's ``~``, Keras's ``:0`` and list indices."""
  keys = re.split(r"[/.]", path.lower())
  keys = [re.sub(r":\d+$", "", k) for k in keys]
  return [k for k in keys if k and k != "~"]


def _words(name: str) -> list[str]:
  return [w for w in re.split(r"[^a-z]+", name) if w]


def _is_norm(name: str | None) -> bool:
  if not name:
    return False
  return any(
    w in _NORM_WORDS or w.endswith("norm") or w.startswith("normaliz") for w in _words(name)
  )


def role_of(leaf: Leaf) -> str:
  """The role of one leaf, by the rules in this module's docstring."""
  if not is_inexact(leaf.value):
    return Role.NOT_FLOATING
  keys = _names(leaf.path)
  name = keys[-1] if keys and not keys[-1].isdigit() else ""
  modules = [k for k in keys[:-1] if not k.isdigit()]
  parent = modules[-1] if modules else None
  owner = (leaf.owner or "").lower()

  if (
    _STATE_TOKENS.intersection(keys)
    or name in _STATE_LEAVES
    or any(k.endswith("_ema") or k == "ema" for k in keys)
    or owner == "stateindex"
  ):
    return Role.RUNNING_STAT
  if _CACHE_TOKENS.intersection(keys) or name in _CACHE_LEAVES:
    return Role.CACHE
  if any(k and _POSITIONAL.fullmatch(k) for k in (name, parent)):
    return Role.POSITIONAL
  if name in _CLASS_TOKENS or parent in _CLASS_TOKENS:
    return Role.CLASS_TOKEN
  if _is_norm(parent) or _is_norm(owner):
    if name in _SCALE_NAMES:
      return Role.NORM_SCALE
    if name in _OFFSET_NAMES:
      return Role.NORM_OFFSET
    return Role.NORM_OTHER
  if name in ("scale", "gamma"):
    return Role.NORM_SCALE
  if name in ("offset", "beta"):
    return Role.NORM_OFFSET
  if _BIAS.fullmatch(name):
    return Role.BIAS
  embedding_module = parent is not None and ("emb" in parent or parent == "wte")
  if name in _EMBEDDING_NAMES or (
    name == "weight" and (owner in _EMBEDDING_OWNERS or embedding_module)
  ):
    return Role.EMBEDDING
  ndim = np.ndim(leaf.value)
  if _KERNEL.fullmatch(name):
    return Role.KERNEL if ndim >= 2 else Role.VECTOR_WEIGHT
  return Role.UNKNOWN_MATRIX if ndim >= 2 else Role.UNKNOWN_VECTOR


def role_selected(role: str, *, embeddings: bool, positional: bool) -> bool:
  """Whether `by_role` with these options penalizes a leaf of this role."""
  if role in (Role.KERNEL, Role.UNKNOWN_MATRIX):
    return True
  if role == Role.EMBEDDING:
    return embeddings
  if role in (Role.POSITIONAL, Role.CLASS_TOKEN):
    return positional
  return False
