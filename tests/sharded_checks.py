"""Sharded parameters and data-parallel training on 8 devices.

Run by ``tests/test_sharding.py`` in a fresh process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when JAX starts, and the rest of the suite runs on one device). The file
name does not match ``test_*.py``, so a plain ``pytest`` run does not collect
it; run it alone with that variable set.

What is checked, for fully sharded (FSDP), tensor-parallel and mixed layouts,
on meshes of Auto and of Explicit axes:

- the compiled penalties all-reduce scalars only and never gather a weight
  (read from the optimized HLO), and their values equal a float64 reference;
- gradients (analytic, `jax.grad`, `add_l2_grad` updates) keep the params'
  shardings and compile to no collective at all (they are elementwise);
- `make_train_step` keeps every state leaf's sharding, donates, compiles once,
  and 8 devices give the numbers of one device.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxl2
from tests import helpers

N_DEVICES = 8
LAM, M = 0.3, 50.0
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _eight_devices():
  if jax.device_count() != N_DEVICES:
    pytest.fail(
      f"tests/sharded_checks.py needs {N_DEVICES} devices and JAX sees {jax.device_count()}: "
      "run it through tests/test_sharding.py, or with "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES} JAX_PLATFORMS=cpu."
    )


# ---- layouts --------------------------------------------------------------------

# name -> mesh shape, mesh axis names, PartitionSpec per leaf of `_tree()`.
LAYOUTS = {
  # Fully sharded data parallel: every weight split along the one "data" axis.
  "fsdp": (
    (8,),
    ("data",),
    {
      "emb": P("data", None),
      "conv": P(None, None, None, "data"),
      "w": P("data", None),
      "v": P(None, "data"),
      "half": P("data", None),
      "b": P(),
      "rep": P(),
    },
  ),
  # Tensor parallel: column/row-parallel kernels along "model", biases too.
  "tp": (
    (4, 2),
    ("data", "model"),
    {
      "emb": P(None, "model"),
      "conv": P(None, None, None, "model"),
      "w": P(None, "model"),
      "v": P("model", None),
      "half": P(None, "model"),
      "b": P("model"),
      "rep": P(),
    },
  ),
  # Both at once: a kernel split over all 8 devices along two dimensions.
  "fsdp_tp": (
    (4, 2),
    ("data", "model"),
    {
      "emb": P("data", "model"),
      "conv": P(None, None, "data", "model"),
      "w": P(None, "model"),
      "v": P("model", "data"),
      "half": P("data", None),
      "b": P("model"),
      "rep": P(),
    },
  ),
}
MODES = ("Auto", "Explicit")
ALL_LAYOUTS = [(layout, mode) for layout in LAYOUTS for mode in MODES]


def _cases(names_everywhere, names_once):
  """(name, layout, mode): the first names on every layout and mode; the others (which
  share their code path with one of the first) on the mixed layout in both modes."""
  cases = [(n, layout, mode) for n in names_everywhere for layout, mode in ALL_LAYOUTS]
  return cases + [(n, "fsdp_tp", mode) for n in names_once for mode in MODES]


SHAPES = {
  "emb": (64, 16),
  "conv": (3, 3, 8, 16),
  "w": (32, 16),
  "v": (16, 32),
  "half": (32, 8),  # bfloat16: upcast before squaring, on each shard
  "b": (16,),
  "rep": (8, 8),  # replicated: every device holds it, and it still counts once
}


def _mesh(layout: str, mode: str) -> jax.sharding.Mesh:
  shape, names, _ = LAYOUTS[layout]
  return jax.make_mesh(shape, names, axis_types=(AxisType[mode],) * len(names))


def _tree(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    k: rng.normal(size=s).astype(jnp.bfloat16 if k == "half" else np.float32)
    for k, s in SHAPES.items()
  }


def _shardings(layout: str, mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  return {k: NamedSharding(mesh, spec) for k, spec in LAYOUTS[layout][2].items()}


def _sharded_tree(layout: str, mode: str, seed: int = 0):
  mesh = _mesh(layout, mode)
  shardings = _shardings(layout, mesh)
  return mesh, shardings, jax.device_put(_tree(seed), shardings)


# ---- reading the compiled program ----------------------------------------------

_COLLECTIVE = re.compile(
  r"= (?P<type>.+?) (?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
  r"collective-permute|collective-broadcast)(?:-start)?\("
)


def _collectives(fn, *args) -> list[tuple[str, str]]:
  """(op, result type) of every collective in the optimized HLO of ``jax.jit(fn)(*args)``."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return [(m["op"], m["type"]) for m in _COLLECTIVE.finditer(text)]


