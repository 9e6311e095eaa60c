"""sweep with a checkpoint directory: resumes bit for bit, refuses another sweep's directory.

The kill tests run each sweep in a fresh process (tests/sweep_faults.py): the
uninterrupted run, then for each kill point (SIGKILL early, mid-chunk, during
a save) a run that kills itself and a rerun with the same arguments and
directory. Reference: the uninterrupted run; tolerance: none.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxl2
from tests import faults
from tests import sweep_faults as small


def _child(mode: str, directory: pathlib.Path) -> subprocess.CompletedProcess:
  return faults.child("tests.sweep_faults", mode, directory)


def _finished(mode: str, directory: pathlib.Path) -> dict:
  return faults.finished("tests.sweep_faults", mode, directory)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> np.lib.npyio.NpzFile:
  directory = tmp_path_factory.mktemp("faults") / "full"
  assert _finished("full", directory)["found"] is None
  return np.load(directory.with_suffix(".npz"))


# (mode, the complete checkpoints the killed run leaves, and whether a temporary folder)
KILLS = [("kill-early", [], False), ("kill-mid", [4], False), ("kill-save", [4], True)]


@pytest.mark.parametrize(("mode", "complete", "partial"), KILLS, ids=[k[0] for k in KILLS])
def test_a_killed_sweep_resumes_bit_for_bit(uninterrupted, tmp_path, mode, complete, partial):
  directory = tmp_path / mode
  faults.assert_killed_leaving(_child(mode, directory), directory, complete, partial)
  # The save killed in its finalize step left its temporary folder, never a step folder.
  report = _finished("resume", directory)
  assert report["found"] == (complete[-1] if complete else None)
  resumed = np.load(directory.with_suffix(".npz"))
  assert sorted(resumed.files) == sorted(uninterrupted.files)
  for name in uninterrupted.files:
    np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)


# ---- in one process ---------------------------------------------------------------------


def _sweep(directory=None, *, lams=(0.0, 0.5, 3.0), seeds=(4, 5), data_seed=0, steps=12, **kw):
  return jaxl2.sweep(
    small._init, None, small._loss, optax.adam(1e-2), small._data(40, data_seed),
    small._data(30, 1), lams=list(lams), steps=steps, seeds=seeds, batch_size=8,
    checkpoint_dir=directory, **kw,
  )  # fmt: skip


def _leaves(r: jaxl2.SweepResult) -> list[np.ndarray]:
  return [*jax.tree_util.tree_leaves(r.params), r.train_loss, r.val_loss, r.penalty]


def test_a_finished_directory_gives_the_result_again_without_training(tmp_path):
  first = _sweep(tmp_path, checkpoint_every=4)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["12", "8"]
  calls = []
  again = _sweep(tmp_path, checkpoint_every=4, progress=lambda d, t: calls.append(d))
  assert calls == [] and all(map(np.array_equal, _leaves(again), _leaves(first)))
  # The chunked programs compute what the one program computes (exactly, on CPU).
  plain = _sweep()
  for x, y in zip(_leaves(plain), _leaves(first), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("saved")
  _sweep(directory, checkpoint_every=6)
  return directory


@pytest.mark.parametrize(
  ("change", "shown"),
  [
    ({"lams": (0.0, 0.5, 4.0)}, "lams: saved [0.0, 0.5, 3.0], now [0.0, 0.5, 4.0]"),
    ({"lams": (0.0, 0.5, 3.0, 9.0)}, "lams: saved [0.0, 0.5, 3.0], now [0.0, 0.5, 3.0, 9.0]"),
    ({"seeds": (4, 6)}, "seeds: saved [4, 5], now [4, 6]"),
    ({"steps": 16}, "steps: saved 12, now 16"),
    ({"data_seed": 7}, "train_data: saved {'layout'"),  # same shapes, other values
  ],
  ids=["lam", "grid", "seed", "steps", "data"],
)
def test_a_directory_of_another_sweep_is_an_error(saved, change, shown):
  with pytest.raises(ValueError, match="holds a checkpoint of another sweep run") as err:
    _sweep(saved, checkpoint_every=6, **change)
  assert shown in str(err.value) and "pass a new directory" in str(err.value)


def test_checkpoint_options_are_checked(tmp_path):
  with pytest.raises(ValueError, match=re.escape("`checkpoint_every` must be an integer >= 1")):
    _sweep(tmp_path, checkpoint_every=0)
  with pytest.raises(ValueError, match=re.escape("`checkpoint_every` (5) needs `checkpoint_dir`")):
    _sweep(None, checkpoint_every=5)
  with pytest.raises(TypeError, match="`checkpoint_dir` must be a path"):
    _sweep(3)


@pytest.mark.parametrize(
  ("steps", "save_s", "kept"),
  [
    # Chunk ends at 100 (6.7 s: wait), 200 (13.4 s: save), 250 (the last step: save).
    (250, 0.0, ["200", "250"]),
    # A save taking 0.5 s makes the next wait 40 · 0.5 = 20 s: saved at 200 (12.6 s),
    # then 500 (33.6 s; 400 is only 14.2 s after the save ended), then 600.
    (600, 0.5, ["500", "600"]),
  ],
)
def test_by_default_chunks_of_100_steps_are_saved_by_time(
  tmp_path, monkeypatch, steps, save_s, kept
):
  # A clock that reads 0.07 s per step done (as reported to `progress`) plus the saves.
  clock = [0.0]
  monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

  def progress(done, total):
    clock[0] = max(clock[0], done * 0.07)

  original = ocp.CheckpointManager.save

  def slow_save(self, *args, **kwargs):
    clock[0] += save_s
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", slow_save)
  _sweep(tmp_path, lams=(0.5,), seeds=(4,), steps=steps, progress=progress)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == kept
