"""A `TrainState` saved with orbax and restored in a fresh process trains on bit for bit.

tests/checkpoint_forms.py runs twice in fresh processes with 4 CPU devices:
``save`` (3 steps, save, 5 more: the uninterrupted run) and ``resume`` (restore
into a freshly built state's abstract target, the same 5 steps). Every form:
simple, simple with FSDP-sharded params, linen with batch_stats and dropout,
NNX with BatchNorm and dropout, Equinox with eqx.nn.State.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np

from tests import checkpoint_forms, multiprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(mode: str, directory: str) -> dict:
  proc = subprocess.run(
    [sys.executable, "-m", "tests.checkpoint_forms", mode, directory],
    cwd=ROOT,
    env=multiprocess.cpu_devices_env(4),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_form_resumes_bit_for_bit_in_a_fresh_process(tmp_path):
  _run("save", str(tmp_path))
  report = _run("resume", str(tmp_path))
  assert set(report) == set(checkpoint_forms.FORMS)
  for form, facts in report.items():
    assert facts == {"same_shardings": True, "step": checkpoint_forms.BEFORE}, form
    full = np.load(tmp_path / f"save-{form}.npz")
    resumed = np.load(tmp_path / f"resume-{form}.npz")
    assert sorted(full.files) == sorted(resumed.files), form
    for name in full.files:  # reference: the uninterrupted run; tolerance: none
      np.testing.assert_array_equal(resumed[name], full[name], err_msg=f"{form}: {name}")
