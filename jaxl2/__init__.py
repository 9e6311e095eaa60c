"""jaxl2: L2 regularization for JAX, verified by autodiff.

J(W) = loss + (λ / 2m) · Σ_j ‖W_j‖²,   ∂/∂W_j = (λ / m) · W_j
"""

from jaxl2._describe import Description, LeafRow, describe
from jaxl2._masks import all_floating, by_name, by_ndim, by_regex
from jaxl2._penalties import l2_penalty, l2_penalty_grad, regularized

__version__ = "0.1.0"

__all__ = [
  "Description",
  "LeafRow",
  "__version__",
  "all_floating",
  "by_name",
  "by_ndim",
  "by_regex",
  "describe",
  "l2_penalty",
  "l2_penalty_grad",
  "regularized",
]