def _assert_scalar_all_reduces_only(collectives: list[tuple[str, str]]) -> None:
  """At least one all-reduce; every collective an all-reduce of 0-d values (no gather)."""
  ops = {op for op, _ in collectives}
  assert ops == {"all-reduce"}, f"expected scalar all-reduces only; got {collectives}"
  for _, result in collectives:
    shapes = re.findall(r"[a-z]+\d*\[([^\]]*)\]", result)
    assert shapes and all(dims == "" for dims in shapes), f"a non-scalar all-reduce: {result}"


def _same_layout(x: jax.Array, sharding: NamedSharding) -> bool:
  # Equivalent, not `==`: JAX may spell a replicated dimension P(None,) where it was P().
  return x.sharding.is_equivalent_to(sharding, x.ndim)


# ---- the penalties ------------------------------------------------------------------

MULTIPLIERS = jaxl2.by_regex({"emb": 0.5, "conv|w|v|half": 1.0})

PENALTIES = {
  "l2": lambda p: jaxl2.l2_penalty(p, LAM, M),
  "l2_multipliers": lambda p: jaxl2.l2_penalty(p, LAM, M, mask=MULTIPLIERS),
  "weight_sq_norm": lambda p: jaxl2.weight_sq_norm(p, mask=jaxl2.all_floating),
  "l1": lambda p: jaxl2.l1_penalty(p, LAM, M),
  "elastic_net": lambda p: jaxl2.elastic_net_penalty(p, LAM, M, l1_ratio=0.3),
  "l2_sp": lambda p: jaxl2.l2_sp_penalty(p, jax.tree_util.tree_map(jnp.zeros_like, p), LAM, M),
  "value_and_grad": jax.value_and_grad(lambda p: jaxl2.l2_penalty(p, LAM, M)),
}


def _reference(name: str, tree: dict[str, np.ndarray]) -> float:
  """The penalty in float64 with NumPy, from the unsharded leaves."""
  kernels = [(tree[k], 1.0) for k in SHAPES if len(SHAPES[k]) >= 2]
  if name in ("l2", "value_and_grad", "l2_sp"):  # l2_sp with a zero anchor is l2
    return LAM / (2 * M) * sum(helpers.ref_sq_norm(w) for w, _ in kernels)
  if name == "l2_multipliers":
    return (
      LAM
      / (2 * M)
      * sum(
        (0.5 if k == "emb" else 1.0) * helpers.ref_sq_norm(tree[k])
        for k in SHAPES
        if k not in ("b", "rep")
      )
    )
  if name == "weight_sq_norm":
    return sum(helpers.ref_sq_norm(w) for w in tree.values())
  if name == "l1":
    return helpers.ref_l1(kernels, LAM, M)
  return helpers.ref_elastic_net(kernels, LAM, M, 0.3)


