"""`make_train_step` and `make_eval_step`: a jit-compiled L2-regularized training step.

λ is part of the state (data, not a compile-time constant), so a new λ needs
no recompilation and `jaxl2.sweep` can `jax.vmap` the same step over many λ.

The step is functions closed over `make_train_step`'s options (optax style), validated
there once: ``init`` builds the immutable `TrainState`; the step, jitted once with the
state donated, maps it to the next. ``init`` places the state (`jaxl2.training._placement`) and
`jax.jit` follows, so a call is a plain call of the jitted function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxl2.core._checks import check_callable, check_m, check_optimizer
from jaxl2.core._dtypes import accumulation_dtype
from jaxl2.masks._masks import MaskSpec, resolve
from jaxl2.penalties._lam_groups import check_lam_or_groups, group_index, is_grouped, lam_floats
from jaxl2.training._metrics import Metrics, accuracy, output_metrics
from jaxl2.training._models import split_model
from jaxl2.training._placement import ShardingSpec, check_sharding_spec, place, place_like, settle
from jaxl2.training._train_state import StepFn, TrainState, as_lam, eval_fn, model_loss, step_fn

__all__ = ["TrainState", "TrainStep", "make_eval_step", "make_train_step"]

ApplyFn = Callable[[Any, Any], Any]
LossFn = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
  """A compiled L2-regularized training step; build it with `jaxl2.make_train_step`.

  Functions closed over the options it was built with, which it also holds
  (``apply_fn``, ``loss_fn``, ``optimizer``, ``lam``, ``m``, ``mask``,
  ``param_sharding``, ``batch_sharding``): ``train.init(params)`` makes the
  state; ``train(state, batch)`` takes one compiled step;
  ``train.set_lam(state, lam)`` changes λ; ``train.step_fn`` is the same step
  uncompiled, to compose with `jax.vmap`, `jax.lax.scan` or your own
  `jax.jit`; ``train.eval_fn`` evaluates, uncompiled (general form;
  `jaxl2.make_eval_step` compiles it).
  """

  init: Callable[..., TrainState] = dataclasses.field(repr=False)
  set_lam: Callable[[TrainState, Any], TrainState] = dataclasses.field(repr=False)
  step_fn: StepFn = dataclasses.field(repr=False)
  eval_fn: Callable[[TrainState, Any], Metrics] = dataclasses.field(repr=False)
  _compiled: StepFn = dataclasses.field(repr=False)
  apply_fn: ApplyFn | None
  loss_fn: Callable[..., Any]
  optimizer: optax.GradientTransformation
  lam: float | dict[str, float]
  m: Any
  mask: MaskSpec = None
  param_sharding: ShardingSpec = None
  batch_sharding: ShardingSpec = None

  def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
    """One compiled step. ``state`` is donated: use the returned state afterwards.

    The returned state keeps the layout of ``state``; for a state made by
    ``init``, the very same shardings, leaf for leaf. With ``batch_sharding``
    the batch is first placed there by `jax.device_put` (a no-op for a batch
    already there; a host batch is split across the devices, not copied
    whole to each).

    Raises:
      ValueError: ``batch_sharding`` does not fit the batch.
    """
    return self._compiled(state, batch)


def _split(general: bool, model: Any, model_state: Any, seed: int | None) -> tuple[Any, ...]:
  """(params, model_state, key, static) of what ``init`` was given, in the step's form."""
  if general:
    params, model_state, static = split_model(model, model_state, seed=seed)
    return params, model_state, jax.random.key(0 if seed is None else seed), static
  if model_state is not None:
    raise ValueError(
      "`model_state` is for the general form (`make_train_step(None, loss_fn, ...)`); the "
      "simple form `apply_fn(params, inputs)` has no model state."
    )
  return model, None, None, None


