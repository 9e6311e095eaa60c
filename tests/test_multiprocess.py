"""Every public function on two "hosts": 2 processes × 4 CPU devices against 1 process × 8.

`tests.multiprocess.run` starts the processes (joined by
`jax.distributed.initialize` over localhost, JAX's CPU collectives); the
cases are in `tests.multiprocess_cases`, grouped so that each group starts
its processes once. Each test runs one group on 2 processes × 4 devices and
on 1 process × 8 devices, then checks that the two processes returned the
same thing (one program: the same replicated numbers, the same reports) and
that it equals the one-process run to the tolerance stated with each check.
"""

from __future__ import annotations

import pathlib
import re
import time
from typing import Any

import numpy as np
import pytest

from tests import multiprocess, multiprocess_cases, multiprocess_tuning

# float32 sums over 8 devices whose partial sums are combined by the CPU collectives across
# processes, in another order than within one process: a few ulps, 1e-6 relative; 1e-7
# absolute for gradient entries that are cancellations of larger terms.
RTOL, ATOL = 1e-6, 1e-7


def _runs(group: str, tmp: pathlib.Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """The group's results on process 0 of 2 × 4 devices, and on 1 process × 8 devices; groups
  of `tests.multiprocess_tuning` (given ``tmp``) write checkpoints to a folder per run."""
  module = "multiprocess_cases" if tmp is None else "multiprocess_tuning"
  target = f"tests.{module}:{group}"
  env = lambda name: None if tmp is None else {"JAXL2_MP_DIR": str(tmp / name)}  # noqa: E731
  two = multiprocess.run(target, processes=2, devices=4, env=env("two"))
  (one,) = multiprocess.run(target, processes=1, devices=8, env=env("one"))
  for case, result in two[0].items():  # one program: every process gets the same result
    other = two[1][case]
    if case.endswith("in one process"):  # the processes differ by design: both kept
      two[0][case] = {"process 0": result, "process 1": other}
    elif isinstance(result, dict) and "error" in result:  # but its own device ids
      assert _masked(result["error"]) == _masked(other["error"]), case
    else:
      assert result == other, f"{case}: the two processes disagree"
  return two[0], one


def _array(x: Any) -> np.ndarray | None:
  """``x`` as a float array if it is a number or a (nested, rectangular) list of numbers."""
  if x is None or isinstance(x, (bool, str, dict)):
    return None
  try:
    return np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError):  # a ragged list: compared element by element
    return None


def _assert_close(two: Any, one: Any, path: str, rtol: float, atol: float) -> None:
  """Numbers (and arrays of them) within tolerance, NaN where NaN; everything else equal."""
  a, b = _array(two), _array(one)
  if a is not None and b is not None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=path)
  elif isinstance(two, dict) and isinstance(one, dict):
    assert two.keys() == one.keys(), path
    for k in two:
      _assert_close(two[k], one[k], f"{path}/{k}", rtol, atol)
  elif isinstance(two, list) and isinstance(one, list) and len(two) == len(one):
    for i, (x, y) in enumerate(zip(two, one, strict=True)):
      _assert_close(x, y, f"{path}[{i}]", rtol, atol)
  else:
    assert two == one, f"{path}: {two!r} on 2 processes, {one!r} on 1"


def _all_close(group: str, cases: int, rtol: float, atol: float) -> dict[str, Any]:
  """Runs ``group``: no case fails, and every result on 2 processes is close to 1 process's."""
  two, one = _runs(group)
  errors = {k: v["error"] for k, v in two.items() if isinstance(v, dict) and "error" in v}
  assert not errors, errors
  assert set(two) == set(one) and len(one) == cases
  for case in one:
    _assert_close(two[case], one[case], case, rtol, atol)
  return two


