"""The training state and the pure functions that advance and evaluate it.

Both forms of `make_train_step` run through one step: the simple form
``loss_fn(apply_fn(params, inputs), targets)`` is written in the general one,
``loss(params, model_state, batch, key) -> (loss, (new_model_state, aux))``,
with no model state, no key and no aux. The step asks ``loss_of(state.static)``
for the loss when it traces: the model's static part (an NNX GraphDef, an
Equinox module's fields) is read from the state it is given, never from a
model seen earlier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from jaxl2.masks._masks import MaskSpec
from jaxl2.penalties._lam_groups import new_lam
from jaxl2.training._metrics import Metrics, regularized_loss
from jaxl2.training._models import Static, bind

__all__ = ["LossOf", "StepFn", "TrainState", "as_lam", "eval_fn", "model_loss", "step_fn"]

ModelLoss = Callable[[Any, Any, Any, Any], tuple[jax.Array, tuple[Any, Metrics]]]
# The model loss for a state's static part (`jaxl2.training._models.bind` with the user's loss).
LossOf = Callable[[Static | None], ModelLoss]


class TrainState(NamedTuple):
  """Everything a training step carries; a pytree, so it checkpoints as is.

  Attributes:
    params: the model parameters (for an NNX module, its ``nnx.Param`` state;
      for an Equinox module, its floating arrays).
    opt_state: the optax optimizer state.
    step: number of steps taken (int32).
    lam: λ, a 0-d array in the penalty's accumulation dtype (float32, or
      float64 for float64 params with 64-bit enabled); for a step built with
      one λ per group, a ``{pattern: λ_g}`` dict of such arrays. Change it
      with `TrainStep.set_lam`.
    model_state: what the model carries and updates besides its params
      (linen ``batch_stats``, Haiku state, an NNX module's BatchStat and RNG
      Variables, an ``eqx.nn.State``); ``None`` in the simple form.
    key: the PRNG key the step's dropout keys derive from,
      ``fold_in(key, step)`` (general form; ``None`` in the simple form).
      An NNX module draws its dropout keys from its own RNG streams, carried
      in ``model_state``; ``key`` only marks training mode there.
    static: the model's static part, for an NNX module (its GraphDef) or an
      Equinox module (its non-array fields); ``None`` otherwise. Pytree
      metadata, not a leaf: a state steps the model it was made from, and
      two models that differ only here compile two programs.
  """

  params: Any
  opt_state: Any
  step: jax.Array
  lam: jax.Array | dict[str, jax.Array]
  model_state: Any = None
  key: Any = None
  static: Static | None = None


StepFn = Callable[[TrainState, Any], tuple[TrainState, Metrics]]


def as_lam(lam: Any, dtype: Any, like: Any = None) -> Any:
  """λ checked, as the state holds it: a fresh 0-d array of ``dtype`` (a dict of them for a
  ``{pattern: λ_g}`` table, in the order of ``like``, the step's λ; default ``lam``'s own)."""
  return new_lam(lam, lam if like is None else like, dtype)


def simple_loss(apply_fn: Callable[[Any, Any], Any], loss_fn: Callable[..., Any]) -> ModelLoss:
  """``loss_fn(apply_fn(params, inputs), targets)`` in the general form."""

  def loss(params: Any, model_state: Any, batch: Any, key: Any) -> Any:
    inputs, targets = batch
    return loss_fn(apply_fn(params, inputs), targets), (model_state, {})

  return loss


def model_loss(apply_fn: Callable[[Any, Any], Any] | None, loss_fn: Callable[..., Any]) -> LossOf:
  """The general-form loss for a state's static part: ``apply_fn`` None is the general form.

  The simple form has no static part: ``loss_fn(apply_fn(params, inputs), targets)``.
  """
  if apply_fn is not None:
    simple = simple_loss(apply_fn, loss_fn)
    return lambda static: simple
  return lambda static: bind(loss_fn, static)


def step_fn(
  loss_of: LossOf, optimizer: Any, m: Any, mask: MaskSpec, patterns: tuple[str, ...] = ()
) -> StepFn:
  """One step of ``optimizer`` on model loss + (λ/2m)·Σ c·‖W‖², uncompiled.

  ``patterns``: with one λ per group, the order the table's patterns are tried
  in (the state's dict comes back from `jax.jit` with sorted keys).
  """

  def objective(params: Any, state: TrainState, batch: Any, key: Any) -> Any:
    model = loss_of(state.static)
    data_loss, (model_state, aux) = model(params, state.model_state, batch, key)
    lam = {p: state.lam[p] for p in patterns} if patterns else state.lam
    loss, metrics = regularized_loss(data_loss, params, lam, m, mask)
    return loss, ({**aux, **metrics}, model_state)

  def step(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
    """One step, uncompiled. Metrics are evaluated at the incoming params."""
    key = None if state.key is None else jax.random.fold_in(state.key, state.step)
    grads, (metrics, model_state) = jax.grad(objective, has_aux=True)(
      state.params, state, batch, key
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state._replace(
      params=params, opt_state=opt_state, step=optax.safe_increment(state.step),
      model_state=model_state,
    )  # fmt: skip
    return new_state, metrics

  return step


def eval_fn(loss_of: LossOf) -> Callable[[TrainState, Any], Metrics]:
  """The data loss and aux metrics in eval mode (``key=None``), uncompiled."""

  def evaluate(state: TrainState, batch: Any) -> Metrics:
    """General form, uncompiled: the data loss and aux metrics in eval mode (key None).

    The model state is used (running statistics), not updated; no penalty.
    """
    model = loss_of(state.static)
    data_loss, (_, aux) = model(state.params, state.model_state, batch, None)
    return {**aux, "loss": data_loss}

  return evaluate
