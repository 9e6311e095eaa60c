"""`make_train_step` and `make_eval_step`: a jit-compiled L2-regularized training step.

λ is part of the state (data, not a compile-time constant), so a new λ needs
no recompilation and `jaxl2.sweep` can `jax.vmap` the same step over many λ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxl2._checks import check_lam, check_m
from jaxl2._masks import MaskSpec, resolve
from jaxl2._penalties import l2_from_sq_norm, weight_sq_norm

__all__ = ["TrainState", "TrainStep", "accuracy", "make_eval_step", "make_train_step"]

ApplyFn = Callable[[Any, Any], Any]
LossFn = Callable[[Any, Any], jax.Array]
Batch = tuple[Any, Any]


class TrainState(NamedTuple):
  """Everything a training step carries; a pytree, so it checkpoints as is.

  Attributes:
    params: the model parameters.
    opt_state: the optax optimizer state.
    step: number of steps taken (int32).
    lam: λ, a float32 scalar array. Change it with `TrainStep.set_lam`.
  """

  params: Any
  opt_state: Any
  step: jax.Array
  lam: jax.Array


def _as_lam(lam: Any) -> jax.Array:
  check_lam(lam)
  # A fresh buffer each time: the state is donated, and a shared λ array would
  # be deleted by the first step that consumed it.
  return jnp.array(lam, jnp.float32, copy=True)


class TrainStep:
  """A compiled L2-regularized training step; build it with `jaxl2.make_train_step`.

  ``train.init(params)`` makes the state; ``train(state, batch)`` takes one
  step; ``train.step_fn`` is the same step uncompiled, to compose with
  `jax.vmap`, `jax.lax.scan` or your own `jax.jit`.
  """

  def __init__(
    self,
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    lam: Any,
    m: Any,
    mask: MaskSpec,
  ) -> None:
    for name, fn in (("apply_fn", apply_fn), ("loss_fn", loss_fn)):
      if not callable(fn):
        raise TypeError(f"`{name}` must be callable; got {fn!r} ({type(fn).__name__}).")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
      raise TypeError(
        f"`optimizer` must be an optax.GradientTransformation (with init and update); got "
        f"{optimizer!r}. For example `optax.sgd(0.1)`."
      )
    self.apply_fn, self.loss_fn, self.optimizer = apply_fn, loss_fn, optimizer
    check_lam(lam)
    check_m(m)
    self.lam = float(lam)
    self.m, self.mask = m, mask
    # Donating the state lets XLA update params and optimizer state in place.
    self._compiled = jax.jit(self.step_fn, donate_argnums=0)

  def init(self, params: Any, *, lam: Any = None) -> TrainState:
    """The initial state: ``params``, a fresh optimizer state, step 0 and λ.

    Args:
      params: the initial parameters (the mask is resolved on them here, so a
        bad mask fails now rather than inside the compiled step). They are
        copied: steps donate the state's buffers, never the caller's.
      lam: overrides the λ given to `make_train_step`.
    """
    resolve(params, self.mask)
    # Copied because the state is donated: the caller's arrays stay valid.
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    return TrainState(
      params=params,
      opt_state=self.optimizer.init(params),
      step=jnp.zeros([], jnp.int32),
      lam=_as_lam(self.lam if lam is None else lam),
    )

  def set_lam(self, state: TrainState, lam: Any) -> TrainState:
    """``state`` with a new λ (checked); the next step reuses the compiled program."""
    return state._replace(lam=_as_lam(lam))

  def objective(self, params: Any, lam: Any, batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    """data loss + (λ/2m)·Σ c·‖W‖² at ``params``, and its parts as metrics."""
    inputs, targets = batch
    data_loss = self.loss_fn(self.apply_fn(params, inputs), targets)
    sq_norm = weight_sq_norm(params, mask=self.mask)
    penalty = l2_from_sq_norm(sq_norm, lam, self.m)
    loss = data_loss + penalty
    return loss, {
      "loss": loss,
      "data_loss": data_loss,
      "penalty": penalty,
      "weight_sq_norm": sq_norm,
    }

  def step_fn(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    """One step, uncompiled. Metrics are evaluated at the incoming params."""
    grads, metrics = jax.grad(self.objective, has_aux=True)(state.params, state.lam, batch)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(params, opt_state, optax.safe_increment(state.step), state.lam)
    return new_state, metrics

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    """One compiled step. ``state`` is donated: use the returned state afterwards."""
    return self._compiled(state, batch)


def make_train_step(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  *,
  lam: Any,
  m: Any,
  mask: MaskSpec = None,
) -> TrainStep:
  r"""Builds a jit-compiled step minimizing ``loss_fn(apply_fn(params, x), y) + (λ/2m)·Σ c·‖W‖²``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``; for Flax linen
      ``lambda p, x: model.apply({"params": p}, x)``, for Flax NNX
      ``lambda p, x: nnx.merge(graphdef, p)(x)`` with ``graphdef, p = nnx.split(model)``.
    loss_fn: ``loss_fn(outputs, targets) -> scalar``, the *mean* data loss.
    optimizer: any `optax.GradientTransformation`; it sees the gradient of the
      regularized loss (coupled L2).
    lam: the initial λ ≥ 0; lives in the state and can change between steps.
    m: the number of training inputs (the training set, not the batch), > 0.
    mask: which leaves are penalized; as for `jaxl2.l2_penalty`.

  Returns:
    A `TrainStep`: ``state = train.init(params)``, then
    ``state, metrics = train(state, (inputs, targets))`` with metrics
    ``loss``, ``data_loss``, ``penalty`` and ``weight_sq_norm`` at the
    incoming params. The step compiles once; it retraces only if the shapes
    or dtypes of the state or batch change.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> train = jaxl2.make_train_step(
    ...   lambda p, x: x @ p["w"], lambda out, y: jnp.mean((out - y) ** 2),
    ...   optax.sgd(0.1), lam=1.0, m=4)
    >>> state = train.init({"w": jnp.ones((2, 1))})
    >>> state, metrics = train(state, (jnp.zeros((4, 2)), jnp.zeros((4, 1))))
    >>> float(metrics["penalty"]), state.params["w"][0, 0]  # 1/8 · 2; w ← w − 0.1 · (1/4) · w
    (0.25, Array(0.975, dtype=float32))
  """
  return TrainStep(apply_fn, loss_fn, optimizer, lam=lam, m=m, mask=mask)


def accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Classification accuracy, decided from shapes (static, so safe under jit).

  Multi-class ``outputs`` (..., K) with K > 1 are compared by argmax with
  integer labels, or with one-hot ``targets`` of the same rank. A single
  logit (..., 1) or (...,) is thresholded at 0 against 0/1 targets.
  """
  if outputs.ndim and outputs.shape[-1] > 1:
    predicted = jnp.argmax(outputs, axis=-1)
    labels = jnp.argmax(targets, axis=-1) if targets.ndim == outputs.ndim else targets
  else:
    predicted = (outputs > 0).reshape(targets.shape)
    labels = targets.astype(bool)
  return jnp.mean((predicted == labels).astype(jnp.float32))


def make_eval_step(
  apply_fn: ApplyFn, loss_fn: LossFn
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Builds a jit-compiled ``eval(params, (inputs, targets)) -> {"loss", "accuracy"}``.

  ``loss`` is the data loss alone (no penalty), so train and validation
  losses compare like with like; ``accuracy`` is `jaxl2.accuracy`.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> evaluate = jaxl2.make_eval_step(lambda p, x: x @ p, lambda o, y: jnp.mean((o - y) ** 2))
    >>> evaluate(jnp.eye(2), (jnp.eye(2), jnp.array([0, 1])))["accuracy"]
    Array(1., dtype=float32)
  """

  @jax.jit
  def evaluate(params: Any, batch: Batch) -> dict[str, jax.Array]:
    inputs, targets = batch
    outputs = apply_fn(params, inputs)
    return {"loss": loss_fn(outputs, targets), "accuracy": accuracy(outputs, targets)}

  return evaluate
