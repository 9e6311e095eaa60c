"""jaxl2: L2 regularization for JAX, verified by autodiff.

J(W) = loss + (λ / 2m) · Σ_j ‖W_j‖²,   ∂/∂W_j = (λ / m) · W_j
"""

from jaxl2.demo._datasets import Digits, load_digits
from jaxl2.implicit._curvature import GaussNewton
from jaxl2.implicit._effective_params import EffectiveParams, effective_params
from jaxl2.implicit._hypergradient import Hypergradient, lam_hypergradient
from jaxl2.masks._mask_builders import all_floating, by_name, by_ndim, by_regex, by_role
from jaxl2.penalties._family import (
  elastic_net_penalty,
  elastic_net_penalty_grad,
  l1_penalty,
  l1_penalty_grad,
  l2_sp_penalty,
  l2_sp_penalty_grad,
)
from jaxl2.penalties._penalties import l2_penalty, l2_penalty_grad, regularized, weight_sq_norm
from jaxl2.reports._describe import Description, LeafRow, describe
from jaxl2.sweeps._sweep import SweepResult, sweep
from jaxl2.training._metrics import accuracy
from jaxl2.training._training import TrainState, TrainStep, make_eval_step, make_train_step
from jaxl2.transforms._transforms import (
  AddL2GradState,
  L2SPGradState,
  add_l2_grad,
  l2_sp_grad,
  to_keras_l2,
  to_sklearn_alpha,
  to_sklearn_C,
  to_weight_decay,
)
from jaxl2.tuning._tune import TuneResult, TuneStep, tune_lam
from jaxl2.verify._verify import verify_penalty, verify_update
from jaxl2.verify._verify_report import VerifyReport, VerifyRow

__version__ = "0.1.0"

__all__ = [
  "AddL2GradState",
  "Description",
  "Digits",
  "EffectiveParams",
  "GaussNewton",
  "Hypergradient",
  "L2SPGradState",
  "LeafRow",
  "SweepResult",
  "TrainState",
  "TrainStep",
  "TuneResult",
  "TuneStep",
  "VerifyReport",
  "VerifyRow",
  "__version__",
  "accuracy",
  "add_l2_grad",
  "all_floating",
  "by_name",
  "by_ndim",
  "by_regex",
  "by_role",
  "describe",
  "effective_params",
  "elastic_net_penalty",
  "elastic_net_penalty_grad",
  "l1_penalty",
  "l1_penalty_grad",
  "l2_penalty",
  "l2_penalty_grad",
  "l2_sp_grad",
  "l2_sp_penalty",
  "l2_sp_penalty_grad",
  "lam_hypergradient",
  "load_digits",
  "make_eval_step",
  "make_train_step",
  "regularized",
  "sweep",
  "to_keras_l2",
  "to_sklearn_C",
  "to_sklearn_alpha",
  "to_weight_decay",
  "tune_lam",
  "verify_penalty",
  "verify_update",
  "weight_sq_norm",
]