def _init_fn(
  general: bool,
  optimizer: optax.GradientTransformation,
  *,
  lam: float | dict[str, float],
  mask: MaskSpec,
  param_sharding: ShardingSpec,
) -> Callable[..., TrainState]:
  """``init`` for the given form."""
  default_lam = lam

  def init(
    params: Any, model_state: Any = None, *, lam: Any = None, seed: int | None = None
  ) -> TrainState:
    """The initial state: ``params``, a fresh optimizer state, step 0 and λ.

    Args:
      params: the initial parameters (the mask is resolved on them here, so a
        bad mask fails now rather than inside the compiled step). They are
        copied: steps donate the state's buffers, never the caller's. The
        copy keeps each leaf's sharding, or takes ``param_sharding`` when
        the step was built with one. General form: a Flax NNX module or an
        Equinox module may be passed as it is.
      model_state: general form: the model's initial mutable state (linen
        ``variables["batch_stats"]``, Haiku state, ``eqx.nn.State``); None for
        an NNX module, whose state is in the module.
      lam: overrides the λ given to `make_train_step` (a table with the same
        patterns where that was a ``{pattern: λ_g}`` table).
      seed: general form: the seed of the state's PRNG key, from which each
        step's dropout key is ``fold_in(key(seed), step)`` (None: 0). An NNX
        module draws dropout keys from its own RNG streams: an int ``seed``
        restarts every stream from ``key(seed)`` (stream i at
        ``fold_in(key(seed), i)``, then the stream's name), None keeps the
        streams the module holds.

    Each call makes an independent state: a second model (of the same shapes
    or not, with another activation or NNX attribute) never changes what a
    state made earlier trains.

    When the params are spread over a mesh, the optimizer state follows them
    (optax builds it with ``zeros_like``) and the state's scalars (step, λ,
    optimizer counters) are replicated over that mesh.

    Raises:
      ValueError: the mask selects nothing or does not fit a λ table's patterns;
        ``param_sharding`` does not match the params or does not divide a leaf.
    """
    params, model_state, key, static = _split(general, params, model_state, seed)
    selection = resolve(params, mask)
    if is_grouped(default_lam):
      group_index(selection, list(default_lam))
    if param_sharding is None:
      params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
      params = place(params, param_sharding, "param_sharding", "params")
    acc = accumulation_dtype(leaf.value for leaf, _ in selection.selected)
    lam = as_lam(default_lam if lam is None else lam, acc, default_lam)
    state = TrainState(
      params, optimizer.init(params), jnp.zeros([], jnp.int32), lam, model_state, key, static
    )
    return settle(state, params)  # a copy: steps donate the state's buffers, never the caller's

  return init


def _set_lam(state: TrainState, lam: Any) -> TrainState:
  """``state`` with a new λ (checked); the next step reuses the compiled program.

  The new λ is placed like the old one (replicated over a sharded state's mesh). A state
  with one λ per group takes a ``{pattern: λ_g}`` table with the same patterns.
  """
  new = as_lam(lam, jax.tree_util.tree_leaves(state.lam)[0].dtype, state.lam)
  return state._replace(lam=jax.tree_util.tree_map(place_like, new, state.lam))


