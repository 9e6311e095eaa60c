r"""The λ tools' view of a model: its losses over whole data sets and their curvature.

A `jaxl2.TrainStep` says how to call the model (simple form, general form,
NNX or Equinox module); its `jaxl2.TrainState` holds W*, the model state and
the model's static part. Everything here runs in evaluation mode (``key=None``:
no dropout, running statistics) and sums over the whole data set one batch at
a time (`jaxl2.implicit._batches`), inside the λ tools' compiled programs.

Two curvatures of the mean training loss L are offered:

* ``"hessian"``: ∇²L, exact, and indefinite on a network away from a strict
  minimum (conjugate gradients then stop at a direction with pᵀHp ≤ 0);
* ``"gauss_newton"``: the generalized Gauss-Newton matrix G = Σ_b (n_b/n)·
  J_bᵀ·∇²ℓ_b·J_b for a loss written as ℓ(f(W, x), y), a convex loss ℓ of the
  model's outputs f. G is positive semi-definite whenever ℓ is convex in the
  outputs (squared error, softmax or sigmoid cross-entropy) and equals ∇²L
  when f is linear in W (ridge, logistic regression); each product costs one
  forward-mode and one reverse-mode pass, about a Hessian-vector product.

The simple form (``apply_fn``, ``loss_fn(outputs, targets)``) is already
written that way; the general form says so with `jaxl2.GaussNewton`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxl2.implicit._batches import mean_over_batches
from jaxl2.training._models import Static, bind
from jaxl2.training._train_state import model_loss
from jaxl2.training._training import TrainStep

__all__ = [
  "CURVATURES",
  "Evaluation",
  "GaussNewton",
  "check_curvature",
  "curvature_product",
  "evaluation",
  "gauss_newton_gap",
  "value_and_grad",
]

CURVATURES = ("auto", "gauss_newton", "hessian")
Tree = Any


@dataclasses.dataclass(frozen=True)
class GaussNewton:
  r"""Gauss-Newton curvature for a general-form model: its outputs, and a loss of them.

  The λ tools' ``curvature=`` for a model trained with the general form
  (`jaxl2.make_train_step` with ``apply_fn=None``), whose one ``loss_fn``
  hides the split into a model f and a loss ℓ of its outputs. Give both:

  * ``outputs_fn``: the model's outputs in evaluation mode, called like the
    step's ``loss_fn`` but returning the outputs (any pytree of arrays):
    ``outputs_fn(params, model_state, batch, key)`` (``key`` is None), or
    ``outputs_fn(model, batch)`` for an NNX module, ``outputs_fn(model,
    model_state, batch, key)`` for an Equinox module;
  * ``output_loss``: ``output_loss(outputs, batch) -> scalar``, the mean
    data loss of those outputs, convex in them (squared error, softmax or
    sigmoid cross-entropy), so that G = Jᵀ·∇²ℓ·J is positive semi-definite.

  ``output_loss(outputs_fn(...), batch)`` must equal the step's ``loss_fn`` in
  evaluation mode: the λ tools check it on the first batch.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> curvature = jaxl2.GaussNewton(
    ...   outputs_fn=lambda model, batch: model(batch["image"]),
    ...   output_loss=lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(
    ...     logits, batch["label"]).mean())
  """

  outputs_fn: Callable[..., Any]
  output_loss: Callable[[Any, Any], jax.Array]


def check_curvature(curvature: Any, train: TrainStep) -> str | GaussNewton:
  """``curvature`` resolved for ``train``'s form: "hessian", "gauss_newton" or a `GaussNewton`.

  Raises:
    ValueError: an unknown name; "gauss_newton" for the general form (which
      needs `jaxl2.GaussNewton`); a `GaussNewton` for the simple form.
  """
  general = train.apply_fn is None
  if isinstance(curvature, GaussNewton):
    if not general:
      raise ValueError(
        "`curvature=jaxl2.GaussNewton(...)` is for the general form; the simple form "
        "(`apply_fn`, `loss_fn(outputs, targets)`) is a loss of outputs already: pass "
        "`curvature='gauss_newton'`."
      )
    return curvature
  if curvature not in CURVATURES:
    raise ValueError(
      f"`curvature` must be one of {CURVATURES} or a `jaxl2.GaussNewton`; got {curvature!r}."
    )
  if curvature == "gauss_newton" and general:
    raise ValueError(
      "`curvature='gauss_newton'` needs the model's outputs and a loss of them, which the "
      "general form's one `loss_fn` does not separate: pass `curvature=jaxl2.GaussNewton("
      "outputs_fn, output_loss)`, or `curvature='hessian'`."
    )
  if curvature == "auto":
    return "hessian" if general else "gauss_newton"
  return curvature


class Evaluation(NamedTuple):
  """Evaluation-mode functions of W (a pytree in the accumulation dtype) for one model."""

  loss: Callable[[Tree, Any], jax.Array]  # the mean data loss on one batch
  outputs: Callable[[Tree, Any], Any] | None  # Gauss-Newton: the model's outputs
  output_loss: Callable[[Any, Any], jax.Array] | None


def _outputs_loss(outputs_fn: Callable[..., Any], static: Static | None) -> Any:
  """``outputs_fn`` in the general form, the outputs standing where the loss stands."""
  if static is not None and static.kind == "nnx":
    return bind(lambda model, batch: (outputs_fn(model, batch), {}), static)

  def as_loss(params: Any, model_state: Any, batch: Any, key: Any) -> Any:
    return outputs_fn(params, model_state, batch, key), (model_state, {})

  return bind(as_loss, static)


def evaluation(
  train: TrainStep,
  loss_fn: Callable[..., Any],
  curvature: str | GaussNewton,
  static: Static | None,
  model_state: Any,
  dtypes: Tree,
) -> Evaluation:
  """The model's evaluation-mode functions, of W in the accumulation dtype (traceable).

  ``loss_fn`` is in the form of ``train.loss_fn`` (the step's own, or a
  validation loss of the same form); ``dtypes`` the params' leaf dtypes, to
  which W is cast before the model sees it.
  """

  def cast(w: Tree) -> Tree:
    return jax.tree_util.tree_map(lambda x, d: x.astype(d), w, dtypes)

  call = model_loss(train.apply_fn, loss_fn)(static)

  def loss(w: Tree, batch: Any) -> jax.Array:
    return call(cast(w), model_state, batch, None)[0]

  if curvature == "hessian":
    return Evaluation(loss, None, None)
  if isinstance(curvature, GaussNewton):
    forward = _outputs_loss(curvature.outputs_fn, static)

    def outputs(w: Tree, batch: Any) -> Any:
      return forward(cast(w), model_state, batch, None)[0]

    return Evaluation(loss, outputs, curvature.output_loss)

  def simple_outputs(w: Tree, batch: Any) -> Any:
    return train.apply_fn(cast(w), batch[0])

  return Evaluation(loss, simple_outputs, lambda out, batch: train.loss_fn(out, batch[1]))


def data_product(model: Evaluation, w: Tree, v: Tree, batch: Any) -> Tree:
  """C_b·v on one batch: ∇²ℓ_b·v (Hessian) or J_bᵀ·∇²ℓ(outputs)·J_b·v (Gauss-Newton)."""
  if model.outputs is None:
    return jax.jvp(jax.grad(lambda u: model.loss(u, batch)), (w,), (v,))[1]
  outputs, pullback = jax.vjp(lambda u: model.outputs(u, batch), w)
  jv = jax.jvp(lambda u: model.outputs(u, batch), (w,), (v,))[1]
  h_jv = jax.jvp(jax.grad(lambda o: model.output_loss(o, batch)), (outputs,), (jv,))[1]
  return pullback(h_jv)[0]


def curvature_product(
  model: Evaluation, w: Tree, data: Any, batch_size: int, acc: Any
) -> Callable[[Tree], Tree]:
  """v ↦ C·v = Σ_b (n_b/n)·C_b·v over all of ``data``: one pass over the data per product."""

  def product(v: Tree) -> Tree:
    return mean_over_batches(lambda b: data_product(model, w, v, b), data, batch_size, acc)

  return product


def value_and_grad(
  loss: Callable[[Tree, Any], jax.Array], w: Tree, data: Any, batch_size: int, acc: Any
) -> tuple[jax.Array, Tree]:
  """The mean of ``loss`` over ``data`` and its gradient, one pass."""
  return mean_over_batches(lambda b: jax.value_and_grad(loss)(w, b), data, batch_size, acc)


def gauss_newton_gap(model: Evaluation, w: Tree, batch: Any) -> jax.Array:
  """|ℓ(f(W)) − L| / max(|L|, 1e-12) on one batch: does the Gauss-Newton split match the loss?"""
  split = model.output_loss(model.outputs(w, batch), batch)
  whole = model.loss(w, batch)
  return jnp.abs(split - whole) / jnp.maximum(jnp.abs(whole), 1e-12)
