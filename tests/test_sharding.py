"""Sharded parameters and data-parallel training on 8 devices.

JAX fixes the number of devices when it starts, so the checks run in fresh
processes with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N CPU
devices); this process, and the rest of the suite, keep theirs.
tests/sharded_checks.py runs on 8 devices in one process; several processes
("hosts") are tests/test_multiprocess.py's.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np

from tests.multiprocess import cpu_devices_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKS = "tests/sharded_checks.py"
# Fewer would mean checks were skipped or not collected; the file holds more.
MIN_PASSED = 56


def test_sharded_checks_pass_on_eight_devices():
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", CHECKS],
    cwd=ROOT,
    env=cpu_devices_env(8),
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
    env=cpu_devices_env(n),
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
