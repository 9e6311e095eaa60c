r"""A randomized Nyström preconditioner for C + μ·I, C positive semi-definite (Gauss-Newton).

The systems the λ tools solve, (C + (λ/m)·diag(c) + δ·I)·x = b, are badly
conditioned on networks: C has a few large eigenvalues and many near zero,
against a shift μ = λ/m of 10⁻⁴ or less, so plain conjugate gradients need
thousands of iterations. A rank-r Nyström approximation C ≈ U·diag(Λ)·Uᵀ from
r products C·Ω with a random Ω (Tropp, Yurtsever, Udell and Cevher 2017;
Frangella, Tropp and Udell 2023, "Randomized Nyström preconditioning") gives

    P⁻¹ = (Λ_r + μ)·U·(Λ + μ)⁻¹·Uᵀ + (I − U·Uᵀ),

which maps C's top r eigenvalues down to about Λ_r + μ: the iterations then
depend on the spectrum below the r-th eigenvalue only. The r products are
vectorized (`jax.vmap`, a few at a time), far cheaper per product than CG's
one-at-a-time ones. Vectors are pytrees with a leading axis of length r on
each leaf, so sharded params stay sharded; only r × r matrices are dense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxl2.implicit._sketch import signs_like

__all__ = ["nystrom"]

Tree = Any


def _gram(a: Tree, b: Tree) -> jax.Array:
  """Aᵀ·B for stacked pytrees (leading axis r): the r × r matrix of ⟨a_i, b_j⟩."""
  pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  parts = [x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1).T for x, y in pairs]
  return sum(parts[1:], parts[0])


def _combine(a: Tree, coefficients: jax.Array) -> Tree:
  """Σ_i a_i·K[i, j] for each j: a stacked pytree times an r × k matrix."""
  return jax.tree_util.tree_map(lambda x: jnp.tensordot(coefficients, x, axes=([0], [0])), a)


def _apply(u: Tree, weights: jax.Array, v: Tree) -> Tree:
  """v + U·diag(weights)·Uᵀ·v."""
  pairs = zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(v), strict=True)
  parts = [x.reshape(x.shape[0], -1) @ y.reshape(-1) for x, y in pairs]
  coefficients = weights * sum(parts[1:], parts[0])
  return jax.tree_util.tree_map(lambda x, y: y + jnp.tensordot(coefficients, x, axes=1), u, v)


def nystrom(
  product: Callable[[Tree], Tree], like: Tree, seed: jax.Array, rank: int, shift: jax.Array
) -> Callable[[Tree], Tree]:
  """P⁻¹ (module docstring) for C = ``product`` (positive semi-definite) and μ = ``shift``.

  ``like`` gives the vectors' structure and dtype. Returns v ↦ P⁻¹·v, traceable.
  Where the approximation fails (non-finite, as when C is not positive
  semi-definite), P⁻¹ is the identity.
  """
  omega = signs_like(like, rank, seed)  # random signs: a sub-Gaussian sketch
  # Orthonormal test vectors (Cholesky QR): better conditioned r × r systems below.
  q_evals, q = jnp.linalg.eigh(_gram(omega, omega))
  omega = _combine(omega, q / jnp.sqrt(jnp.maximum(q_evals, 1e-30)))
  y = jax.lax.map(product, omega)
  dtype = jax.tree_util.tree_leaves(like)[0].dtype
  nu = jnp.sqrt(_gram(y, y).trace()) * jnp.finfo(dtype).eps * 10
  y = jax.tree_util.tree_map(lambda a, b: a + nu * b, y, omega)
  # B = Y·M^(-1/2), M = Ωᵀ·Y (symmetric, PSD up to rounding): C ≈ B·Bᵀ.
  m_evals, m_vecs = jnp.linalg.eigh((_gram(omega, y) + _gram(y, omega)) / 2)
  inv_sqrt = m_vecs / jnp.sqrt(jnp.maximum(m_evals, nu))
  b = _combine(y, inv_sqrt)
  # Thin SVD of B from its Gram matrix: B = U·Σ·Vᵀ, U = B·V·Σ⁻¹.
  s2, v = jnp.linalg.eigh(_gram(b, b))
  u = _combine(b, v / jnp.sqrt(jnp.maximum(s2, nu)))
  lam = jnp.maximum(s2 - nu, 0.0)
  weights = (jnp.min(lam) + shift) / (lam + shift) - 1.0
  ok = jnp.all(jnp.isfinite(weights)) & jnp.all(m_evals > -jnp.abs(m_evals).max() * 1e-3)
  weights = jnp.where(ok, weights, 0.0)
  u = jax.tree_util.tree_map(lambda x: jnp.where(ok, x, 0.0), u)
  return lambda v: _apply(u, weights, v)