def test_penalties_grads_and_transforms_on_two_processes_equal_one_process():
  # Each penalty, its gradient (analytic and jax.grad) eager and jitted, `regularized` on the
  # global batch, and 3 optax steps of add_l2_grad (constant λ, schedule) and l2_sp_grad (its
  # anchor sharded like the params), on replicated and FSDP kernels (Auto and Explicit axes).
  _all_close("penalties", 39, RTOL, ATOL)


_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[+-]?\d+)?")


def _masked(text: str) -> str:
  """A report with its numbers masked: what must be equal to the letter."""
  return _NUMBER.sub("#", text)


# A case that must fail on several processes: its error there, and on one process (None: works).
EXPECTED_ERRORS = {
  "error verify_penalty pinned leaf": (
    r"ValueError: `params` leaf at 'extra' is placed on devices \[\d+\], but `params` leaf at "
    r"'conv/kernel' is on devices \[.*\]: one compiled program cannot take both\. Place it as "
    r"the others, e\.g\. `jax\.device_put\(np\.asarray\(value\), NamedSharding\(mesh, P\(\)\)\)`",
  )
  * 2,
  "error verify_update pinned grads": (
    r"ValueError: `grads` leaf at 'conv/kernel' is placed on devices \[\d+\], but `params` leaf "
    r"at 'conv/kernel' is on devices \[.*\]: one compiled program cannot take both",
  )
  * 2,
  "error verify_penalty loss closes over a global anchor": (
    r"ValueError: `loss_fn` closes over a jax\.Array that spans several processes, which a "
    r"compiled program cannot capture \(JAX: .*\)\. The data term drops out of this check .*"
    r"Replicate that array for the check",
    None,
  ),
  "error verify_update tx closes over a global array": (
    r"ValueError: `tx` or `base_tx` closes over a jax\.Array that spans several processes, which "
    r"a compiled program cannot capture \(JAX: float32\[3,3,4,8\]\)\. An optax transform that "
    r"needs arrays must take them from its state or the params",
    None,
  ),
}


def _report_numbers(result: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in result.items() if k != "text"}


def test_describe_and_verify_on_two_processes_equal_one_process():
  # describe (rows and totals) and verify_penalty/verify_update (a right and a wrong loss or
  # optimizer; NumPy grads; a bf16 decay that rounds away) on replicated and FSDP params. On
  # 2 processes the fits and norms are reduced on the devices in float32, where 1 process
  # computes them on the host (float64 norms): the tables are equal to the letter but for
  # their digits, and the numbers to 1e-6 relative (a misfit of ~1e-7 is noise: atol 1e-6).
  two, one = _runs("reports")
  assert set(two) == set(one) and len(one) == 24
  for case in sorted(set(one) - set(EXPECTED_ERRORS)):
    a, b = two[case], one[case]
    assert "error" not in a and "error" not in b, (case, a, b)
    assert _masked(a["text"]) == _masked(b["text"]), f"{case}:\n{a['text']}\n{b['text']}"
    _assert_close(_report_numbers(a), _report_numbers(b), case, rtol=RTOL, atol=1e-6)
  wrong = [
    row["status"] for c in one if c.startswith("verify_penalty wrong") for row in one[c]["rows"]
  ]
  assert set(wrong) == {"scaled", "unexpected"}  # the wrong loss is caught on every layout
  rounding = {row["path"]: row["status"] for row in two["verify_update rounds away"]["rows"]}
  assert rounding == {"b": "ok", "w": "rounds-away"}
  # What cannot work across processes fails clearly, in every process, and never hangs.
  for case, (on_two, on_one) in EXPECTED_ERRORS.items():
    assert re.match(on_two, two[case].get("error", "")), (case, two[case])
    if on_one is None:
      assert "error" not in one[case], (case, one[case])
    else:
      assert re.match(on_one, one[case].get("error", "")), (case, one[case])


# Adam divides each step by the gradient's own size, so a gradient entry that is a
# cancellation (float32 rounding of the batch mean differs with the summation order) moves its
# weight by up to lr·1e-4: 4e-6 seen after 6 steps at lr 1e-2; 1e-5 absolute and relative.
TRAIN_RTOL = TRAIN_ATOL = 1e-5


