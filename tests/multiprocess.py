"""Run a function as a multi-host JAX program on one machine: N processes × k CPU devices.

A TPU pod runs the same program in every host's process, each process
driving its own devices, joined by `jax.distributed.initialize`. Here every
"host" is a fresh Python process with ``k`` simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=k``), joined over
localhost by JAX's CPU collectives; `run` with ``processes=1`` runs the same
function in one process of ``N·k`` devices, the reference that a multi-host
run must reproduce.

``run("tests.multiprocess_cases:penalties", processes=2, devices=4)``
imports ``tests.multiprocess_cases`` in each process, calls ``penalties()``
and returns the JSON value each process returned, in process order. If a
process fails, its peers (which would wait for it in a collective forever)
are ended and `MultiprocessError` carries every process's output; a run past
``timeout_s`` is ended the same way, so nothing hangs.

The child side is this module run as ``python -m tests.multiprocess TARGET
PROCESS_ID NUM_PROCESSES PORT OUT``.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A peer that never comes, or never leaves, fails the run within this many seconds.
COORDINATION_TIMEOUT_S = 60


class MultiprocessError(RuntimeError):
  """A process of a `run` failed or ran out of time; the message holds every process's output."""


def cpu_devices_env(n: int) -> dict[str, str]:
  """This environment, with JAX on ``n`` simulated CPU devices."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_PLATFORMS"] = "cpu"  # the simulated devices are CPU devices, even on a GPU host
  return env


def free_port() -> int:
  """A TCP port that was free a moment ago, for the coordinator."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _tail(path: pathlib.Path, n: int = 6000) -> str:
  text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
  return text[-n:]


def _report(what: str, logs: list[tuple[pathlib.Path, pathlib.Path]], codes: list) -> str:
  parts = [what]
  for i, ((out, err), code) in enumerate(zip(logs, codes, strict=True)):
    parts.append(f"--- process {i} (exit code {code}) stdout:\n{_tail(out, 2000)}")
    parts.append(f"--- process {i} stderr:\n{_tail(err)}")
  return "\n".join(parts)


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> str:
  """Waits for every process; ends them all when one fails or time runs out. "" if all passed."""
  deadline = time.monotonic() + timeout_s
  try:
    while True:
      codes = [p.poll() for p in procs]
      if any(code not in (None, 0) for code in codes):
        return "a process failed; its peers were ended"
      if all(code == 0 for code in codes):
        return ""
      if time.monotonic() > deadline:
        return f"timed out after {timeout_s:g} s; every process was ended"
      time.sleep(0.05)
  finally:
    for p in procs:  # a peer left waiting in a collective would never return: end it
      if p.poll() is None:
        p.kill()
        p.wait()


def run(
  target: str,
  *,
  processes: int,
  devices: int,
  timeout_s: float = 600.0,
  env: dict[str, str] | None = None,
) -> list[Any]:
  """Runs ``module:function`` in ``processes`` processes of ``devices`` CPU devices each.

  With ``processes > 1`` they are joined by `jax.distributed.initialize`
  (so `jax.devices()` lists all ``processes·devices`` devices); with 1, JAX
  runs undistributed. Each process calls the function with no arguments, in
  this environment plus ``env`` (a shared directory, say).

  Returns:
    The JSON value the function returned in each process, in process order.

  Raises:
    MultiprocessError: a process failed, or the run took over ``timeout_s``.
  """
  port = free_port()
  with tempfile.TemporaryDirectory(prefix="jaxl2-mp-") as tmp:
    folder = pathlib.Path(tmp)
    logs = [(folder / f"{i}.out", folder / f"{i}.err") for i in range(processes)]
    results = [folder / f"{i}.json" for i in range(processes)]
    procs = []
    for i in range(processes):
      # Output goes to files, not pipes: a process blocked on a full pipe would stall its peers.
      with open(logs[i][0], "w") as out, open(logs[i][1], "w") as err:
        cmd = [sys.executable, "-m", "tests.multiprocess", target, str(i), str(processes)]
        procs.append(
          subprocess.Popen(
            [*cmd, str(port), str(results[i])],
            cwd=ROOT,
            env=cpu_devices_env(devices) | (env or {}),
            stdout=out,
            stderr=err,
          )
        )
    failure = _wait(procs, timeout_s)
    if failure:
      raise MultiprocessError(_report(f"{target} on {processes} processes: {failure}", logs,
                                      [p.returncode for p in procs]))  # fmt: skip
    return [json.loads(path.read_text(encoding="utf-8")) for path in results]


def _main(target: str, process_id: int, num_processes: int, port: int, out: str) -> None:
  import jax

  if num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=f"localhost:{port}",
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=COORDINATION_TIMEOUT_S,
      shutdown_timeout_seconds=COORDINATION_TIMEOUT_S,
    )
  module, name = target.split(":")
  try:
    result = getattr(importlib.import_module(module), name)()
  except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    # Exit now: a normal exit would wait for the peers at jax.distributed's shutdown barrier.
    os._exit(1)
  pathlib.Path(out).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
  _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
