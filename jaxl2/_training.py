"""`make_train_step` and `make_eval_step`: a jit-compiled L2-regularized training step.

λ is part of the state (data, not a compile-time constant), so a new λ needs
no recompilation and `jaxl2.sweep` can `jax.vmap` the same step over many λ.

Sharded training is JAX's own SPMD: place the params (and batch) on a
`jax.sharding.Mesh` and the step follows them. `TrainStep` only makes sure the
placement survives: ``init`` keeps (or applies) the params' shardings and
replicates the state's scalars over their mesh, and each compiled step returns
every state leaf with the sharding it came in with, so the donated buffers are
reused and the step compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxl2._checks import check_callable, check_lam, check_m, check_optimizer
from jaxl2._dtypes import accumulation_dtype
from jaxl2._masks import MaskSpec, resolve
from jaxl2._models import split_model
from jaxl2._paths import path_str
from jaxl2._penalties import weight_sq_norm
from jaxl2._setup import l2_from_sq_norm

__all__ = ["TrainState", "TrainStep", "accuracy", "make_eval_step", "make_train_step"]

ApplyFn = Callable[[Any, Any], Any]
LossFn = Callable[[Any, Any], jax.Array]
Batch = tuple[Any, Any]
# A `jax.sharding.Sharding`, or a pytree of them that is a prefix of the tree it places.
ShardingSpec = Any


class TrainState(NamedTuple):
  """Everything a training step carries; a pytree, so it checkpoints as is.

  Attributes:
    params: the model parameters (for an NNX module, its ``nnx.Param`` state;
      for an Equinox module, its floating arrays).
    opt_state: the optax optimizer state.
    step: number of steps taken (int32).
    lam: λ, a 0-d array in the penalty's accumulation dtype (float32, or
      float64 for float64 params with 64-bit enabled). Change it with
      `TrainStep.set_lam`.
    model_state: what the model carries and updates besides its params
      (linen ``batch_stats``, Haiku state, an NNX module's BatchStat and RNG
      Variables, an ``eqx.nn.State``); ``None`` in the simple form.
    key: the PRNG key the step's dropout keys derive from,
      ``fold_in(key, step)`` (general form; ``None`` in the simple form).
  """

  params: Any
  opt_state: Any
  step: jax.Array
  lam: jax.Array
  model_state: Any = None
  key: Any = None


def _as_lam(lam: Any, dtype: Any) -> jax.Array:
  check_lam(lam)
  # A fresh buffer each time: the state is donated, and a shared λ array would
  # be deleted by the first step that consumed it.
  return jnp.array(lam, dtype, copy=True)


def _check_sharding_spec(spec: ShardingSpec, name: str, what: str) -> None:
  """``spec`` is None, a `Sharding`, or a non-empty pytree of them."""
  if spec is None:
    return
  leaves = jax.tree_util.tree_leaves(spec)
  bad = [x for x in leaves if not isinstance(x, Sharding)]
  if not leaves or bad:
    got = repr(bad[0]) if bad else f"{spec!r}, which holds no sharding"
    raise TypeError(
      f"`{name}` must be a jax.sharding.Sharding, or a pytree of them that is a prefix of the "
      f"{what}; got {got}. Wrap a PartitionSpec with its mesh: "
      "`NamedSharding(mesh, P('data'))`."
    )


def _broadcast(spec: ShardingSpec, tree: Any, name: str, what: str) -> list[Sharding]:
  """One sharding per leaf of ``tree`` from the prefix pytree ``spec``."""
  try:
    full = jax.tree_util.tree_map(
      lambda s, sub: jax.tree_util.tree_map(lambda _: s, sub), spec, tree
    )
  except ValueError as err:
    raise ValueError(
      f"`{name}` must be a Sharding or a pytree prefix of the {what}; its structure "
      f"{jax.tree_util.tree_structure(spec)} does not match that of the {what}, "
      f"{jax.tree_util.tree_structure(tree)}."
    ) from err
  return jax.tree_util.tree_leaves(full)


def _place(tree: Any, spec: ShardingSpec, name: str, what: str, *, copy: bool) -> Any:
  """``tree`` put onto the shardings in ``spec``, naming the leaf that does not fit.

  ``copy=True`` copies even a leaf that is already there (``init``: the state
  is donated, the caller's arrays must stay valid).
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for (key_path, leaf), sharding in zip(with_path, _broadcast(spec, tree, name, what), strict=True):
    try:
      # `may_alias=False` alone still let a replicated placement reuse the caller's buffer
      # for one of its shards (seen on 8 CPU devices), and donation then deleted it.
      source = jnp.array(leaf, copy=True) if copy and isinstance(leaf, jax.Array) else leaf
      out.append(jax.device_put(source, sharding, may_alias=False if copy else None))
    except ValueError as err:
      raise ValueError(
        f"`{name}` does not fit the {what} leaf at '{path_str(key_path)}' of shape "
        f"{tuple(getattr(leaf, 'shape', ()))}: the spec may name at most as many dimensions "
        f"as the leaf has, and each sharded dimension must be a multiple of the number of "
        f"devices along its mesh axes; got {sharding}. JAX says: {err}"
      ) from err
  return jax.tree_util.tree_unflatten(treedef, out)


def _mesh_of(tree: Any) -> Mesh | None:
  """The mesh of the first leaf of ``tree`` that is spread over several devices."""
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
      return sharding.mesh
  return None


def _replicate_over(tree: Any, mesh: Mesh) -> Any:
  """Array leaves not already on ``mesh``'s devices (step, λ, optimizer counters) replicated there.

  Left on one device, they would come back from the first step replicated,
  and the second step would compile again for the new input shardings.
  """
  replicated = NamedSharding(mesh, P())
  devices = set(mesh.devices.flat)

  def put(x: Any) -> Any:
    if isinstance(x, jax.Array) and x.sharding.device_set != devices:
      # Through the host: with several processes a global sharding is filled
      # from a NumPy value that every process holds, not from a local array.
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a PRNG key: its raw bits
        data = jax.device_put(np.asarray(jax.random.key_data(x)), replicated)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
      return jax.device_put(np.asarray(x), replicated)
    return x

  return jax.tree_util.tree_map(put, tree)


def _layout(state: Any) -> tuple[Any, tuple[Sharding | None, ...]] | None:
  """The state's treedef and per-leaf shardings, or None when it lives on one device.

  Single-device leaves map to None (XLA places their outputs); so do leaves
  that are not `jax.Array`s. Runs on every step: cheap checks first.
  """
  leaves, treedef = jax.tree_util.tree_flatten(state)
  shardings = [x.sharding if isinstance(x, jax.Array) else None for x in leaves]
  spread = [
    s
    if s is not None and not isinstance(s, SingleDeviceSharding) and len(s.device_set) > 1
    else None
    for s in shardings
  ]
  return (treedef, tuple(spread)) if any(s is not None for s in spread) else None


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
    param_sharding: ShardingSpec = None,
    batch_sharding: ShardingSpec = None,
  ) -> None:
    if apply_fn is not None:
      check_callable(apply_fn, "apply_fn")
    check_callable(loss_fn, "loss_fn")
    check_optimizer(optimizer)
    self.apply_fn, self.loss_fn, self.optimizer = apply_fn, loss_fn, optimizer
    # The general form's loss, set by `init` once it has seen the model (an
    # NNX module's graph, an Equinox module's static fields).
    self._model_loss: Any = None
    check_lam(lam)
    check_m(m)
    self.lam = float(lam)
    self.m, self.mask = m, mask
    _check_sharding_spec(param_sharding, "param_sharding", "params")
    _check_sharding_spec(batch_sharding, "batch_sharding", "batch")
    self.param_sharding, self.batch_sharding = param_sharding, batch_sharding
    # Donating the state lets XLA update params and optimizer state in place.
    self._compiled = jax.jit(self.step_fn, donate_argnums=0)
    # One program per layout of a sharded state, with its shardings as the
    # output shardings: left to XLA's propagation an output can come back in
    # another layout (or another spelling of the same one) than it came in,
    # and the next step would compile again and could not reuse the buffers.
    self._sharded: dict[Any, Callable[..., Any]] = {}

  def init(
    self, params: Any, model_state: Any = None, *, lam: Any = None, seed: int = 0
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
      lam: overrides the λ given to `make_train_step`.
      seed: general form: the seed of the state's PRNG key, from which each
        step's dropout key is ``fold_in(key, step)``.

    When the params are spread over a mesh, the optimizer state follows them
    (optax builds it with ``zeros_like``) and the state's scalars (step, λ,
    optimizer counters) are replicated over that mesh.

    Raises:
      ValueError: the mask selects nothing; ``param_sharding`` does not match
        the params' structure or does not divide a leaf's shape.
    """
    key = None
    if self.apply_fn is None:
      split = split_model(self.loss_fn, params, model_state)
      self._model_loss = split.loss
      params, model_state = split.params, split.model_state
      key = jax.random.key(seed)
      model_state = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), model_state)
    elif model_state is not None:
      raise ValueError(
        "`model_state` is for the general form (`make_train_step(None, loss_fn, ...)`); the "
        "simple form `apply_fn(params, inputs)` has no model state."
      )
    selection = resolve(params, self.mask)
    if self.param_sharding is not None:
      params = _place(params, self.param_sharding, "param_sharding", "params", copy=True)
    else:
      # Copied because the state is donated: the caller's arrays stay valid.
      params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
    state = TrainState(
      params=params,
      opt_state=self.optimizer.init(params),
      step=jnp.zeros([], jnp.int32),
      lam=_as_lam(
        self.lam if lam is None else lam,
        accumulation_dtype(leaf.value for leaf, _ in selection.selected),
      ),
      model_state=model_state,
      key=key,
    )
    mesh = _mesh_of(params)
    return state if mesh is None else _replicate_over(state, mesh)

  def set_lam(self, state: TrainState, lam: Any) -> TrainState:
    """``state`` with a new λ (checked); the next step reuses the compiled program.

    The new λ is placed like the old one (replicated over a sharded state's mesh).
    """
    new = _as_lam(lam, state.lam.dtype)
    old = getattr(state.lam, "sharding", None)
    if old is not None and len(old.device_set) > 1:
      new = jax.device_put(np.asarray(new), old)  # as `init` placed it (see _replicate_over)
    return state._replace(lam=new)

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

  def model_objective(
    self, params: Any, lam: Any, model_state: Any, key: Any, batch: Any
  ) -> tuple[jax.Array, tuple[dict[str, Any], Any]]:
    """General form: data loss + (λ/2m)·Σ c·‖W‖², metrics (aux included), the new model state."""
    if self._model_loss is None:
      raise ValueError("call `train.init(model, ...)` before the first step: it splits the model.")
    data_loss, (new_model_state, aux) = self._model_loss(params, model_state, batch, key)
    sq_norm = weight_sq_norm(params, mask=self.mask)
    penalty = l2_from_sq_norm(sq_norm, lam, self.m)
    loss = data_loss + penalty
    metrics = {"loss": loss, "data_loss": data_loss, "penalty": penalty, "weight_sq_norm": sq_norm}
    return loss, ({**aux, **metrics}, new_model_state)

  def step_fn(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    """One step, uncompiled. Metrics are evaluated at the incoming params."""
    model_state = state.model_state
    if self.apply_fn is None:
      key = jax.random.fold_in(state.key, state.step)
      grads, (metrics, model_state) = jax.grad(self.model_objective, has_aux=True)(
        state.params, state.lam, state.model_state, key, batch
      )
    else:
      grads, metrics = jax.grad(self.objective, has_aux=True)(state.params, state.lam, batch)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(
      params, opt_state, optax.safe_increment(state.step), state.lam, model_state, state.key
    )
    return new_state, metrics

  def eval_fn(self, state: TrainState, batch: Any) -> dict[str, jax.Array]:
    """General form, uncompiled: the data loss and aux metrics in eval mode (key None).

    The model state is used (running statistics), not updated; no penalty.
    """
    data_loss, (_, aux) = self._model_loss(state.params, state.model_state, batch, None)
    return {**aux, "loss": data_loss}

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
    """One compiled step. ``state`` is donated: use the returned state afterwards.

    The returned state has the shardings of ``state``, leaf for leaf. With
    ``batch_sharding`` the batch is first placed there by `jax.device_put`
    (a no-op for a batch already there; a host batch is split across the
    devices, not copied whole to each).

    Raises:
      ValueError: ``batch_sharding`` does not fit the batch.
    """
    if self.batch_sharding is not None:
      batch = _place(batch, self.batch_sharding, "batch_sharding", "batch", copy=False)
    layout = _layout(state)
    if layout is None:
      return self._compiled(state, batch)
    compiled = self._sharded.get(layout)
    if compiled is None:
      treedef, shardings = layout
      # None leaves of out_shardings are left to XLA (the metrics, single-device leaves).
      out = (jax.tree_util.tree_unflatten(treedef, shardings), None)
      compiled = jax.jit(self.step_fn, donate_argnums=0, out_shardings=out)
      self._sharded[layout] = compiled
    return compiled(state, batch)


def make_train_step(
  apply_fn: ApplyFn,
  loss_fn: LossFn,
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
  their mesh; every step returns each state leaf with the sharding it came in
  with (so donation reuses the buffers). The penalty adds only all-reduces
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
  return TrainStep(
    apply_fn,
    loss_fn,
    optimizer,
    lam=lam,
    m=m,
    mask=mask,
    param_sharding=param_sharding,
    batch_sharding=batch_sharding,
  )


def accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Classification accuracy, decided from shapes (static, so safe under jit).

  Multi-class ``outputs`` (..., K) with K > 1 are compared by argmax with
  one-hot ``targets`` of the same shape (..., K), or else with class labels
  of shape (...) or (..., 1). A single logit (..., 1) or (...,) is
  thresholded at 0 against 0/1 targets.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> logits = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    >>> jaxl2.accuracy(logits, jnp.array([[0], [1]])), jaxl2.accuracy(logits, jnp.eye(3)[:2])
    (Array(1., dtype=float32), Array(1., dtype=float32))
  """
  if outputs.ndim and outputs.shape[-1] > 1:
    predicted = jnp.argmax(outputs, axis=-1)
    if targets.shape == outputs.shape:
      labels = jnp.argmax(targets, axis=-1)
    else:
      labels = targets.reshape(predicted.shape)
  else:
    predicted = (outputs > 0).reshape(targets.shape)
    labels = targets.astype(bool)
  return jnp.mean((predicted == labels).astype(jnp.float32))


def make_eval_step(
  apply_fn: ApplyFn | TrainStep, loss_fn: LossFn | None = None
) -> Callable[[Any, Any], dict[str, jax.Array]]:
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
    >>> evaluate = jaxl2.make_eval_step(lambda p, x: x @ p, lambda o, y: jnp.mean((o - y) ** 2))
    >>> evaluate(jnp.eye(2), (jnp.eye(2), jnp.array([0, 1])))["accuracy"]
    Array(1., dtype=float32)
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

  @jax.jit
  def evaluate(params: Any, batch: Batch) -> dict[str, jax.Array]:
    inputs, targets = batch
    outputs = apply_fn(params, inputs)
    return {"loss": loss_fn(outputs, targets), "accuracy": accuracy(outputs, targets)}

  return evaluate