def _compiled(step: StepFn, batch_sharding: ShardingSpec) -> StepFn:
  """``step`` jitted once, donating the state; the batch placed first with ``batch_sharding``."""
  # Donating the state lets XLA update params and optimizer state in place.
  jitted = jax.jit(step, donate_argnums=0)
  if batch_sharding is None:
    return jitted

  def call(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
    return jitted(state, place(batch, batch_sharding, "batch_sharding", "batch"))

  return call


def make_train_step(
  apply_fn: ApplyFn | None,
  loss_fn: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  *,
  lam: Any,
  m: Any,
  mask: MaskSpec = None,
  param_sharding: ShardingSpec = None,
  batch_sharding: ShardingSpec = None,
) -> TrainStep:
  r"""Builds a jit-compiled step minimizing ``loss_fn(apply_fn(params, x), y) + (λ/2m)·Σ c·‖W‖²``.

  Two forms. The simple one: ``apply_fn(params, inputs) -> outputs`` and
  ``loss_fn(outputs, targets)``, batches ``(inputs, targets)``. The general
  one, for real models, is ``apply_fn=None`` and one function

      loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, aux))

  with ``model_state`` carried and updated in the train state (linen
  ``batch_stats``, Haiku state, ``eqx.nn.State``), ``key`` a fresh PRNG key
  per step, ``fold_in(key(seed), step)`` (``None`` in `make_eval_step`'s eval
  mode), ``aux`` a dict of metrics and ``batch`` any pytree. A Flax NNX
  module is passed to ``init`` as it is, with ``loss_fn(model, batch) ->
  loss | (loss, aux)``; an Equinox module with the general ``loss_fn(model,
  model_state, batch, key)``. The penalty is on the params only.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs``; for Flax linen
      ``lambda p, x: model.apply({"params": p}, x)``. ``None``: the general form.
    loss_fn: ``loss_fn(outputs, targets) -> scalar``, the *mean* data loss;
      in the general form, the model's loss as above.
    optimizer: any `optax.GradientTransformation`; it sees the gradient of the
      regularized loss (coupled L2).
    lam: the initial λ ≥ 0; lives in the state and can change between steps.
      Or a ``{pattern: λ_g}`` dict, one λ per group (as `jaxl2.l2_penalty`, in
      this dict's order): the state holds a dict of λ_g, `set_lam` takes one
      with the same patterns, and the metric ``penalty`` sums the groups.
    m: the number of training inputs (the training set, not the batch), > 0.
    mask: which leaves are penalized; as for `jaxl2.l2_penalty`.
    param_sharding: where ``train.init`` places the params: a
      `jax.sharding.Sharding` for every leaf, or a pytree of them that is a
      prefix of the params (``NamedSharding(mesh, P("data", None))`` for a
      fully sharded kernel, ``P(None, "model")`` for tensor parallel). Default:
      each leaf keeps the sharding it has (computation follows data).
    batch_sharding: where ``train(state, batch)`` places the batch first, as
      ``param_sharding`` for the ``(inputs, targets)`` tree; typically
      ``NamedSharding(mesh, P("data"))`` for data parallel. Default: the batch
      is used where it is.

  Returns:
    A `TrainStep`: ``state = train.init(params)``, then
    ``state, metrics = train(state, (inputs, targets))`` with metrics
    ``loss``, ``data_loss``, ``penalty`` and ``weight_sq_norm`` at the
    incoming params. The step compiles once; it retraces only if the shapes,
    dtypes or shardings of the state or batch change.

  Sharded training: ``init`` copies the params shard for shard, the optimizer
  state follows them, and the scalars (step, λ, counters) are replicated over
  their mesh; every step returns each state leaf with the sharding ``init``
  gave it (so donation reuses the buffers and nothing recompiles). The penalty adds only all-reduces
  of scalars (each shard's partial sum of squares); its gradient (λ/m)·W is
  elementwise and local to each shard. Meshes with Explicit axes (the
  default of `jax.make_mesh`) need ``with jax.set_mesh(mesh):`` around the
  calls, as any JAX code does.

  Raises:
    TypeError: ``apply_fn``/``loss_fn`` not callable; ``optimizer`` not an optax
      transformation; ``param_sharding``/``batch_sharding`` not Shardings.
    ValueError: ``lam`` or ``m`` invalid; at ``init``/call, a sharding that does
      not match the tree or divide a leaf's shape.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxl2
    >>> train = jaxl2.make_train_step(
    ...   lambda p, x: x @ p["w"], lambda out, y: jnp.mean((out - y) ** 2),
    ...   optax.sgd(0.1), lam=1.0, m=4)
    >>> state = train.init({"w": jnp.ones((2, 1))})
    >>> state, metrics = train(state, (jnp.zeros((4, 2)), jnp.zeros((4, 1))))
    >>> float(metrics["penalty"]), state.params["w"][0, 0]  # 1/8 · 2; w ← w − 0.1 · (1/4) · w
    (0.25, Array(0.975, dtype=float32))

    One λ per group of kernels: the state holds a λ_g per pattern.

    >>> train = jaxl2.make_train_step(
    ...   lambda p, x: x @ p["w1"] @ p["w2"], lambda out, y: jnp.mean((out - y) ** 2),
    ...   optax.sgd(0.1), lam={"w1": 1.0, "w2": 4.0}, m=4)
    >>> state = train.init({"w1": jnp.ones((2, 2)), "w2": jnp.ones((2, 1))})
    >>> state, metrics = train(state, (jnp.zeros((4, 2)), jnp.zeros((4, 1))))
    >>> float(metrics["penalty"])  # (1/8)·4 + (4/8)·2
    1.5

    Data parallel over every device (one here; the same code on eight):

    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> with jax.set_mesh(mesh):
    ...   train = jaxl2.make_train_step(
    ...     lambda p, x: x @ p["w"], lambda out, y: jnp.mean((out - y) ** 2), optax.sgd(0.1),
    ...     lam=1.0, m=8, param_sharding=NamedSharding(mesh, P()),
    ...     batch_sharding=NamedSharding(mesh, P("data")))
    ...   state = train.init({"w": jnp.ones((2, 1))})
    ...   state, metrics = train(state, (jnp.zeros((8, 2)), jnp.zeros((8, 1))))
    >>> state.params["w"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 2)
    True
    >>> float(metrics["penalty"])  # 1/16 · 2
    0.125
  """
  if apply_fn is not None:
    check_callable(apply_fn, "apply_fn")
  check_callable(loss_fn, "loss_fn")
  check_optimizer(optimizer)
  check_lam_or_groups(lam)
  check_m(m)
  check_sharding_spec(param_sharding, "param_sharding", "params")
  check_sharding_spec(batch_sharding, "batch_sharding", "batch")
  general = apply_fn is None
  loss_of = model_loss(apply_fn, loss_fn)
  lam = lam_floats(lam)
  step = step_fn(loss_of, optimizer, m, mask, tuple(lam) if is_grouped(lam) else ())
  init = _init_fn(general, optimizer, lam=lam, mask=mask, param_sharding=param_sharding)
  return TrainStep(
    init=init,
    set_lam=_set_lam,
    step_fn=step,
    eval_fn=eval_fn(loss_of),
    _compiled=_compiled(step, batch_sharding),
    apply_fn=apply_fn,
    loss_fn=loss_fn,
    optimizer=optimizer,
    lam=lam,
    m=m,
    mask=mask,
    param_sharding=param_sharding,
    batch_sharding=batch_sharding,
  )


def make_eval_step(
  apply_fn: ApplyFn | TrainStep, loss_fn: LossFn | None = None
) -> Callable[[Any, Any], Metrics]:
  """Builds a jit-compiled ``eval(params, (inputs, targets)) -> {"loss", "accuracy"}``.

  ``loss`` is the data loss alone (no penalty), so train and validation
  losses compare like with like; ``accuracy`` is `jaxl2.accuracy`.

  General form: ``make_eval_step(train)`` with a `TrainStep` built by
  ``make_train_step(None, loss_fn, ...)`` gives ``eval(state, batch)``, which
  calls ``loss_fn`` in eval mode (``key=None``; an NNX module in
  ``model.eval()``, an Equinox module in ``eqx.nn.inference_mode``) with the
  state's running statistics, and returns ``{"loss", **aux}``.

  Example:
    >>> import jax.numpy as jnp, optax, jaxl2
    >>> xent = lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    >>> evaluate = jaxl2.make_eval_step(lambda w, x: x @ w, xent)  # integer labels: a classifier
    >>> metrics = evaluate(jnp.eye(2), (jnp.eye(2), jnp.array([0, 1])))
    >>> {name: round(float(value), 4) for name, value in metrics.items()}
    {'accuracy': 1.0, 'loss': 0.3133}
  """
  if isinstance(apply_fn, TrainStep):
    if apply_fn.apply_fn is not None:
      raise ValueError(
        "`make_eval_step(train)` is for the general form; for `make_train_step(apply_fn, "
        "loss_fn, ...)` call `make_eval_step(apply_fn, loss_fn)`."
      )
    return jax.jit(apply_fn.eval_fn)
  if loss_fn is None:
    raise TypeError("`make_eval_step(apply_fn, loss_fn)` needs `loss_fn`.")
  return jax.jit(output_metrics(apply_fn, loss_fn, lambda o, y: {"accuracy": accuracy(o, y)}))
