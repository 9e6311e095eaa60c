"""Shared by the kill-and-resume tests: run a child that SIGKILLs itself, rerun, compare.

A child script (tests/sweep_faults.py, tests/tune_faults.py) takes ``MODE DIR``
and, in the modes that name a kill point, kills itself there: from a callback
of its own (user code), or inside orbax's finalize step of one save
(`kill_in_finalize`), after the checkpoint's temporary folder is written and
before it is renamed into place. No test hook lives in jaxl2.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def kill() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def kill_in_finalize(directory: pathlib.Path, step: int) -> None:
  """Wraps orbax's finalize (the rename of a complete temporary folder) to die at ``step``'s."""
  from orbax.checkpoint._src.path import atomicity

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    tmp = pathlib.Path(self.get())
    if tmp.parent == directory and tmp.name.startswith(f"{step}."):
      kill()
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def child(module: str, mode: str, directory: pathlib.Path) -> subprocess.CompletedProcess:
  """``python -m module mode directory`` in a fresh process, from the repository root."""
  return subprocess.run(
    [sys.executable, "-m", module, mode, str(directory)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def finished(module: str, mode: str, directory: pathlib.Path) -> dict:
  """The JSON report a child prints last, after checking that it ended normally."""
  proc = child(module, mode, directory)
  assert proc.returncode == 0, proc.stderr[-6000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_killed_leaving(
  proc: subprocess.CompletedProcess, directory: pathlib.Path, complete: list[int], partial: bool
) -> None:
  """The child died by SIGKILL and left exactly the ``complete`` checkpoints (and a
  temporary folder iff ``partial``): never a half-written step folder."""
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-6000:]
  entries = sorted(p.name for p in directory.iterdir())
  assert [e for e in entries if e.isdigit()] == [str(s) for s in complete], entries
  assert any("tmp" in e for e in entries) == partial, entries