def test_every_training_form_on_two_processes_equals_one_process():
  # make_train_step: the simple form (param_sharding with host params; params already global
  # with a host batch split by batch_sharding) on replicated and FSDP kernels, Auto and
  # Explicit axes; the general form with linen BatchNorm + dropout, an NNX module, an
  # Equinox module with eqx.nn.State. 5 steps, λ doubled, 1 more; then make_eval_step.
  two = _all_close("training", 12, TRAIN_RTOL, TRAIN_ATOL)
  assert {r["step"] for r in two.values()} == {multiprocess_cases.STEPS + 1}
  for case in (c for c in two if "param_sharding" in c):
    assert two[case]["layout kept"], case
  for case in (c for c in two if "inferred" in c):
    assert two[case]["no all-gather"], case  # the penalty all-reduces scalars only


def test_a_failing_process_ends_its_peers_instead_of_hanging():
  # Process 1 raises; process 0 waits for it in a collective that would never complete.
  start = time.perf_counter()
  with pytest.raises(multiprocess.MultiprocessError, match=r"(?s)a process failed.*planted"):
    multiprocess.run(
      "tests.multiprocess_cases:fails_on_process_1", processes=2, devices=1, timeout_s=60
    )
  assert time.perf_counter() - start < 60


# ---- sweep and the λ tools (tests/multiprocess_tuning.py) --------------------------------

_DIFFERS = (
  r"ValueError: `train_data` differs between processes: its leaf at '0' in process 1 and in "
  r"process 0 differ\. .* Pass the same NumPy data in every process, or the data as one global "
  r"array over the model's mesh, each process giving its own rows: "
  r"`jax\.make_array_from_process_local_data\("
)


def test_sweep_on_two_processes_equals_one_process(tmp_path):
  # sweep on NumPy data (with a progress callback), on global data, the general form with
  # folds, checkpointed (last checkpoint removed: resumed; rerun: finished) and on the default
  # save schedule. Each model is trained whole on one device by the same per-device program
  # on either layout; across processes only gathers move numbers: equal to the bit.
  two, one = _runs("sweeps", tmp_path)
  assert set(two) == set(one) and len(one) == 6
  for case in (c for c in one if not c.startswith("error")):
    assert "error" not in two[case] and "error" not in one[case], (case, two[case], one[case])
    without = lambda r: {k: v for k, v in r.items() if k != "progress"}  # noqa: E731
    _assert_close(without(two[case]), without(one[case]), case, rtol=0, atol=0)
  for run in (two, one):
    assert run["sweep checkpoints resumed"]["resumed equal"]
    assert run["sweep checkpoints resumed"]["finished equal"]
  # Progress is printed once: every step (16 < 20 reports) in process 0, nothing in process 1.
  n = multiprocess_tuning.STEPS
  steps = list(range(1, n + 1))
  assert two["sweep numpy data"]["progress"] == {"calls per process": [[n], [0]], "values": steps}
  assert one["sweep numpy data"]["progress"] == {"calls per process": [[n]], "values": steps}
  # Data that differ between processes (each its own rows as NumPy): a clear error.
  assert re.match(_DIFFERS, two["error sweep data differs between processes"].get("error", ""))
  assert "error" not in one["error sweep data differs between processes"]


def test_sweep_killed_on_one_process_resumes_on_two_processes(tmp_path):
  # Process 0 SIGKILLs itself at step 6, mid-chunk, once step 4 is saved; its peer, left in a
  # collective, is ended. The rerun on 2 processes resumes from step 4 and ends bit for bit
  # where the same sweep run uninterrupted ends.
  env = {"JAXL2_MP_DIR": str(tmp_path)}
  with pytest.raises(multiprocess.MultiprocessError, match=r"process 0 \(exit code -9\)"):
    multiprocess.run("tests.multiprocess_tuning:sweep_killed", processes=2, devices=4, env=env)
  first, second = multiprocess.run(
    "tests.multiprocess_tuning:sweep_after_kill", processes=2, devices=4, env=env
  )
  assert first == second
  assert first["found"] == 4
  assert first["resumed"] == first["uninterrupted"]


