"""What tests/test_multiprocess.py runs on 2 processes × 4 devices and on 1 process × 8.

Each group is one function that `tests.multiprocess.run` calls in every
process; it runs its cases in order and returns ``{case: result}`` as JSON.
The code is the same on one host and on several, as a user's would be: one
mesh over `jax.devices()`, params placed with ``jax.device_put(host_params,
NamedSharding(mesh, spec))``, batches built from each process's own rows
with `jax.make_array_from_process_local_data`. A case that raises records
``{"error": "Type: message"}`` instead, so that one failure does not hide the
others (and the errors a multi-host run must give can be compared).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxl2

LAM, M = 0.3, 200.0
BATCH = 32  # rows of the global batch: 8 per device along "data"


# ---- running cases ------------------------------------------------------------------


def run_cases(cases: dict[str, Callable[[], Any]]) -> dict[str, Any]:
  """Every case's JSON result, or its error; progress on stderr (a timeout report shows it)."""
  out = {}
  for name, case in cases.items():
    start = time.perf_counter()
    print(f"case {name}", file=sys.stderr, flush=True)
    try:
      out[name] = case()
    except Exception as err:
      traceback.print_exc()
      out[name] = {"error": f"{type(err).__name__}: {err}"}
    print(f"  {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
  return out


def host(tree: Any) -> Any:
  """A pytree of arrays as nested lists, the same in every process (global arrays gathered)."""

  def read(x: Any) -> Any:
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(x)
    return x.astype(np.float64).tolist() if jnp.issubdtype(x.dtype, jnp.floating) else x.tolist()

  return jax.tree_util.tree_map(read, tree)


def mesh(mode: str = "Auto", shape: tuple[int, ...] = (8,)) -> jax.sharding.Mesh:
  names = ("data", "model")[: len(shape)]
  return jax.make_mesh(shape, names, axis_types=(AxisType[mode],) * len(shape))


def global_batch(arrays: Any, mesh_: jax.sharding.Mesh) -> Any:
  """The global batch from this process's rows (all of them on one process)."""
  n, i = jax.process_count(), jax.process_index()
  sharding = NamedSharding(mesh_, P("data"))
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, x[i * len(x) // n : (i + 1) * len(x) // n]
    ),
    arrays,
  )


# ---- params ---------------------------------------------------------------------------