@pytest.mark.parametrize(
  ("name", "layout", "mode"),
  _cases(
    ["l2", "value_and_grad"], ["l2_multipliers", "weight_sq_norm", "l1", "elastic_net", "l2_sp"]
  ),
)
def test_penalty_reduces_locally_and_all_reduces_scalars(name, layout, mode):
  mesh, _, params = _sharded_tree(layout, mode)
  fn = PENALTIES[name]
  with jax.set_mesh(mesh):
    collectives = _collectives(fn, params)
    out = jax.jit(fn)(params)
  value = out[0] if isinstance(out, tuple) else out  # value_and_grad: (value, grads)
  _assert_scalar_all_reduces_only(collectives)
  # float32 partial sums per shard, combined in another order than one device would:
  # a few ulps of float32 over ~5000 terms; 1e-5 relative to the float64 reference.
  np.testing.assert_allclose(float(value), _reference(name, _tree()), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_many_small_leaves_are_not_gathered_either(mode):
  # Many small leaves of one shape, and a few of rare shapes, in layouts no single
  # tiling refines locally (P("data") vs P("model") on one dimension; transposed 2-d
  # tiles): a reduction that summed, stacked or concatenated leaves across the tree
  # would move them between devices (XLA: all-gather, all-to-all, collective-permute).
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType[mode],) * 2)
  specs = [P("data", None), P("model", None), P("data", "model"), P("model", "data"), P()]
  rng = np.random.default_rng(3)
  tree = {f"layer_{i}": rng.normal(size=(16, 8)).astype(np.float32) for i in range(40)}
  tree.update({f"odd_{i}": rng.normal(size=(8, 4 * (i + 1))).astype(np.float32) for i in range(5)})
  shardings = {k: NamedSharding(mesh, specs[i % len(specs)]) for i, k in enumerate(tree)}
  params = jax.device_put(tree, shardings)
  fn = jax.value_and_grad(lambda p: jaxl2.l2_penalty(p, LAM, M))
  with jax.set_mesh(mesh):
    collectives = _collectives(fn, params)
    value, grads = jax.jit(fn)(params)
  _assert_scalar_all_reduces_only(collectives)
  for k, g in grads.items():
    assert _same_layout(g, shardings[k]), (k, g.sharding, shardings[k])
  expected = LAM / (2 * M) * sum(helpers.ref_sq_norm(w) for w in tree.values())
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)  # float32 sums: as above


# ---- many leaves: the one-device plan, made per layout -------------------------------

_REDUCE = re.compile(r"(?<![\w-])reduce\(")  # reduce ops; not reduce-window, not all-reduce
# leaves per group reduction from 256 of one shape on (jaxl2/penalties/_reduce.py, bench/NOTES.md)
GROUP = 32
N_MANY, N_RARE = 1000, 40


def _reductions(fn, *args) -> int:
  """Reduce ops in the optimized HLO of ``jax.jit(fn)(*args)``: one per kernel jaxl2 makes."""
  return len(_REDUCE.findall(jax.jit(fn).lower(*args).compile().as_text()))


def many_leaves_tree(n: int = N_MANY, rare: int = N_RARE, seed: int = 0) -> dict:
  """``n`` kernels of (16, 10) (groups of 32) and ``rare`` of distinct shapes (8, k) (a pool).

  Every first dimension is a multiple of 8, so the tree can also be split over 8 devices.
  """
  rng = np.random.default_rng(seed)
  tree = {f"layer{i:04d}": rng.normal(size=(16, 10)).astype(np.float32) for i in range(n)}
  tree.update(
    {f"odd{k:02d}": rng.normal(size=(8, k)).astype(np.float32) for k in range(1, rare + 1)}
  )
  return tree


def _l2(p):
  return jaxl2.l2_penalty(p, LAM, M)


def _ref_l2(tree: dict) -> float:
  return LAM / (2 * M) * sum(helpers.ref_sq_norm(w) for w in tree.values())


