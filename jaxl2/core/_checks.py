"""Validation of user arguments: the scalars ``lam`` and ``m``, callables and optimizers.

Values are checked where they are concrete. Under `jax.jit`, `jax.vmap` or
`jax.grad` they are tracers whose values do not exist yet: then only their
shape and dtype are checked here, and the value rules are registered with
`jax.experimental.checkify.debug_check`, which is a no-op unless the caller
wraps the function in `checkify.checkify` (then a bad value raises there).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import checkify

__all__ = [
  "GROUPS_NOT_HERE",
  "check_call_signature",
  "check_callable",
  "check_count",
  "check_lam",
  "check_m",
  "check_optimizer",
  "check_real_scalar",
  "concrete",
]


def _describe_value(value: Any) -> str:
  if isinstance(value, (jax.Array, np.ndarray)):
    return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
  return f"{value!r} ({type(value).__name__})"


def check_real_scalar(value: Any, name: str) -> Any:
  """Checks that ``value`` is a real scalar; returns it as a NumPy/JAX scalar.

  Raises:
    TypeError: not a number, a bool, or a complex/non-numeric array.
    ValueError: an array that is not 0-d.
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a real number; got the bool {value!r}.")
  if isinstance(value, numbers.Real):
    return value
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    dtype = (
      np.dtype(value.dtype) if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended) else None
    )
    if dtype is None or not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
      raise TypeError(f"`{name}` must be a real number; got {_describe_value(value)}.")
    if np.ndim(value) != 0:
      raise ValueError(
        f"`{name}` must be a scalar (0-d); got {_describe_value(value)}. "
        "To try several values at once, `jax.vmap` over it."
      )
    return value
  raise TypeError(f"`{name}` must be a real number; got {_describe_value(value)}.")


def concrete(value: Any) -> float | None:
  """A concrete scalar as a Python float (exact for any integer up to 2**53); None if traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  return float(value)


# A {pattern: λ_g} table where one λ is needed: what takes one instead, and the equivalent here.
GROUPS_NOT_HERE = (
  "`{name}` is a {{pattern: λ}} table (one λ per group of leaves); this function takes one "
  "number. One λ per group is taken by l2_penalty, l2_penalty_grad, regularized, "
  "make_train_step, lam_hypergradient, effective_params and tune_lam. Here, fixed strengths per "
  "group are mask multipliers: pass one λ and the ratios in the mask, e.g. `{name}=1.0, "
  "mask=jaxl2.by_regex({{pattern: λ_g, ...}})`."
)


def check_lam(lam: Any, name: str = "lam") -> None:
  """Checks λ: a real scalar, finite and ≥ 0 (values only where concrete).

  Raises:
    TypeError: also for a ``{pattern: λ}`` table, which only the functions
      that take one λ per group accept (`jaxl2.penalties._lam_groups`).
  """
  if isinstance(lam, Mapping):
    raise TypeError(GROUPS_NOT_HERE.format(name=name))
  check_real_scalar(lam, name)
  value = concrete(lam)
  if value is None:
    checkify.debug_check(
      (lam >= 0) & (lam < np.inf), f"`{name}` must be a finite number >= 0; got {{}}.", lam
    )
    return
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}.")


def check_m(m: Any, name: str = "m") -> None:
  """Checks m, the number of training inputs: a real scalar, finite and > 0."""
  check_real_scalar(m, name)
  value = concrete(m)
  if value is None:
    checkify.debug_check(
      (m > 0) & (m < np.inf),
      f"`{name}` (the number of training inputs) must be a finite number > 0; got {{}}.",
      m,
    )
    return
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
      f"`{name}` (the number of training inputs) must be a finite number > 0; got {value!r}. "
      "Pass the size of the training set, not of the batch."
    )


def check_callable(fn: Any, name: str, *, usage: str = "") -> None:
  """Checks that ``fn`` (the argument called ``name``) is callable.

  ``usage`` shows how it is called (e.g. ``"loss_fn(params, lam)"``) in the message.
  """
  if not callable(fn):
    called = f" as `{usage}`" if usage else ""
    raise TypeError(
      f"`{name}` must be callable{called}; got {fn!r:.80} ({type(fn).__name__}). "
      "Pass the function, not its value."
    )


def check_call_signature(fn: Any, name: str, *, usage: str, n_args: int, fix: str) -> None:
  """Checks that ``fn`` (the argument called ``name``) accepts ``n_args`` positional arguments.

  Runs before ``fn`` is traced, so a wrong signature reads as the contract
  ``usage`` (e.g. ``"loss_fn(params, lam)"``) and ``fix``, not as Python's bare
  "missing 1 required positional argument" from deep inside a trace. A
  callable whose signature Python cannot read (some builtins) is let through.
  """
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(*range(n_args))
  except TypeError as err:
    label = getattr(fn, "__name__", type(fn).__name__)
    raise TypeError(
      f"`{name}` must be callable as `{usage}`; `{label}{signature}` cannot be called with "
      f"{n_args} arguments ({err}). {fix}"
    ) from None


def check_optimizer(tx: Any, name: str = "optimizer") -> None:
  """Checks that ``tx`` is an optax GradientTransformation (callable ``init`` and ``update``)."""
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(
      f"`{name}` must be an optax GradientTransformation (with `init` and `update`); got "
      f"{tx!r:.80} ({type(tx).__name__}). Pass the transformation, e.g. `optax.sgd(0.1)`, "
      "not its state or its updates."
    )


def check_count(value: Any, name: str, *, least: int = 1, why: str = "") -> None:
  """Checks that ``value`` (the argument called ``name``) is an integer >= ``least``.

  ``why`` is appended to the rule, e.g. ``" (a standard error needs two)"``.
  """
  integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
  if not integer or value < least:
    raise ValueError(f"`{name}` must be an integer >= {least}{why}; got {value!r}.")
