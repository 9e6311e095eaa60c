"""One leaf's measured term against the intended one: least-squares factors and residuals.

The fit is a handful of dot products per leaf, written once for NumPy and
for JAX (``xp``): on the host for params on this process's devices (a copy
costs less than compiling a dozen reductions per leaf), inside the compiled
measurement for params spread over several processes, where no leaf ever
reaches a host, only its nine numbers. On the host the dot products are
float32 BLAS (~1e-6 relative over a million elements), in a program XLA's
reductions (~1e-7): either is far inside any ``rtol`` a check is judged by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.verify._verify_probe import HALF_PRECISION

__all__ = ["LeafFit", "leaf_fit", "penalty_fits", "update_fits"]


class LeafFit(NamedTuple):
  """Norms and least-squares fits of one leaf's measured term s (Python floats).

  ``k_*`` is the k in s ≈ k·r and ``residual_*`` is ‖s − k·r‖, for r the
  intended term, the multiplier-1 term (``unit``) and the direction W.
  """

  finite: bool
  measured: float
  intended: float
  unit: float
  k_intended: float
  residual_intended: float
  k_unit: float
  residual_unit: float
  residual_direction: float

  @classmethod
  def of(cls, numbers: Any) -> LeafFit:
    """The fit from a row of `leaf_fit`; all NaN (not ``finite``) if the term had NaN or inf."""
    numbers = [float(x) for x in np.asarray(numbers)]
    if not numbers[0]:
      return cls(False, *([math.nan] * 8))
    return cls(True, *numbers[1:])


def _product(a: jax.Array, b: jax.Array | None) -> jax.Array:
  """a·b elementwise, complex numbers taken as pairs of reals: Re(conj(a)·b); a if b is None."""
  if b is None:
    return a
  if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
    return jnp.real(jnp.conj(a) * b)
  return a * b


def _sums(xp: Any, pairs: Iterable[tuple[Any, Any]]) -> Any:
  """Σ Re(conj(a)·b) (Σ a for b None) for each pair of arrays of one shape.

  With NumPy a BLAS dot product per pair, with no temporary; in a program
  one reduction of their stack, which XLA compiles to one fused loop rather
  than one per pair.
  """
  if xp is np:
    return np.array([np.sum(a) if b is None else np.vdot(a, b).real for a, b in pairs])
  products = [_product(a, b) for a, b in pairs]
  return jnp.sum(jnp.stack(products), axis=tuple(range(1, jnp.ndim(products[0]) + 1)))


def _ratio(xp: Any, a: Any, b: Any) -> Any:
  return xp.where(b > 0, a / xp.where(b > 0, b, 1), 0)


def leaf_fit(measured: list[Any], intended: Any, unit: Any, direction: Any, xp: Any = np) -> Any:
  """`LeafFit`'s nine numbers for each of one leaf's ``measured`` terms s: (len(measured), 9).

  k = ⟨r, s⟩/⟨r, r⟩ and ‖s − k·r‖ for r each of ``intended``, ``unit`` and
  ``direction``, in two reductions (the dot products, then the residuals).
  A term with NaN or inf, or whose squares overflow, is not ``finite``.
  ``xp`` is `numpy` for host arrays, `jax.numpy` inside a compiled program;
  `LeafFit.of` reads a row.

  Example:
    >>> w = np.array([1.0, 2.0], np.float32)
    >>> fit = LeafFit.of(leaf_fit([2 * w], w, w, w)[0])
    >>> fit.k_intended, fit.residual_intended
    (2.0, 0.0)
  """
  refs = [xp.asarray(r) for r in (intended, unit, direction)]
  measured = [xp.asarray(s) for s in measured]
  # First reduction: ‖r‖² for each r, then for each term ‖s‖² and ⟨r, s⟩ for each r.
  pairs = [(r, r) for r in refs]
  for s in measured:
    pairs += [(s, s)] + [(r, s) for r in refs]
  dots = _sums(xp, pairs)
  rr = dots[:3]
  per_term = [dots[3 + 4 * i : 7 + 4 * i] for i in range(len(measured))]
  ks = [[_ratio(xp, d[1 + j], rr[j]) for j in range(3)] for d in per_term]
  # Second reduction: the residuals ‖s − k·r‖², each gap made when it is summed.
  gaps = (
    s - xp.asarray(k, s.dtype) * r
    for s, k_s in zip(measured, ks, strict=True)
    for k, r in zip(k_s, refs, strict=True)
  )
  residuals = xp.sqrt(_sums(xp, ((g, g) for g in gaps)))
  rows = []
  for i, (s, d, k) in enumerate(zip(measured, per_term, ks, strict=True)):
    res = residuals[3 * i : 3 * i + 3]
    finite = xp.isfinite(d[0]) & xp.isfinite(rr[0])
    numbers = [finite, xp.sqrt(d[0]), xp.sqrt(rr[0]), xp.sqrt(rr[1]), k[0], res[0], k[1]]
    numbers += [res[1], res[2]]
    rows.append(xp.stack([xp.asarray(x, s.real.dtype) for x in numbers]))
  return xp.stack(rows)


def penalty_fits(rate: Any, value: Any, w: Any, *, c: float, m: float, xp: Any = np) -> Any:
  """The penalty's gradient per unit λ (``value``) and its rate in λ fitted onto c·W/m: (2, 9)."""
  unit = xp.conj(w) / xp.asarray(m, w.real.dtype)  # JAX's gradient convention for complex
  intended = xp.asarray(c, unit.real.dtype) * unit
  return leaf_fit([value, rate], intended, unit, w, xp)