@pytest.mark.parametrize("mode", MODES)
def test_replicated_many_leaves_are_reduced_as_on_one_device(mode):
  # The data-parallel default: every leaf on every device. Reducing each leaf alone (the
  # old multi-device path) makes 1,040 reductions and compiles 10x slower; one device's plan
  # makes ceil(1000 / 32) = 32 group reductions, plus the 40 rare leaves: one pooled
  # reduction when the layout is known (Explicit axes); one each under Auto axes, where a
  # traced leaf's type does not say it is replicated (and concatenating sharded leaves
  # would gather them).
  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(AxisType[mode],))
  tree = many_leaves_tree()
  params = jax.device_put(tree, NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    count = _reductions(_l2, params)
    collectives = _collectives(_l2, params)
    value = jax.jit(_l2)(params)
  pools = 1 if mode == "Explicit" else N_RARE
  assert 0 < count <= -(-N_MANY // GROUP) + pools, count
  assert collectives == []  # replicated: each device sums all of it; nothing moves
  # One device's plan over float32: pairwise sums of ~2*10^5 squares; 1e-6 relative.
  np.testing.assert_allclose(float(value), _ref_l2(tree), rtol=1e-6)


# name -> specs of: 140 kernels (16, 8), alternating between the two given; 140 vectors (8,);
# 6 kernels of distinct shapes (8, 4k). Mesh (4, 2) of ("data", "model").
MANY_LAYOUTS = {
  "replicated": ((P(), P()), P(), P()),
  "fsdp": ((P("data", None), P("data", None)), P(), P("data", None)),
  "tp": ((P(None, "model"), P(None, "model")), P("model"), P(None, "model")),
  # Sharded two ways and replicated kernels of one shape, side by side.
  "fsdp_tp": ((P("data", "model"), P()), P("model"), P("model", None)),
}


@pytest.mark.parametrize(
  ("layout", "mode"), [(lay, mode) for lay in MANY_LAYOUTS for mode in MODES]
)
def test_many_leaves_reduce_per_layout_and_all_reduce_scalars(layout, mode):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType[mode],) * 2)
  (even, odd), vector, rare = MANY_LAYOUTS[layout]
  rng = np.random.default_rng(5)
  tree, specs = {}, {}
  for i in range(140):
    tree[f"kernel{i:03d}"], specs[f"kernel{i:03d}"] = rng.normal(size=(16, 8)), (even, odd)[i % 2]
    tree[f"vector{i:03d}"], specs[f"vector{i:03d}"] = rng.normal(size=(8,)), vector
  for k in range(1, 7):
    tree[f"rare{k}"], specs[f"rare{k}"] = rng.normal(size=(8, 4 * k)), rare
  tree = {key: w.astype(np.float32) for key, w in tree.items()}
  params = jax.device_put(tree, {key: NamedSharding(mesh, s) for key, s in specs.items()})
  fn = lambda p: jaxl2.l2_penalty(p, LAM, M, mask=jaxl2.all_floating)  # noqa: E731
  with jax.set_mesh(mesh):
    collectives = _collectives(fn, params)
    count = _reductions(fn, params)
    value = jax.jit(fn)(params)
  if layout == "replicated":
    assert collectives == []
  else:
    _assert_scalar_all_reduces_only(collectives)
  # Per layout, 140 leaves of one shape make ceil(140 / 16) = 9 groups (two layouts of
  # 70 leaves: 5 each); the 6 rare kernels at most one reduction each. Per leaf: 286.
  assert 0 < count <= 10 + 9 + 1 + 6, count
  # float32 partial sums per shard, combined in another order: 1e-5 relative (as above).
  np.testing.assert_allclose(float(value), _ref_l2(tree), rtol=1e-5)


def device_comparison_values() -> dict[str, float]:
  """``jit(l2_penalty)`` of `many_leaves_tree`, replicated and fully sharded (rows over all
  devices) on meshes of Auto and Explicit axes, and eagerly on replicated arrays; with one
  device, the same calls on the unplaced tree. `tests/test_sharding.py` compares 8 with 1."""
  tree = many_leaves_tree()
  if jax.device_count() == 1:
    jitted, eager = float(jax.jit(_l2)(tree)), float(_l2(tree))
    values = {f"{layout} {mode}": jitted for layout in ("replicated", "fsdp") for mode in MODES}
    return values | {"replicated eager": eager}
  values = {}
  for mode in MODES:
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType[mode],))
    for layout, spec in (("replicated", P()), ("fsdp", P("data", None))):
      params = jax.device_put(tree, NamedSharding(mesh, spec))
      with jax.set_mesh(mesh):
        values[f"{layout} {mode}"] = float(jax.jit(_l2)(params))
      if (layout, mode) == ("replicated", "Auto"):
        values["replicated eager"] = float(_l2(params))
  return values


# ---- gradients --------------------------------------------------------------------

GRADIENTS = {
  "l2_penalty_grad": lambda p: jaxl2.l2_penalty_grad(p, LAM, M),
  "jax.grad(l2_penalty)": jax.grad(lambda p: jaxl2.l2_penalty(p, LAM, M)),
  "l1_penalty_grad": lambda p: jaxl2.l1_penalty_grad(p, LAM, M),
  "elastic_net_penalty_grad": lambda p: jaxl2.elastic_net_penalty_grad(p, LAM, M, l1_ratio=0.3),
  "l2_sp_penalty_grad": lambda p: jaxl2.l2_sp_penalty_grad(
    p, jax.tree_util.tree_map(lambda x: 0.5 * x, p), LAM, M
  ),
}