def host_params(seed: int = 0) -> dict[str, Any]:
  """A small network in NumPy, the same in every process: kernels, a zero bias, a norm scale,
  a bfloat16 kernel and an integer counter."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: (rng.normal(size=s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
  return {
    "conv": {"kernel": normal(3, 3, 4, 8)},
    "dense": {"kernel": normal(16, 8), "bias": np.zeros(8, np.float32)},
    "head": {"kernel": normal(8, 16).astype(jnp.bfloat16), "bias": normal(16)},
    "norm": {"scale": np.ones(8, np.float32)},
    "step": np.int32(3),
  }


# Kernels split along a dimension of 8 or 16 (over all devices); the rest replicated.
FSDP = {
  "conv": {"kernel": P(None, None, None, "data")},
  "dense": {"kernel": P("data", None), "bias": P()},
  "head": {"kernel": P(None, "data"), "bias": P()},
  "norm": {"scale": P()},
  "step": P(),
}


def placed(tree: Any, layout: str) -> tuple[Any, jax.sharding.Mesh]:
  """``tree`` on a mesh of every device: "replicated", "fsdp" (Auto axes), "fsdp_explicit"."""
  mode = "Explicit" if layout.endswith("explicit") else "Auto"
  mesh_ = mesh(mode)
  specs = {k: FSDP[k] if layout.startswith("fsdp") else P() for k in tree}
  shardings = jax.tree_util.tree_map(
    lambda s: NamedSharding(mesh_, s), specs, is_leaf=lambda x: isinstance(x, P)
  )
  return jax.device_put(tree, shardings), mesh_


# ---- describe and the verify checks ----------------------------------------------------


def description(d: jaxl2.Description) -> dict[str, Any]:
  rows = [
    {"path": r.path, "shape": list(r.shape), "dtype": r.dtype, "size": r.size,
     "selected": r.selected, "multiplier": r.multiplier, "sq_norm": r.sq_norm, "why": r.why}
    for r in d.rows
  ]  # fmt: skip
  totals = [d.n_selected, d.params_selected, d.params_total, d.weighted_sq_norm, d.penalty]
  return {"rows": rows, "totals": totals, "text": str(d)}


def report(r: jaxl2.VerifyReport) -> dict[str, Any]:
  rows = [
    {"path": row.path, "status": row.status, "intended": row.intended, "found": row.found,
     "factor": row.factor, "misfit": row.misfit, "note": row.note}
    for row in r.rows
  ]  # fmt: skip
  return {"rows": rows, "verdict": r.verdict, "ok": r.ok, "text": str(r)}


def _whole(w: jax.Array) -> jax.Array:
  # With Explicit axes a model says how a sharded contraction is done: here, as FSDP does, by
  # gathering the weight for the matmul (jaxl2 itself never gathers).
  return jax.sharding.reshard(w, P()) if any(jax.typeof(w).sharding.spec) else w


def _apply(p: Any, x: jax.Array) -> jax.Array:
  h = jax.nn.relu(x @ _whole(p["dense"]["kernel"]) + p["dense"]["bias"]) * p["norm"]["scale"]
  return h @ _whole(p["head"]["kernel"]).astype(jnp.float32) + p["head"]["bias"]


def _data() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(1)
  return (
    rng.normal(size=(BATCH, 16)).astype(np.float32),
    rng.normal(size=(BATCH, 16)).astype(np.float32),
  )


def _kernels(p: Any) -> list[jax.Array]:
  return [p["conv"]["kernel"], p["dense"]["kernel"], p["head"]["kernel"]]


def _losses(x: Any, y: Any) -> dict[str, Callable[[Any, Any], Any]]:
  """A correct regularized loss, and one penalizing every leaf with λ/m (two bugs)."""

  def data_loss(p: Any) -> jax.Array:
    return jnp.mean((_apply(p, x) - y) ** 2)

  def right(p: Any, lam: Any) -> jax.Array:
    sq = sum(jnp.sum(k.astype(jnp.float32) ** 2) for k in _kernels(p))
    return data_loss(p) + lam / (2 * M) * sq

  def wrong(p: Any, lam: Any) -> jax.Array:
    leaves = [w for w in jax.tree_util.tree_leaves(p) if jnp.issubdtype(w.dtype, jnp.floating)]
    return data_loss(p) + lam / M * sum(jnp.sum(w.astype(jnp.float32) ** 2) for w in leaves)

  return {"right": right, "wrong": wrong}


def _optimizers() -> dict[str, tuple[Any, Any]]:
  """(tx, base_tx): coupled L2 through Adam (right), and decoupled decay on every leaf."""
  wd = jaxl2.to_weight_decay(LAM, M)
  return {
    "coupled_adam": (optax.chain(jaxl2.add_l2_grad(LAM, M), optax.adam(1e-3)), optax.adam(1e-3)),
    "adamw_unmasked": (optax.adamw(1e-3, weight_decay=wd), optax.adam(1e-3)),
  }


def _report_cases(layout: str) -> dict[str, Callable[[], Any]]:
  """describe and the checks on one layout: every check on FSDP kernels (Auto axes), the
  right loss and optimizer (and the wrong loss) on the others."""
  params, mesh_ = placed(host_params(), layout)
  x, y = _data()
  losses = _losses(x, y)  # closes over NumPy data, the same in every process
  optimizers = _optimizers()
  if layout != "fsdp":
    del optimizers["adamw_unmasked"]
  cases: dict[str, Callable[[], Any]] = {
    f"describe {layout}": lambda: description(jaxl2.describe(params, lam=LAM, m=M)),
    f"describe by_regex {layout}": lambda: description(
      jaxl2.describe(params, mask=jaxl2.by_regex({"head/.*": 0.5, ".*kernel": 1.0}))
    ),
  }
  for name, loss in losses.items():
    cases[f"verify_penalty {name} {layout}"] = lambda loss=loss: report(
      _in_mesh(mesh_, lambda: jaxl2.verify_penalty(loss, params, LAM, M, batch_size=BATCH))
    )
  for name, (tx, base) in optimizers.items():
    cases[f"verify_update {name} {layout}"] = lambda tx=tx, base=base: report(
      jaxl2.verify_update(tx, base, params, LAM, M)
    )
  if layout == "fsdp":  # the compared step's gradients as NumPy, placed as the params
    tx, base = optimizers["coupled_adam"]
    cases[f"verify_update numpy grads {layout}"] = lambda: report(
      jaxl2.verify_update(tx, base, params, LAM, M, grads=host_params(seed=5))
    )
  return cases


def _rounding_cases() -> dict[str, Callable[[], Any]]:
  """A bf16 kernel whose SGD decay is below half an ulp: "rounds-away" on any number of hosts."""
  rng = np.random.default_rng(2)
  tree = {"w": rng.normal(size=(16, 8)).astype(jnp.bfloat16), "b": np.ones(8, np.float32)}
  mesh_ = mesh()
  params = jax.device_put(
    tree, {"w": NamedSharding(mesh_, P("data", None)), "b": NamedSharding(mesh_, P())}
  )
  wd = jaxl2.to_weight_decay(LAM, M)
  tx = optax.chain(optax.add_decayed_weights(wd, mask={"w": True, "b": False}), optax.sgd(1e-3))
  return {
    "verify_update rounds away": lambda: report(
      jaxl2.verify_update(tx, optax.sgd(1e-3), params, LAM, M)
    )
  }


def reports() -> dict[str, Any]:
  """describe, verify_penalty and verify_update on replicated and FSDP params."""
  cases = {}
  for layout in ("replicated", "fsdp", "fsdp_explicit"):
    cases.update(_report_cases(layout))
  cases.update(_rounding_cases())
  cases.update(_error_cases())
  return run_cases(cases)


# ---- penalties, their gradients, the optax transforms -----------------------------------


def _values(tree: Any) -> list[Any]:
  """A pytree's leaves as lists (any container: NNX State, Equinox modules)."""
  return [host(x) for x in jax.tree_util.tree_leaves(tree)]