def rounding_stats(dtype: Any, effect: Any, w: Any, xp: Any = np) -> Any:
  """How a decay ``effect`` compares with half an ulp of ``w`` in ``dtype``, over w ≠ 0.

  Four numbers, each a reduction: the fraction of entries whose effect is
  below half an ulp of w; the effect relative to w, Σ|effect| / Σ|w|; half
  an ulp relative to w, Σ ulp/2 / Σ|w|; and whether any w ≠ 0.
  """
  w, effect = xp.abs(w).astype(np.float32), xp.abs(effect).astype(np.float32)
  nonzero = w > 0
  # ulp of a normal number: 2^(exponent − mantissa bits); frexp's exponent is exact.
  exponent = xp.frexp(xp.where(nonzero, w, 1))[1] - 1
  half_ulp = 0.5 * xp.exp2((exponent - jnp.finfo(dtype).nmant).astype(np.float32))
  half_ulp, effect = xp.where(nonzero, half_ulp, 0), xp.where(nonzero, effect, 0)
  lost = nonzero & (effect < half_ulp)
  flags = [x.astype(np.float32) for x in (nonzero, lost)]
  count, n_lost, total, decay, ulp = _sums(xp, [(x, None) for x in (*flags, w, effect, half_ulp)])
  numbers = [_ratio(xp, n_lost, count), _ratio(xp, decay, total), _ratio(xp, ulp, total), count > 0]
  return xp.stack([xp.asarray(x, np.float32) for x in numbers])


def update_fits(user: Any, base: Any, w: Any, *, dtype: Any, xp: Any = np) -> tuple[Any, ...]:
  """The decay's effect on one leaf's update, fitted onto coupled L2 through ``base_tx``.

  ``base`` stacks ``base_tx``'s slopes with coupled L2 of multiplier 0, the
  intended one and 1. Returns the fit's nine numbers (a ``unit`` norm of 0:
  no decay acts through ``base_tx``, the leaf may be frozen) and, for a
  bf16/fp16 ``dtype``, the `rounding_stats` of the effect, else None.
  """
  effect = user - base[0]
  fit = leaf_fit([effect], base[1] - base[0], base[2] - base[0], w, xp)[0]
  rounding = rounding_stats(dtype, effect, w, xp) if dtype in HALF_PRECISION else None
  return fit, rounding
