"""Sharded parameters and data-parallel training, on 8 devices and on two "hosts".

JAX fixes the number of devices when it starts, so the checks run in fresh
processes with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N CPU
devices); this process, and the rest of the suite, keep theirs.
tests/sharded_checks.py runs on 8 devices in one process;
tests/multihost_check.py runs in two processes of 4 devices each.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import optax

import jaxl2
from tests import multihost_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKS = "tests/sharded_checks.py"
# Fewer would mean checks were skipped or not collected; the file holds more.
MIN_PASSED = 56


def _cpu_devices_env(n: int) -> dict[str, str]:
  """This environment, with JAX on ``n`` simulated CPU devices."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_PLATFORMS"] = "cpu"  # the simulated devices are CPU devices, even on a GPU host
  return env


def test_sharded_checks_pass_on_eight_devices():
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", CHECKS],
    cwd=ROOT,
    env=_cpu_devices_env(8),
    capture_output=True,
    text=True,
    timeout=900,
  )
  report = f"{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
  assert proc.returncode == 0, report
  summary = proc.stdout.strip().splitlines()[-1]
  counts = {kind: int(n) for n, kind in re.findall(r"(\d+) ([a-z]+)", summary)}
  assert counts.get("passed", 0) >= MIN_PASSED, report
  assert not {"failed", "error", "errors", "skipped", "xpassed"} & counts.keys(), report


def _device_comparison_values(n: int) -> dict[str, float]:
  """`sharded_checks.device_comparison_values` in a fresh process on ``n`` CPU devices."""
  code = "import json; from tests import sharded_checks as c\n"
  code += "print(json.dumps(c.device_comparison_values()))"
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=_cpu_devices_env(n),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_and_eight_devices_give_the_same_penalty():
  # 1,040 leaves (groups and a pool), replicated or split over 8 devices, Auto and Explicit
  # axes, under jit and eagerly, against the same calls on one device. Replicated leaves
  # take one device's plan: the same sums in the same order. Split ones add 8 partial sums
  # per group instead of one: float32 rounding of ~1.7*10^5 positive squares, 1e-6 relative.
  one, eight = _device_comparison_values(1), _device_comparison_values(8)
  assert set(one) == set(eight) and len(one) == 5
  for case, value in eight.items():
    np.testing.assert_allclose(value, one[case], rtol=1e-6, err_msg=case)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_device():
  # Two "hosts" of 4 CPU devices each, joined by jax.distributed.initialize over
  # localhost: the multi-host path of the README, run for real.
  env = _cpu_devices_env(4)
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, "tests/multihost_check.py", str(i), "2", str(port)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:  # one process failing early leaves its peer waiting: end it
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 0, f"{out[-4000:]}\n{err[-4000:]}"
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

  weights, x, y = multihost_check.problem()
  step = jaxl2.make_train_step(
    multihost_check.mlp,
    multihost_check.mean_squared,
    optax.adam(1e-2),
    lam=multihost_check.LAM,
    m=multihost_check.M,
  )
  state, reference = multihost_check.train(step, weights, (x, y))
  _, reference_again = multihost_check.train(step, state.params, (x, y))
  for r in results:
    assert (r["devices"], r["local_devices"]) == (8, 4)
    assert r["w1_layout_kept"] and r["no_all_gather"]
    # float32 partial sums combined across 8 devices in another order: 1e-5 relative.
    np.testing.assert_allclose(r["penalties"], reference, rtol=1e-5)
    np.testing.assert_allclose(r["inferred_penalties"], reference_again, rtol=1e-5)
  assert results[0]["l2_penalty"] == results[1]["l2_penalty"]  # one program, one value