SELECTED = [k for k, shape in SHAPES.items() if len(shape) >= 2]  # the default mask
UNSELECTED = [k for k in SHAPES if k not in SELECTED]


@pytest.mark.parametrize(
  ("name", "layout", "mode"),
  _cases(
    ["l2_penalty_grad", "jax.grad(l2_penalty)"],
    ["l1_penalty_grad", "elastic_net_penalty_grad", "l2_sp_penalty_grad"],
  ),
)
def test_gradient_keeps_shardings_and_needs_no_communication(name, layout, mode):
  mesh, shardings, params = _sharded_tree(layout, mode)
  fn = GRADIENTS[name]
  with jax.set_mesh(mesh):
    assert _collectives(fn, params) == []  # elementwise: each device its own shard
    compiled, eager = jax.jit(fn)(params), fn(params)
  for grads in (compiled, eager):
    for k in SELECTED:
      assert _same_layout(grads[k], shardings[k]), (k, grads[k].sharding, shardings[k])
  if name != "jax.grad(l2_penalty)":
    # jaxl2's analytic gradients put zeros on unselected leaves, in the leaf's layout.
    # (jax.grad's zeros there are JAX's own, as the penalty never reads those leaves:
    # on Auto axes JAX returns them replicated, jit or eager; so they are not checked,
    # as the sharding guide says.) Auto axes under jit: the test below.
    for k in UNSELECTED:
      assert _same_layout(eager[k], shardings[k]), (k, eager[k].sharding, shardings[k])
      if mode == "Explicit":
        assert _same_layout(compiled[k], shardings[k]), (k, compiled[k].sharding, shardings[k])
  if name in ("l2_penalty_grad", "jax.grad(l2_penalty)"):
    # (λ/m)·W on kernels, 0 on the bias; the kernel "rep" (8, 8) is replicated and
    # selected. Exact up to one rounding of the product: float32, or bfloat16 for "half".
    tree = _tree()
    for k, g in compiled.items():
      expected = LAM / M * helpers.as_f64(tree[k]) if k in SELECTED else 0.0
      rtol = 1e-2 if k == "half" else 1e-6
      np.testing.assert_allclose(helpers.as_f64(g), expected, rtol=rtol, atol=0)


# jaxl2's grad_tree (jaxl2/penalties/_setup.py) builds an unselected leaf's zero gradient as
#   jnp.where(jnp.zeros_like(value, dtype=bool), value, jnp.zeros((), value.dtype)),
# which keeps the leaf's layout and compiles to a local broadcast of 0 (value is not
# read). A plain jnp.zeros_like(value) is a constant with no layout: under jit, with
# Auto mesh axes, XLA replicates it (P("model") -> P()). This test guards against that.
# All analytic gradients share grad_tree, so one of them stands for all.
@pytest.mark.parametrize("name", ["l2_penalty_grad"])
def test_unselected_zero_gradient_keeps_its_layout_under_jit_with_auto_axes(name):
  mesh, shardings, params = _sharded_tree("tp", "Auto")  # the bias "b" is P("model")
  with jax.set_mesh(mesh):
    grads = jax.jit(GRADIENTS[name])(params)
  for k in UNSELECTED:
    assert _same_layout(grads[k], shardings[k]), (k, grads[k].sharding, shardings[k])


