"""tune_lam with a checkpoint directory: killed anywhere, it resumes to the same result.

Each search runs in a fresh process (tests/tune_faults.py): the uninterrupted
one, then for each kill point (SIGKILL early, while training a later λ, during
a save) a run that kills itself and a rerun with the same arguments and
directory. Reference: the uninterrupted search; tolerance: none.
"""

from __future__ import annotations

import pathlib
import subprocess

import numpy as np
import pytest

from tests import faults


def _child(mode: str, directory: pathlib.Path) -> subprocess.CompletedProcess:
  return faults.child("tests.tune_faults", mode, directory)


def _finished(mode: str, directory: pathlib.Path) -> dict:
  return faults.finished("tests.tune_faults", mode, directory)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, np.lib.npyio.NpzFile]:
  directory = tmp_path_factory.mktemp("tune") / "full"
  report = _finished("full", directory)
  assert report["found"] is None and report["steps"] == 20 + 3 * 10  # 4 λ, no retraining
  return report, np.load(directory.with_suffix(".npz"))


# (mode, complete checkpoints the killed run leaves, whether a temporary folder is left,
# training steps the resumed run takes)
KILLS = [
  ("kill-early", [], False, 50),
  ("kill-mid", [1, 2], False, 20),
  ("kill-save", [1], True, 30),
]


@pytest.mark.parametrize(("mode", "complete", "partial", "steps"), KILLS, ids=[k[0] for k in KILLS])
def test_a_killed_search_resumes_bit_for_bit(
  uninterrupted, tmp_path, mode, complete, partial, steps
):
  full_report, full = uninterrupted
  directory = tmp_path / mode
  faults.assert_killed_leaving(_child(mode, directory), directory, complete, partial)
  report = _finished("resume", directory)
  assert report["found"] == (complete[-1] if complete else None)
  assert report["steps"] == steps  # it went on from the checkpoint, not from the start
  assert report["reason"] == full_report["reason"]
  resumed = np.load(directory.with_suffix(".npz"))
  assert sorted(resumed.files) == sorted(full.files)
  for name in full.files:
    np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


def test_a_finished_search_returns_its_result_without_training(uninterrupted, tmp_path):
  directory = tmp_path / "again"
  first = _finished("full", directory)
  again = _finished("resume", directory)
  assert first["steps"] == 50 and again["steps"] == 0 and again["found"] == 4
  np.testing.assert_array_equal(
    np.load(directory.with_suffix(".npz"))["path"], uninterrupted[1]["path"]
  )