def _floating(tree: Any) -> Any:
  """The floating leaves of ``host_params`` (the counter dropped: optax updates floats)."""
  return {k: v for k, v in tree.items() if k != "step"}


def _penalty_cases(layout: str) -> dict[str, Callable[[], Any]]:
  """Each penalty and gradient, eager and jitted; global arrays are arguments, never closed over
  (a compiled function cannot capture an array that spans processes)."""
  params, mesh_ = placed(_floating(host_params()), layout)
  anchor, _ = placed(_floating(host_params(seed=3)), layout)
  batch = tuple(global_batch(a, mesh_) for a in _data())

  def mse(p: Any, x: Any, y: Any) -> jax.Array:
    return jnp.mean((_apply(p, x) - y) ** 2)

  # fn(params, anchor, batch)
  penalties = {
    "l2_penalty": lambda p, a, b: jaxl2.l2_penalty(p, LAM, M),
    "weight_sq_norm": lambda p, a, b: jaxl2.weight_sq_norm(p, mask=jaxl2.all_floating),
    "l1_penalty": lambda p, a, b: jaxl2.l1_penalty(p, LAM, M),
    "elastic_net_penalty": lambda p, a, b: jaxl2.elastic_net_penalty(p, LAM, M, l1_ratio=0.3),
    "l2_sp_penalty": lambda p, a, b: jaxl2.l2_sp_penalty(p, a, LAM, M),
    "regularized": lambda p, a, b: jaxl2.regularized(mse, LAM, M)(p, *b),
  }
  grads = {
    "l2_penalty_grad": lambda p, a, b: jaxl2.l2_penalty_grad(p, LAM, M),
    "l1_penalty_grad": lambda p, a, b: jaxl2.l1_penalty_grad(p, LAM, M),
    "elastic_net_penalty_grad": lambda p, a, b: jaxl2.elastic_net_penalty_grad(
      p, LAM, M, l1_ratio=0.3
    ),
    "l2_sp_penalty_grad": lambda p, a, b: jaxl2.l2_sp_penalty_grad(p, a, LAM, M),
  }
  grads |= {f"jax.grad({k})": jax.grad(penalties[k]) for k in ("l2_penalty", "regularized")}

  eager = {"l2_penalty", "l2_penalty_grad", "jax.grad(l2_penalty)"}  # op by op: slow to compile

  def run(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    with jax.set_mesh(mesh_):
      args = (params, anchor, batch)
      out = {"jit": _values(jax.jit(fn)(*args))}
      return out | ({"eager": _values(fn(*args))} if name in eager else {})

  functions = {**penalties, **grads}
  cases = {f"{name} {layout}": lambda n=name, f=fn: run(n, f) for name, fn in functions.items()}
  cases[f"transforms {layout}"] = lambda: _transform_steps(params, anchor, mesh_)
  return cases


def _transform_steps(params: Any, anchor: Any, mesh_: jax.sharding.Mesh) -> dict[str, Any]:
  """Three jitted steps of `add_l2_grad` (constant λ and a schedule) and `l2_sp_grad` chains."""
  grads = jax.tree_util.tree_map(lambda w: jnp.cos(w.astype(jnp.float32)).astype(w.dtype), params)
  chains = {
    "add_l2_grad sgd": optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(0.1)),
    "add_l2_grad schedule adam": optax.chain(
      jaxl2.add_l2_grad(optax.linear_schedule(0.0, LAM, 2), M), optax.adam(1e-2)
    ),
    "l2_sp_grad sgd": optax.chain(jaxl2.l2_sp_grad(anchor, LAM, M), optax.sgd(0.1)),
  }
  out = {}
  for name, tx in chains.items():

    @jax.jit
    def step(p, s, g, tx=tx):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    try:
      with jax.set_mesh(mesh_):
        p, s = params, tx.init(params)
        for _ in range(3):
          p, s = step(p, s, grads)
      out[name] = _values(p)
    except Exception as err:
      out[name] = {"error": f"{type(err).__name__}: {err}"}
  return out