@pytest.mark.parametrize(("layout", "mode"), [("tp", "Auto"), ("fsdp_tp", "Explicit")])
def test_optax_transforms_keep_shardings(layout, mode):
  mesh, shardings, params = _sharded_tree(layout, mode)
  grads = jax.device_put(_tree(seed=1), shardings)
  anchor = jax.device_put(_tree(seed=2), shardings)
  for tx in (
    optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(0.1)),
    optax.chain(jaxl2.add_l2_grad(optax.linear_schedule(0.0, LAM, 10), M), optax.adam(1e-2)),
    optax.chain(jaxl2.l2_sp_grad(anchor, LAM, M), optax.sgd(0.1)),
  ):
    with jax.set_mesh(mesh):
      opt_state = tx.init(params)
      updates, _ = jax.jit(tx.update)(grads, opt_state, params)
      new_params = jax.jit(optax.apply_updates)(params, updates)
    for tree in (updates, new_params):
      for k, x in tree.items():
        assert _same_layout(x, shardings[k]), (k, x.sharding, shardings[k])
  # SGD: updates = -lr · (g + (λ/m)·W) on kernels; exact up to float32 rounding.
  with jax.set_mesh(mesh):
    tx = optax.chain(jaxl2.add_l2_grad(LAM, M), optax.sgd(0.1))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  tree, g = _tree(), _tree(seed=1)
  expected = -0.1 * (helpers.as_f64(g["w"]) + LAM / M * helpers.as_f64(tree["w"]))
  np.testing.assert_allclose(helpers.as_f64(updates["w"]), expected, rtol=1e-5, atol=1e-7)


# ---- training -------------------------------------------------------------------------

IN, HIDDEN, OUT, BATCH = 16, 32, 8, 64

# Layouts of the MLP {"w1": (IN, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, OUT), "b2": (OUT,)}.
MLP_LAYOUTS = {
  "fsdp": ((8,), ("data",), {"w1": P("data", None), "b1": P(), "w2": P("data", None), "b2": P()}),
  "tp": (
    (4, 2),
    ("data", "model"),
    {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()},
  ),
  "fsdp_tp": (
    (4, 2),
    ("data", "model"),
    {"w1": P("data", "model"), "b1": P("model"), "w2": P("model", "data"), "b2": P()},
  ),
}


def _mlp_problem(seed: int = 0):
  rng = np.random.default_rng(seed)
  params = {
    "w1": (rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN)).astype(np.float32),
    "b1": (0.1 * rng.normal(size=HIDDEN)).astype(np.float32),
    "w2": (rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32),
    "b2": (0.1 * rng.normal(size=OUT)).astype(np.float32),
  }
  x = rng.normal(size=(BATCH, IN)).astype(np.float32)
  y = rng.normal(size=(BATCH, OUT)).astype(np.float32)
  return params, (x, y)


def _gather(w: jax.Array, mode: str) -> jax.Array:
  # With Explicit axes the model states how a sharded contraction is done: here, like
  # FSDP, by gathering the weight for the matmul (jaxl2 itself never gathers).
  return jax.sharding.reshard(w, P()) if mode == "Explicit" else w


def _apply(mode: str):
  def apply_fn(p, x):
    h = jnp.tanh(x @ _gather(p["w1"], mode) + p["b1"])
    return h @ _gather(p["w2"], mode) + p["b2"]

  return apply_fn


def _mse(outputs, targets):
  return jnp.mean((outputs - targets) ** 2)