# The λ tools solve with conjugate gradients (38 iterations here), which carry float32
# differences in the order of reductions (~1e-7) a little further: 1.4e-5 relative seen
# (Hutchinson's standard error), so 5e-5; the solves' residuals, ~5e-6 and noise by nature
# (bounded by the stopping tolerance), to 1e-5 absolute; their iteration counts to one
# (a residual that differs in its last bits crosses the tolerance one iteration apart:
# 39 vs 38 on jax 0.9.1).
LAM_RTOL, LAM_ATOL, RESIDUAL_ATOL, ITERATIONS_ATOL = 5e-5, 1e-6, 1e-5, 1
NOISY = ("residual", "iterations")  # compared on their own, to the tolerances above


def _residuals(tree: Any) -> tuple[Any, dict[str, list[float]]]:
  """``tree`` without its "residual" and "iterations" entries, and those entries."""
  found: dict[str, list[float]] = {k: [] for k in NOISY}

  def strip(x: Any) -> Any:
    if isinstance(x, dict):
      for k in NOISY:
        found[k].extend([x[k]] if k in x else [])
      return {k: strip(v) for k, v in x.items() if k not in NOISY}
    return [strip(v) for v in x] if isinstance(x, list) else x

  return strip(tree), found


def test_lam_tools_on_two_processes_equal_one_process(tmp_path):
  # lam_hypergradient on replicated and FSDP params, global and NumPy data; effective_params
  # exact (FSDP, NumPy data) and Hutchinson's estimate with a Nyström preconditioner
  # (replicated, global data); tune_lam with checkpoints, called again: restored, not retrained.
  two, one = _runs("lam_tools", tmp_path)
  assert set(two) == set(one) and len(one) == 9
  for case in (c for c in one if not c.startswith("error")):
    assert "error" not in two[case] and "error" not in one[case], (case, two[case], one[case])
    (a, ra), (b, rb) = _residuals(two[case]), _residuals(one[case])
    _assert_close(a, b, case, rtol=LAM_RTOL, atol=LAM_ATOL)
    np.testing.assert_allclose(
      ra["residual"], rb["residual"], rtol=0, atol=RESIDUAL_ATOL, err_msg=case
    )
    np.testing.assert_allclose(
      ra["iterations"], rb["iterations"], rtol=0, atol=ITERATIONS_ATOL, err_msg=case
    )
  for run in (two, one):
    assert run["tune_lam replicated, checkpoints restored"]["restored equal"]
  # Data that differ between processes; data on one process's device: clear errors.
  case = "error lam_hypergradient data differ between processes"
  assert re.match(_DIFFERS, two[case].get("error", "")), two[case]
  assert "error" not in one[case]
  on_one_device = (
    r"ValueError: `train_data` leaf at '0' is placed on devices \[\d+\], but `state\.params` leaf "
    r"at 'b1' is on devices \[.*\]: one compiled program cannot take both\. Pass the same NumPy "
    r"data in every process"
  )
  for run in (two, one):
    assert re.match(on_one_device, run["error effective_params data on one device"]["error"])
  # Pinned in process 1 only: it says why; process 0 stops too (the harness returns only when
  # both have ended, so a wait would time out), naming process 1.
  case = "error effective_params data on one device in one process"
  assert re.match(on_one_device, two[case]["process 1"].get("error", "")), two[case]
  refused = r"ValueError: process 1 refused its arguments"
  assert re.match(refused, two[case]["process 0"].get("error", "")), two[case]
  assert "error" not in one[case], one[case]