def penalties() -> dict[str, Any]:
  """The penalties, their gradients (eager and jitted) and the optax transforms."""
  cases = {}
  for layout in ("replicated", "fsdp", "fsdp_explicit"):
    cases.update(_penalty_cases(layout))
  return run_cases(cases)


# ---- training: make_train_step in every form, make_eval_step ---------------------------

STEPS, CLASSES = 5, 8


def _classification() -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
  """An MLP's host params and the global batch (inputs, integer labels)."""
  rng = np.random.default_rng(7)
  params = {
    "dense": {"kernel": (rng.normal(size=(16, 32)) / 4).astype(np.float32),
              "bias": np.zeros(32, np.float32)},
    "head": {"kernel": (rng.normal(size=(32, CLASSES)) / 6).astype(np.float32),
             "bias": np.zeros(CLASSES, np.float32)},
  }  # fmt: skip
  x = rng.normal(size=(BATCH, 16)).astype(np.float32)
  return params, (x, rng.integers(0, CLASSES, size=BATCH).astype(np.int32))


def _mlp(p: Any, x: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ _whole(p["dense"]["kernel"]) + p["dense"]["bias"])
  return h @ _whole(p["head"]["kernel"]) + p["head"]["bias"]


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _kernel_spec(x: Any, layout: str) -> P:
  """FSDP: a kernel's rows split over every device; anything else replicated."""
  return (
    P("data", *([None] * (np.ndim(x) - 1))) if layout != "replicated" and np.ndim(x) == 2 else P()
  )


def _shardings(tree: Any, layout: str, mesh_: jax.sharding.Mesh) -> Any:
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh_, _kernel_spec(x, layout)), tree)