class _CompileCounter:
  """Counts XLA compilations (JAX's public monitoring events)."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == self.EVENT:
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def _sharded_run(layout: str, mode: str, steps: int, tx, *, use_options: bool):
  """Trains on the mesh; returns the final state and the per-step penalties."""
  shape, names, specs = MLP_LAYOUTS[layout]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType[mode],) * len(names))
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  batch_sharding = NamedSharding(mesh, P("data"))
  params, batch = _mlp_problem()
  with jax.set_mesh(mesh):
    if use_options:  # the step places params and (host) batch itself
      train = jaxl2.make_train_step(
        _apply(mode),
        _mse,
        tx,
        lam=LAM,
        m=M,
        param_sharding=shardings,
        batch_sharding=batch_sharding,
      )
    else:  # inferred: the caller placed both
      train = jaxl2.make_train_step(_apply(mode), _mse, tx, lam=LAM, m=M)
      params = jax.device_put(params, shardings)
      batch = jax.device_put(batch, batch_sharding)
    state = train.init(params)
    penalties = []
    for _ in range(steps):
      state, metrics = train(state, batch)
      penalties.append(float(metrics["penalty"]))
  return state, penalties, shardings


def _single_device_run(steps: int, tx):
  device = jax.devices()[0]
  params, batch = _mlp_problem()
  params, batch = jax.device_put((params, batch), device)
  train = jaxl2.make_train_step(_apply("Auto"), _mse, tx, lam=LAM, m=M)
  state = train.init(params)
  penalties = []
  for _ in range(steps):
    state, metrics = train(state, batch)
    penalties.append(float(metrics["penalty"]))
  for leaf in jax.tree_util.tree_leaves(state):
    assert leaf.sharding.device_set == {device}
  return state, penalties


@pytest.mark.parametrize(
  ("layout", "mode", "use_options"),
  [
    ("fsdp", "Auto", False),
    ("tp", "Auto", True),
    ("fsdp_tp", "Explicit", False),
  ],
)
def test_eight_devices_train_like_one(layout, mode, use_options):
  steps = 20
  sharded, sharded_penalties, _ = _sharded_run(
    layout, mode, steps, optax.adam(1e-2), use_options=use_options
  )
  single, single_penalties = _single_device_run(steps, optax.adam(1e-2))
  # The same float32 program, partitioned: the batch mean and the penalty sum partial
  # sums in another order (a few ulps per reduction), compounded over 20 Adam steps.
  # 1e-5 relative (atol 1e-6 for entries near 0).
  helpers.assert_trees_close(sharded.params, single.params, rtol=1e-5, atol=1e-6)
  helpers.assert_trees_close(sharded.opt_state, single.opt_state, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded_penalties, single_penalties, rtol=1e-5)
  assert int(sharded.step) == steps


@pytest.mark.parametrize(
  ("layout", "mode"), [("fsdp", "Auto"), ("tp", "Auto"), ("fsdp_tp", "Explicit")]
)
def test_train_step_keeps_shardings_donates_and_compiles_once(layout, mode):
  shape, names, specs = MLP_LAYOUTS[layout]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType[mode],) * len(names))
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  params, (x, y) = _mlp_problem()
  params = jax.device_put(params, shardings)
  batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    train = jaxl2.make_train_step(_apply(mode), _mse, optax.adam(1e-2), lam=LAM, m=M)
    state = train.init(params)
    # init copies shard for shard; the optimizer state follows; scalars are replicated.
    for k, w in state.params.items():
      assert _same_layout(w, shardings[k]), (k, w.sharding, shardings[k])
      assert _same_layout(state.opt_state[0].mu[k], shardings[k])
    for scalar in (state.step, state.lam, state.opt_state[0].count):
      assert scalar.sharding.device_set == set(jax.devices())
    layout_in = [leaf.sharding for leaf in jax.tree_util.tree_leaves(state)]
    state, _ = train(state, batch)  # compiles
    with _CompileCounter() as compiles, warnings.catch_warnings():
      warnings.simplefilter("error")  # e.g. "Some donated buffers were not usable"
      for _ in range(5):
        old = state
        state, metrics = train(state, batch)
        assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(old))  # donated
        assert [leaf.sharding for leaf in jax.tree_util.tree_leaves(state)] == layout_in
      state = train.set_lam(state, 2.0 * LAM)  # placed like the old λ: no new program
      state, metrics = train(state, batch)
    assert compiles.count == 0
  assert not any(w.is_deleted() for w in params.values())  # the caller's params stay valid
  np.testing.assert_allclose(
    float(metrics["penalty"]), 2.0 * LAM / (2 * M) * float(metrics["weight_sq_norm"]), rtol=1e-6
  )


def test_host_batch_is_split_and_results_match_a_placed_batch():
  # batch_sharding places a NumPy batch; the program and numbers equal a pre-placed batch.
  placed, placed_penalties, shardings = _sharded_run(
    "fsdp_tp", "Auto", 3, optax.sgd(0.1), use_options=False
  )
  options, options_penalties, _ = _sharded_run(
    "fsdp_tp", "Auto", 3, optax.sgd(0.1), use_options=True
  )
  for k, w in options.params.items():
    assert w.sharding == shardings[k]
  # Same compiled program on the same shards: bitwise equal.
  helpers.assert_trees_close(options.params, placed.params, rtol=0)
  assert options_penalties == placed_penalties


def test_bad_shardings_name_the_argument_and_the_leaf():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  params, (x, y) = _mlp_problem()

  def make(**kw):
    return jaxl2.make_train_step(_apply("Auto"), _mse, optax.sgd(0.1), lam=LAM, m=M, **kw)

  with pytest.raises(
    TypeError,
    match=r"`param_sharding` must be a jax.sharding.Sharding.*got P\('data',\)\. "
    r"Wrap a PartitionSpec with its mesh: `NamedSharding\(mesh",
  ):
    make(param_sharding=P("data"))
  with pytest.raises(TypeError, match=r"`batch_sharding` must be a jax.sharding.Sharding.*'data'"):
    make(batch_sharding={"x": "data"})
  train = make(
    param_sharding={
      "w1": NamedSharding(mesh, P(None, "data")),
      "b1": NamedSharding(mesh, P()),
      "w2": NamedSharding(mesh, P("data", None)),
      "b2": NamedSharding(mesh, P()),
    },
    batch_sharding=NamedSharding(mesh, P("data")),
  )
  state = train.init(params)  # fits: w1's 32 columns and w2's 32 rows split 8 ways
  with pytest.raises(
    ValueError,
    match=r"`param_sharding` does not fit the params leaf at 'w1' of shape \(16, 12\): .*each "
    r"sharded dimension must be a multiple of the number of devices along its mesh axes; "
    r"got NamedSharding\(.*P\(None, 'data'\)",
  ):
    train.init(dict(params, w1=params["w1"][:, :12]))  # 12 columns over 8 devices
  with pytest.raises(ValueError, match=r"`param_sharding` must be a Sharding or a pytree prefix"):
    train.init({"w1": params["w1"]})  # the tree lacks b1, w2, b2
  with pytest.raises(
    ValueError, match=r"`batch_sharding` does not fit the batch leaf at '0' of shape \(60, 16\)"
  ):
    train(state, (x[:60], y[:60]))  # 60 rows over 8 devices


# ---- the sharding guide's opening example ---------------------------------------------


def _scaling_example() -> str:
  """The python blocks of docs/guides/sharding.md before its first ``##`` section."""
  guide = (ROOT / "docs" / "guides" / "sharding.md").read_text(encoding="utf-8")
  opening = re.split(r"^## ", guide, maxsplit=1, flags=re.M)[0]
  blocks = re.findall(r"```python\n(.*?)```", opening, flags=re.S)
  assert blocks, "the sharding guide opens with no python block"
  return "\n".join(blocks)


