"""Shared test helpers: float64 references, tree comparisons, model builders."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def as_f64(x: Any) -> np.ndarray:
  """A leaf as a NumPy float64 (or complex128) array, the reference precision."""
  x = np.asarray(jax.device_get(x))
  return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def ref_sq_norm(x: Any) -> float:
  """‖x‖² = Σ|x|² in float64 with NumPy."""
  x = as_f64(x)
  return float(np.sum(np.abs(x) ** 2))


def ref_l2(leaves: Iterable[tuple[Any, float]], lam: float, m: float) -> float:
  """(λ / 2m) · Σ c·‖W‖² in float64, given (leaf, multiplier) pairs."""
  return lam / (2.0 * m) * sum(c * ref_sq_norm(w) for w, c in leaves)


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """{'a/b/0/kernel': leaf} with a path spelling written independently of jaxl2."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = []
    for k in kp:
      parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    if parts and parts[-1] == "value":
      parts.pop()
    out["/".join(parts)] = leaf
  return out


def assert_trees_close(a: Any, b: Any, *, rtol: float, atol: float = 0.0) -> None:
  """Same structure, and every leaf pair close (NumPy float64 comparison)."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(as_f64(x), as_f64(y), rtol=rtol, atol=atol)


# ---- models -----------------------------------------------------------------


class MLP(nn.Module):
  """Flax linen MLP."""

  features: tuple[int, ...] = (16, 8, 3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class CNN(nn.Module):
  """Flax linen CNN with BatchNorm and LayerNorm (their scales must not be penalized)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.LayerNorm()(x)
    return nn.Dense(2)(x)


def linen_mlp_params(seed: int = 0, in_dim: int = 5) -> Any:
  return MLP().init(jax.random.key(seed), jnp.ones((1, in_dim)))["params"]


def linen_cnn_variables(seed: int = 0) -> Any:
  return CNN().init(jax.random.key(seed), jnp.ones((1, 6, 6, 1)))


class NNXNet(nnx.Module):
  """Flax NNX net with a BatchNorm and a Dropout (RNG state inside the module)."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense1 = nnx.Linear(5, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.dense2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense2(self.drop(nnx.relu(self.bn(self.dense1(x)))))


def nnx_net(seed: int = 0) -> NNXNet:
  return NNXNet(nnx.Rngs(seed))


def randomize(tree: Any, seed: int = 0, scale: float = 1.0) -> Any:
  """Replaces floating leaves by random normal values (so biases are non-zero)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [
    scale * jax.random.normal(k, x.shape, x.dtype)
    if jnp.issubdtype(getattr(x, "dtype", jnp.int32), jnp.floating)
    else x
    for k, x in zip(keys, leaves, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)


# ---- training helpers (optimizer/training tests) -------------------------------


def mlp_problem(seed: int = 0, n: int = 32, in_dim: int = 5, dtype: Any = jnp.float32):
  """A linen MLP, its params in ``dtype``, a regression batch and a mean-squared loss."""
  model = MLP(features=(16, 8, 1))
  params = model.init(jax.random.key(seed), jnp.ones((1, in_dim)))["params"]
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, in_dim)), dtype)
  y = jnp.asarray(rng.normal(size=(n, 1)), dtype)

  def apply_fn(p, inputs):
    return model.apply({"params": p}, inputs)

  def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)

  def loss(p):
    return mse(apply_fn(p, x), y)

  return params, (x, y), apply_fn, mse, loss


def kernel_mask(params: Any) -> Any:
  """The default selection written as an optax-style bool pytree."""
  return jax.tree_util.tree_map(lambda w: w.ndim >= 2, params)


# ---- the penalty family (L1, elastic net, L2-SP) ------------------------------


def ref_abs_sum(x: Any) -> float:
  """Σ|x| (the modulus for complex x) in float64 with NumPy."""
  return float(np.sum(np.abs(as_f64(x))))


def ref_l1(leaves: Iterable[tuple[Any, float]], lam: float, m: float) -> float:
  """(λ / m) · Σ c·Σ|W| in float64, given (leaf, multiplier) pairs."""
  return lam / m * sum(c * ref_abs_sum(w) for w, c in leaves)


def ref_elastic_net(leaves: Iterable[tuple[Any, float]], lam: float, m: float, rho: float) -> float:
  """(λ / m) · Σ c·[ρ·Σ|W| + ((1 − ρ) / 2)·‖W‖²] in float64."""
  terms = (c * (rho * ref_abs_sum(w) + (1 - rho) / 2 * ref_sq_norm(w)) for w, c in leaves)
  return lam / m * sum(terms)


def ref_l2_sp(triples: Iterable[tuple[Any, Any, float]], lam: float, m: float) -> float:
  """(λ / 2m) · Σ c·‖W − W₀‖² in float64, given (leaf, anchor leaf, multiplier) triples."""
  return lam / (2.0 * m) * sum(c * ref_sq_norm(as_f64(w) - as_f64(w0)) for w, w0, c in triples)


def ref_sign(x: Any) -> np.ndarray:
  """The derivative of |x| as `jax.grad` defines it, in float64: +1 where x >= 0 (so at 0),
  -1 elsewhere; conj(x)/|x| for complex x, 0 at 0."""
  x = as_f64(x)
  if np.iscomplexobj(x):
    modulus = np.abs(x)
    return np.conj(x) / np.where(modulus == 0, 1.0, modulus)
  return np.where(x >= 0, 1.0, -1.0)


def low_precision_tree(dtype: Any, seed: int = 0) -> dict[str, jax.Array]:
  """1,000,000 standard-normal weights in two leaves of ``dtype`` (bf16/fp16 precision tests)."""
  rng = np.random.default_rng(seed)
  return {
    "w_a": jnp.asarray(rng.normal(size=(1000, 600)), dtype),
    "w_b": jnp.asarray(rng.normal(size=(500, 800)), dtype),
  }


def optax_trajectory(tx, loss, params, steps):
  """Params after each of ``steps`` jitted optax steps on ``loss`` (gradients by `jax.grad`)."""
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append(params)
  return trajectory