def _train(train: jaxl2.TrainStep, state: jaxl2.TrainState, batch: Any) -> dict[str, Any]:
  """STEPS steps, λ doubled, one more; the metrics of each step and the final state."""
  metrics = []
  for i in range(STEPS + 1):
    if i == STEPS:
      state = train.set_lam(state, 2 * LAM)
    state, m = train(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
  out = {"metrics": metrics, "params": _values(state.params), "step": int(state.step)}
  return out | {"model_state": _values(state.model_state), "state": state}


def _simple_cases(layout: str) -> dict[str, Callable[[], Any]]:
  host_p, (x, y) = _classification()
  mesh_ = mesh("Explicit" if layout.endswith("explicit") else "Auto")
  shardings = _shardings(host_p, layout, mesh_)
  batch = global_batch((x, y), mesh_)
  tx = optax.adam(1e-2)

  def given() -> dict[str, Any]:  # param_sharding: init places the host params
    train = jaxl2.make_train_step(_mlp, _ce, tx, lam=LAM, m=M, param_sharding=shardings)
    out = _train(train, train.init(host_p), batch)
    final = jax.tree.leaves(out.pop("state").params)
    out["layout kept"] = all(
      a.sharding.is_equivalent_to(s, a.ndim)
      for a, s in zip(final, jax.tree.leaves(shardings), strict=True)
    )
    return out

  def inferred() -> dict[str, Any]:  # params already global; a host batch split by batch_sharding
    train = jaxl2.make_train_step(
      _mlp, _ce, tx, lam=LAM, m=M, batch_sharding=NamedSharding(mesh_, P("data"))
    )
    out = _train(train, train.init(jax.device_put(host_p, shardings)), (x, y))
    out.pop("state")
    evaluate = jaxl2.make_eval_step(_mlp, _ce)
    final = jax.device_put(host_p, shardings)
    out["eval"] = {k: float(v) for k, v in evaluate(final, batch).items()}
    hlo = jax.jit(lambda p: jaxl2.l2_penalty(p, LAM, M)).lower(final).compile().as_text()
    out["no all-gather"] = "all-gather" not in hlo
    return out

  with_mesh = lambda fn: lambda: _in_mesh(mesh_, fn)  # noqa: E731
  return {
    f"make_train_step param_sharding {layout}": with_mesh(given),
    f"make_train_step inferred {layout}": with_mesh(inferred),
  }


def _in_mesh(mesh_: jax.sharding.Mesh, fn: Callable[[], Any]) -> Any:
  with jax.set_mesh(mesh_):
    return fn()


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def _general(train: jaxl2.TrainStep, state: jaxl2.TrainState, batch: Any) -> dict[str, Any]:
  """`_train`, then `make_eval_step(train)` on the final state."""
  out = _train(train, state, batch)
  state = out.pop("state")
  return out | {"eval": {k: float(v) for k, v in jaxl2.make_eval_step(train)(state, batch).items()}}


def _linen(layout: str, mesh_: jax.sharding.Mesh, batch: Any) -> dict[str, Any]:
  """Flax linen with BatchNorm (batch_stats carried) and dropout (a key per step)."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      # No bias before BatchNorm: its gradient is 0 up to rounding, which Adam would amplify.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(32, use_bias=False)(x))
      return nn.Dense(CLASSES)(nn.Dropout(0.3, deterministic=not train)(nn.relu(x)))

  model = Net()
  variables = jax.device_get(model.init(jax.random.key(0), np.ones((1, 16)), train=False))

  def loss_fn(params, batch_stats, batch, key):
    train = key is not None
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch[0], train=train,
      mutable=["batch_stats"] if train else [], rngs={"dropout": key} if train else {},
    )  # fmt: skip
    stats = updates["batch_stats"] if train else batch_stats
    return _ce(logits, batch[1]), (stats, {"accuracy": _accuracy(logits, batch[1])})

  train = jaxl2.make_train_step(None, loss_fn, optax.adam(1e-2), lam=LAM, m=M)
  params = jax.device_put(variables["params"], _shardings(variables["params"], layout, mesh_))
  stats = jax.device_put(variables["batch_stats"], NamedSharding(mesh_, P()))
  return _general(train, train.init(params, stats, seed=3), batch)


def _nnx(layout: str, mesh_: jax.sharding.Mesh, batch: Any) -> dict[str, Any]:
  """A Flax NNX module as it is (BatchNorm, Dropout), placed by `param_sharding`."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.dense = nnx.Linear(16, 32, use_bias=False, rngs=rngs)  # no bias before BatchNorm
      self.bn = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
      self.dropout = nnx.Dropout(0.3, rngs=rngs)
      self.head = nnx.Linear(32, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.head(self.dropout(nnx.relu(self.bn(self.dense(x)))))

  def loss_fn(model, batch):
    logits = model(batch[0])
    return _ce(logits, batch[1]), {"accuracy": _accuracy(logits, batch[1])}

  model = Net(nnx.Rngs(0, dropout=1))
  shardings = _shardings(nnx.state(model, nnx.Param), layout, mesh_)
  train = jaxl2.make_train_step(
    None, loss_fn, optax.adam(1e-2), lam=LAM, m=M, param_sharding=shardings
  )
  return _general(train, train.init(model), batch)


def _equinox(layout: str, mesh_: jax.sharding.Mesh, batch: Any) -> dict[str, Any]:
  """An Equinox module with eqx.nn.State (BatchNorm) and dropout, placed before `init`."""
  import equinox as eqx

  class Net(eqx.Module):
    dense: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    head: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.dense = eqx.nn.Linear(16, 32, use_bias=False, key=k1)  # no bias before BatchNorm
      self.bn = eqx.nn.BatchNorm(32, axis_name="batch", mode="batch", momentum=0.9)
      self.dropout = eqx.nn.Dropout(0.3)
      self.head = eqx.nn.Linear(32, CLASSES, key=k2)

    def __call__(self, x, state, key):
      x, state = self.bn(self.dense(x), state)
      return self.head(self.dropout(jax.nn.relu(x), key=key)), state

  def loss_fn(model, state, batch, key):
    keys = None if key is None else jax.random.split(key, len(batch[1]))
    forward = jax.vmap(model, axis_name="batch", in_axes=(0, None, None if keys is None else 0),
                       out_axes=(0, None))  # fmt: skip
    logits, state = forward(batch[0], state, keys)
    return _ce(logits, batch[1]), (state, {"accuracy": _accuracy(logits, batch[1])})

  model, model_state = eqx.nn.make_with_state(Net)(jax.random.key(0))
  arrays, static = eqx.partition(jax.device_get(model), eqx.is_array)
  model = eqx.combine(jax.device_put(arrays, _shardings(arrays, layout, mesh_)), static)
  train = jaxl2.make_train_step(None, loss_fn, optax.adam(1e-2), lam=LAM, m=M)
  return _general(train, train.init(model, model_state, seed=3), batch)


def training() -> dict[str, Any]:
  """make_train_step's forms, replicated and FSDP, and make_eval_step."""
  cases = {}
  for layout in ("replicated", "fsdp", "fsdp_explicit"):
    cases.update(_simple_cases(layout))
  _, data = _classification()
  for layout in ("replicated", "fsdp"):
    mesh_ = mesh()
    batch = global_batch(data, mesh_)
    for name, form in {"linen": _linen, "nnx": _nnx, "equinox": _equinox}.items():
      cases[f"make_train_step {name} {layout}"] = (
        lambda form=form, layout=layout, mesh_=mesh_, batch=batch: form(layout, mesh_, batch)
      )
  return run_cases(cases)


# ---- what cannot work across processes: clear errors -------------------------------------


def _error_cases() -> dict[str, Callable[[], Any]]:
  """Calls that work on one process and must fail clearly (not hang) on several."""
  params, mesh_ = placed(host_params(), "fsdp")
  x, y = global_batch(_data(), mesh_)  # the global batch: each process holds its rows
  tx, base = _optimizers()["coupled_adam"]
  pinned = jax.device_put(np.full(8, 2.0, np.float32), jax.local_devices()[0])
  preconditioner = jax.tree_util.tree_map(lambda w: w * 0 + 1, params)  # sharded like params

  def loss_on_global_batch(p: Any, lam: Any) -> jax.Array:
    sq = sum(jnp.sum(k.astype(jnp.float32) ** 2) for k in _kernels(p))
    return jnp.mean((_apply(p, x) - y) ** 2) + lam / (2 * M) * sq

  def l2_sp_loss(p: Any, lam: Any) -> jax.Array:  # closes over an anchor sharded like p
    return jnp.mean((_apply(p, x) - y) ** 2) + jaxl2.l2_sp_penalty(p, preconditioner, lam, M)

  def scale_by_closure() -> optax.GradientTransformation:
    def update(updates: Any, state: Any, params: Any = None) -> Any:
      return jax.tree_util.tree_map(
        lambda u, c: u * c.astype(u.dtype), updates, preconditioner
      ), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  closing_tx = optax.chain(jaxl2.add_l2_grad(LAM, M), scale_by_closure(), optax.sgd(0.1))
  pinned_grads = jax.tree_util.tree_map(
    lambda w: jax.device_put(np.ones(w.shape, np.float32), jax.local_devices()[0]),
    _floating(host_params()),
  )
  return {
    "error verify_penalty pinned leaf": lambda: report(
      jaxl2.verify_penalty(_losses(*_data())["right"], dict(params, extra=pinned), LAM, M)
    ),
    # The data term drops out of the check (and out of its program): nothing to capture.
    "verify_penalty loss closing over the global batch": lambda: report(
      jaxl2.verify_penalty(loss_on_global_batch, params, LAM, M)
    ),
    "error verify_penalty loss closes over a global anchor": lambda: report(
      jaxl2.verify_penalty(l2_sp_loss, params, LAM, M)
    ),
    "error verify_update tx closes over a global array": lambda: report(
      jaxl2.verify_update(closing_tx, optax.sgd(0.1), params, LAM, M)
    ),
    "error verify_update pinned grads": lambda: report(
      jaxl2.verify_update(tx, base, _floating(params), LAM, M, grads=pinned_grads)
    ),
    "describe pinned leaf": lambda: description(jaxl2.describe(dict(params, extra=pinned))),
  }


def fails_on_process_1() -> None:
  """Process 1 fails; process 0 then waits for it forever (for the harness's own test)."""
  if jax.process_index() == 1:
    raise RuntimeError("planted failure on process 1")
  multihost_utils.sync_global_devices("never reached by process 1")
