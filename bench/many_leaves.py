"""Many small leaves vs a few large ones: compile and steady time of the penalty.

``python bench/many_leaves.py [--sizes 200,500,1000,2000] [--repeats 20] [--rounds 5]``

Every case runs in a fresh process (so compile times include first-time
tracing and nothing is cached from another case) and prints one JSON line;
this driver collects them into a table (``--json PATH`` keeps the rows).

* compile: wall (and CPU) seconds of ``jax.jit(f).lower(*args).compile()``.
* steady: the jitted function called through its C++ fast path (calling the
  ``Compiled`` object goes through Python and adds ~1 ms for 2,000 arguments),
  warm-up excluded, `jax.block_until_ready` on every call; the median of
  ``--repeats`` calls, in ``--rounds`` rounds that interleave the case with its
  references, so a figure is the median over rounds of a ratio measured
  seconds apart on a noisy machine.
* references, measured in the same process:
  - *limit*: one ``jnp.vdot`` over a contiguous float32 array of as many
    elements as the penalized leaves (the least any implementation must read);
  - *receive*: a jitted function that merely receives the same buffers
    (``keep_unused=True``) and does no work;
  - *floor* = receive + limit, for trees of many leaves;
  - *no penalty*, for the train step: the same step without the penalty
    (``by_hand`` adds (λ/m)·W to the gradient with a `tree_map` instead: the
    least any penalty can add to the step).

The trees come from ``bench/trees.py``: ``n`` float32 leaves of 40 x 25, the
784-4096-4096-4096-10 MLP (8 leaves, 37M params) and ResNet-50's leaves (161,
25.6M). Every leaf is penalized (``mask=jaxl2.all_floating``), so the naive form
and jaxl2 reduce the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # `python bench/many_leaves.py` from a checkout

LAM, M = 0.1, 100.0


# ---- the functions measured ---------------------------------------------------------


def _leaves(tree: Any) -> list:
  import jax

  return jax.tree_util.tree_leaves(tree)


def naive(tree: Any) -> Any:
  """What most code writes: a Python sum of per-leaf `vdot`s."""
  import jax.numpy as jnp

  return LAM / (2 * M) * sum(jnp.vdot(w, w) for w in _leaves(tree))


def optax_tree_norm(tree: Any) -> Any:
  import optax

  return LAM / (2 * M) * optax.tree_utils.tree_norm(tree, squared=True)


def jaxl2_penalty(tree: Any) -> Any:
  import jaxl2

  return jaxl2.l2_penalty(tree, LAM, M, mask=jaxl2.all_floating)


PENALTIES: dict[str, Callable[[Any], Any]] = {
  "naive": naive,
  "optax": optax_tree_norm,
  "jaxl2": jaxl2_penalty,
}


def data_loss(params: Any, x: Any) -> Any:
  """A cheap data loss touching every leaf: Σ_j mean(W_j) · x."""
  import jax.numpy as jnp

  return x * sum(jnp.mean(w) for w in _leaves(params))


def train_step(penalty: Callable[[Any], Any] | None) -> Callable[[Any, Any], Any]:
  """SGD: params − lr · grad(data loss [+ penalty])."""
  import jax

  def loss(params: Any, x: Any) -> Any:
    value = data_loss(params, x)
    return value if penalty is None else value + penalty(params)

  def step(params: Any, x: Any) -> Any:
    grads = jax.grad(loss)(params, x)
    return jax.tree_util.tree_map(lambda w, g: w - 0.01 * g, params, grads)

  return step


def train_step_by_hand(params: Any, x: Any) -> Any:
  """The same step with (λ/m)·W added to the gradient by hand: the least a penalty can cost."""
  import jax

  grads = jax.grad(data_loss)(params, x)
  grads = jax.tree_util.tree_map(lambda g, w: g + (LAM / M) * w, grads, params)
  return jax.tree_util.tree_map(lambda w, g: w - 0.01 * g, params, grads)


# ---- one case, in this process ---------------------------------------------------------


def _tree(name: str) -> Any:
  from bench import trees

  if name == "mlp":
    return trees.make_tree(trees.mlp_shapes())
  if name == "resnet50":
    return trees.make_tree(trees.resnet50_shapes())
  return trees.make_tree(trees.many_leaves_shapes(int(name)))


def _compile(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
  import jax

  jitted = jax.jit(fn)
  wall, cpu = time.perf_counter(), time.process_time()
  jitted.lower(*args).compile()
  return jitted, time.perf_counter() - wall, time.process_time() - cpu


def _median_call(fn: Callable[[], Any], repeats: int) -> float:
  import jax

  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int, rounds: int) -> dict:
  """Median per call and per round, the calls taking turns (warm-up excluded)."""
  import jax

  for call in calls.values():
    jax.block_until_ready(call())
  rows: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      rows[name].append(_median_call(call, repeats))
  return rows


def _ratio(rows: dict[str, list[float]], name: str, refs: Sequence[str]) -> float:
  per_round = [rows[name][i] / sum(rows[r][i] for r in refs) for i in range(len(rows[name]))]
  return statistics.median(per_round)


def run_case(kind: str, tree_name: str, impl: str, repeats: int, rounds: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax  # noqa: F401  (imported before timing: no case pays for an import)

  import jaxl2  # noqa: F401

  jax.jit(lambda x: x + 1).lower(1.0).compile()  # JAX's own first-use costs, outside timing
  tree = _tree(tree_name)
  n_elements = int(sum(np.prod(w.shape) for w in _leaves(tree)))
  flat = jnp.ones((n_elements,), jnp.float32)
  row: dict[str, Any] = {"kind": kind, "tree": tree_name, "impl": impl}
  row["leaves"], row["params"] = len(_leaves(tree)), n_elements
  if kind == "penalty":
    fn, args = PENALTIES[impl], (tree,)
  else:
    args = (tree, jnp.float32(1.0))
    fn = train_step_by_hand if impl == "by_hand" else train_step(PENALTIES.get(impl))
  jitted, row["compile_s"], row["compile_cpu_s"] = _compile(fn, *args)
  calls = {impl: lambda: jitted(*args)}
  if kind == "penalty":
    receive = jax.jit(lambda t: jnp.zeros(()), keep_unused=True)
    limit = jax.jit(lambda v: jnp.vdot(v, v))
    calls["receive"], calls["limit"] = lambda: receive(tree), lambda: limit(flat)
  else:
    base = jax.jit(train_step(None))
    calls["none"] = lambda: base(*args)
  rows = _interleaved(calls, repeats, rounds)
  row["steady_ms"] = 1e3 * statistics.median(rows[impl])
  if kind == "penalty":
    row["receive_ms"] = 1e3 * statistics.median(rows["receive"])
    row["limit_ms"] = 1e3 * statistics.median(rows["limit"])
    row["x_limit"] = _ratio(rows, impl, ["limit"])
    row["x_floor"] = _ratio(rows, impl, ["receive", "limit"])
  else:
    row["no_penalty_ms"] = 1e3 * statistics.median(rows["none"])
    row["x_no_penalty"] = _ratio(rows, impl, ["none"])
  return row


# ---- the driver ------------------------------------------------------------------------


def _spawn(kind: str, tree: str, impl: str, args: argparse.Namespace) -> dict:
  cmd = [sys.executable, __file__, "--one", kind, tree, impl]
  cmd += ["--repeats", str(args.repeats), "--rounds", str(args.rounds)]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{kind} {tree} {impl} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
  cases = []
  for n in args.sizes:
    for impl in args.impls:
      if impl == "jaxl2" or n <= args.naive_max:
        cases.append(("penalty", str(n), impl))
  for tree in args.trees:
    cases += [("penalty", tree, impl) for impl in args.impls]
  for impl in ("none", "by_hand", "jaxl2", "naive") if args.train_leaves else ():
    if impl != "naive" or args.train_leaves <= args.naive_max:
      cases.append(("train", str(args.train_leaves), impl))
  return cases


def _print(row: dict) -> None:
  head = f"{row['kind']:7s} {row['tree']:>8s} {row['impl']:7s}"
  times = f"compile {row['compile_s']:7.3f} s (cpu {row['compile_cpu_s']:7.3f})"
  if row["kind"] == "penalty":
    ratios = f"x floor {row['x_floor']:6.2f}  x limit {row['x_limit']:6.2f}"
    refs = f"receive {row['receive_ms']:.3f} ms, limit {row['limit_ms']:.3f} ms"
  else:
    ratios = f"x no penalty {row['x_no_penalty']:5.2f}"
    refs = f"no penalty {row['no_penalty_ms']:.3f} ms"
  print(f"{head}  {times}  steady {row['steady_ms']:8.3f} ms  {ratios}  ({refs})", flush=True)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="200,500,1000,2000", help="'' for none")
  parser.add_argument("--trees", default="mlp,resnet50", help="large trees; '' for none")
  parser.add_argument("--impls", default="naive,optax,jaxl2")
  parser.add_argument("--naive-max", type=int, default=2000, help="skip naive/optax above this")
  parser.add_argument("--train-leaves", type=int, default=2000, help="0: no train step")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--timeout", type=int, default=900)
  parser.add_argument("--json", default=None)
  parser.add_argument("--one", nargs=3, metavar=("KIND", "TREE", "IMPL"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(run_case(*args.one, args.repeats, args.rounds)))
    return []
  args.sizes = [int(s) for s in args.sizes.split(",") if s]
  args.trees = [t for t in args.trees.split(",") if t]
  args.impls = args.impls.split(",")
  import jax

  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}")
  rows = []
  for case in _cases(args):
    rows.append(_spawn(*case, args))
    _print(rows[-1])
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
  return rows


if __name__ == "__main__":
  main()
