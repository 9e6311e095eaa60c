"""One leaf's measured term against the intended one: least-squares factors and residuals.

Plain NumPy on the host: a handful of dot products per leaf needs no
compilation, and BLAS sums float32 over millions of elements to ~1e-7.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["LeafFit", "leaf_fit"]


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


def _flat(x: Any) -> np.ndarray:
  """A leaf as a flat real NumPy array (complex as interleaved real and imaginary parts)."""
  x = np.ascontiguousarray(jax.device_get(x)).ravel()
  return x.view(x.real.dtype) if np.iscomplexobj(x) else x


def _dot(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.dot(a, b))


def _fit(s: np.ndarray, r: np.ndarray) -> tuple[float, float]:
  """k in s ≈ k·r (least squares) and the residual ‖s − k·r‖."""
  rr = _dot(r, r)
  k = _dot(r, s) / rr if rr > 0 else 0.0
  residual = s - np.asarray(k, s.dtype) * r
  return k, math.sqrt(_dot(residual, residual))


def leaf_fit(measured: Any, intended: Any, unit: Any, direction: Any) -> LeafFit:
  """`LeafFit` of one leaf's ``measured`` term; all NaN (and not ``finite``) if it has NaN or inf.

  Example:
    >>> w = np.array([1.0, 2.0])
    >>> fit = leaf_fit(2 * w, w, w, w)
    >>> fit.k_intended, fit.residual_intended
    (2.0, 0.0)
  """
  s, t, u, d = (_flat(x) for x in (measured, intended, unit, direction))
  if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
    return LeafFit(False, *([math.nan] * 8))
  norms = [math.sqrt(_dot(x, x)) for x in (s, t, u)]
  return LeafFit(True, *norms, *_fit(s, t), *_fit(s, u), _fit(s, d)[1])