def test_sharding_guide_example_runs_as_written(capsys):
  namespace: dict = {}
  exec(compile(_scaling_example(), "docs/guides/sharding.md", "exec"), namespace)
  printed = capsys.readouterr().out.split()
  assert printed[0] == "P('data',", "w1 stays sharded"
  assert printed[-2:] == ["False", "True"], "no all-gather; the gradient keeps the layout"
  assert namespace["mesh"].devices.size == N_DEVICES


def test_dropout_keys_under_data_parallel_sharding_match_one_device():
  """The general form's per-step dropout key, with the batch split over 8 devices.

  The key is replicated and the mask is drawn for the global batch: JAX's
  partitionable threefry makes each device draw its own slice of the same
  mask, so 8 devices train exactly as one.
  """
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))

  model = Net()
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(32, 5)).astype(np.float32), "y": rng.integers(0, 3, size=32)}
  params = model.init(jax.random.key(0), jnp.ones((1, 5)), train=False)["params"]

  def loss_fn(p, state, b, key):
    logits = model.apply({"params": p}, b["x"], train=key is not None, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(), (state, {})

  def run(param_sharding, batch_sharding):
    train = jaxl2.make_train_step(
      None, loss_fn, optax.adam(1e-2), lam=LAM, m=M,
      param_sharding=param_sharding, batch_sharding=batch_sharding,
    )  # fmt: skip
    state = train.init(params, seed=3)
    for _ in range(10):
      state, _ = train(state, batch)
    return jax.device_get(state.params)

  mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
  sharded = run(NamedSharding(mesh, P()), NamedSharding(mesh, P("data")))
  single = run(None, None)
  # Same masks, same float32 program partitioned: 1e-5 relative after 10 Adam steps.
  helpers.assert_trees_close(sharded, single, rtol=1e-5, atol=1e-6)
