"""Running a Markdown page's Python blocks (README.md, the docs' guides) as a reader would.

A page's ```python blocks run in order, in one namespace per page. A block's
shown output is the first fenced block after it when that one is a ```text
block (prose may come between). Every block that prints must show its
output, and a shown output must be what the block prints, line for line
(trailing whitespace and blank lines at either end aside; numbers as
printed). Output of training runs differs in late digits from CPU to CPU (XLA
orders its sums by the vector width it finds), so a ```text block whose info
string says ``rtol=R`` compares its numbers to that relative tolerance plus one
unit in the last digit shown (the words exactly). A block that asks for simulated devices (it sets
``--xla_force_host_platform_device_count`` before JAX starts) runs in the
page's namespace on the devices of this process, and again alone in a fresh
interpreter, where it gets them: its output is the fresh one's.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A block that sets this flag prints what it prints on the devices it asks for.
SIMULATED_DEVICES = "--xla_force_host_platform_device_count"
# Groups: the language, an optional ``rtol=R`` after it, the block's text.
FENCE = re.compile(r"^```(\w*)(?: rtol=([0-9.e-]+))?\n(.*?)^```$", flags=re.S | re.M)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?")


class Block(NamedTuple):
  line: int  # of the opening fence, 1-based
  code: str
  printed: str  # stdout while it ran
  shown: str | None  # the ```text block after it, if any
  rtol: float  # for the numbers in ``shown``; 0: as printed


def normalized(text: str) -> str:
  return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip("\n")


def _run_alone(code: str) -> str:
  """stdout of ``code`` in a fresh CPU-only interpreter (the device count is set at JAX's start)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def run_blocks(path: pathlib.Path) -> list[Block]:
  """Runs the page's python blocks in order, in one namespace; each with what it printed."""
  text = path.read_text(encoding="utf-8")
  fences = [
    (m[1], m[3], text.count("\n", 0, m.start()) + 1, float(m[2] or 0)) for m in FENCE.finditer(text)
  ]
  namespace: dict = {"__name__": f"page:{path.name}"}
  out = []
  # A block that asks for simulated devices sets XLA_FLAGS; keep it out of later subprocesses.
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("XLA_FLAGS", "")
    for k, (lang, code, line, _) in enumerate(fences):
      if lang != "python":
        continue
      stdout = io.StringIO()
      with contextlib.redirect_stdout(stdout):
        exec(compile("\n" * line + code, str(path), "exec"), namespace)
      printed = stdout.getvalue()
      if SIMULATED_DEVICES in code:
        # Here JAX has long started on this process's devices; a reader runs it fresh.
        printed = _run_alone(code)
      after = fences[k + 1] if k + 1 < len(fences) else None
      shown = after[1] if after is not None and after[0] == "text" else None
      out.append(Block(line, code, printed, shown, after[3] if shown is not None else 0.0))
  return out


def same_text(printed: str, shown: str, rtol: float) -> bool:
  """Whether ``printed`` is ``shown``: the words exactly, the numbers to ``rtol`` (0: exactly)
  plus one unit in the last digit ``shown`` shows."""
  printed, shown = normalized(printed), normalized(shown)
  if NUMBER.split(printed) != NUMBER.split(shown):
    return False
  if rtol == 0:
    return printed == shown
  pairs = zip(NUMBER.findall(printed), NUMBER.findall(shown), strict=True)
  return all(abs(float(a) - float(b)) <= rtol * abs(float(b)) + _last_digit(b) for a, b in pairs)


def _last_digit(number: str) -> float:
  """One unit in the last digit ``number`` shows (values near a rounding edge round either way)."""
  mantissa, _, exponent = number.lower().partition("e")
  decimals = len(mantissa.partition(".")[2])
  return 10.0 ** (int(exponent or 0) - decimals)


def missing_outputs(path: pathlib.Path, blocks: list[Block]) -> list[str]:
  """For each block that prints with no ```text block after it: the block to add."""
  return [
    f"{path.name} line {b.line} ({b.code.strip().splitlines()[-1][:60]!r}): add after it\n"
    f"```text\n{normalized(b.printed)}\n```"
    for b in blocks
    if b.printed.strip() and b.shown is None
  ]


def mismatches(path: pathlib.Path, blocks: list[Block]) -> list[str]:
  """For each block whose shown output is not what it prints: both."""
  return [
    f"{path.name} line {b.line}: the block prints\n{b.printed}\n"
    f"but the ```text block after it shows\n{b.shown}"
    for b in blocks
    if b.shown is not None and not same_text(b.printed, b.shown, b.rtol)
  ]


def check_page(path: pathlib.Path, *, compare: bool) -> list[Block]:
  """Runs ``path``'s blocks; fails on a printing block without output shown, and (``compare``)
  on a shown output that is not what its block prints. Returns the blocks."""
  blocks = run_blocks(path)
  # Every printing block shows its output, so the comparison cannot pass by having
  # nothing to compare; the message gives the ```text block to add.
  missing = missing_outputs(path, blocks)
  assert not missing, "\n\n".join(missing)
  if compare:
    wrong = mismatches(path, blocks)
    assert not wrong, "\n\n".join(wrong)
  return blocks
