"""The README's Python blocks run as written, in order, in one namespace, and print
what the README shows.

A block's shown output is the first fenced block after it when that one is a
```text block (prose may come between). Every block that prints must show its
output, and a shown output must be what the block prints, line for line
(trailing whitespace and blank lines at either end aside; numbers as printed).
Output of training runs differs in late digits from CPU to CPU (XLA orders its
sums by the vector width it finds), so a ```text block whose info string says
``rtol=R`` compares its numbers to that relative tolerance (the words exactly).
The scaling example, which asks for 8 simulated devices, runs here on one device
and again alone in a fresh interpreter, where it gets 8: its output is that one.
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
README = ROOT / "README.md"
# A block that sets this flag (the scaling example) prints what it prints on 8 devices.
SIMULATED_DEVICES = "--xla_force_host_platform_device_count"
FENCE = re.compile(r"^```(\w*)(?: rtol=([0-9.e-]+))?\n(.*?)^```$", flags=re.S | re.M)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?")


class Block(NamedTuple):
  line: int  # of the opening fence, 1-based
  code: str
  printed: str  # stdout while it ran
  shown: str | None  # the ```text block after it, if any
  rtol: float  # for the numbers in ``shown``; 0: as printed


def _normalized(text: str) -> str:
  return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip("\n")


def _run_alone(code: str) -> str:
  """stdout of ``code`` in a fresh CPU-only interpreter (the device count is set at JAX's start)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


@pytest.fixture(scope="module")
def blocks() -> list[Block]:
  text = README.read_text(encoding="utf-8")
  fences = [
    (m[1], m[3], text.count("\n", 0, m.start()) + 1, float(m[2] or 0)) for m in FENCE.finditer(text)
  ]
  namespace: dict = {}
  out = []
  # The scaling example sets XLA_FLAGS; keep it out of later subprocesses.
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("XLA_FLAGS", "")
    for k, (lang, code, line, _) in enumerate(fences):
      if lang != "python":
        continue
      stdout = io.StringIO()
      with contextlib.redirect_stdout(stdout):
        exec(compile("\n" * line + code, str(README), "exec"), namespace)
      printed = stdout.getvalue()
      if SIMULATED_DEVICES in code:
        # Here JAX has long started on one device; a reader runs it fresh, on 8.
        printed = _run_alone(code)
      after = fences[k + 1] if k + 1 < len(fences) else None
      shown = after[1] if after is not None and after[0] == "text" else None
      out.append(Block(line, code, printed, shown, after[3] if shown is not None else 0.0))
  return out


def _same(printed: str, shown: str, rtol: float) -> bool:
  printed, shown = _normalized(printed), _normalized(shown)
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


@pytest.mark.parametrize(
  ("printed", "shown", "rtol", "same"),
  [
    ("λ=0.0692 loss 0.2099", "λ=0.0693 loss 0.2099", 0.01, True),
    ("λ=0.0692 loss 0.2099", "λ=0.0693 loss 0.2099", 0.0, False),
    ("λ=0.0750 loss 0.2099", "λ=0.0693 loss 0.2099", 0.01, False),
    ("dV/dλ +0.004", "dV/dλ +0.005", 0.01, True),
    ("dV/dλ +0.003", "dV/dλ +0.005", 0.01, False),
    ("converged False", "converged True", 0.01, False),
    ("dV/dλ -1.57e-01", "dV/dλ -1.58e-01", 0.01, True),
    ("dV/dλ +1.57e-01", "dV/dλ -1.57e-01", 0.01, False),
  ],
)
def test_rtol_compares_numbers_only(printed, shown, rtol, same):
  assert _same(printed, shown, rtol) is same


def test_readme_python_blocks_run(blocks):
  assert len(blocks) >= 10, "the README's python blocks were not found"


def test_readme_shows_what_each_block_prints(blocks):
  for block in blocks:
    if block.shown is not None:
      assert _same(block.printed, block.shown, block.rtol), (
        f"README.md line {block.line}: the block prints\n{block.printed}\n"
        f"but the ```text block after it shows\n{block.shown}"
      )


def test_every_readme_block_that_prints_shows_its_output(blocks):
  # Fails while a block prints with no ```text block after it: the message gives
  # the block to add (so the comparison above cannot pass by having nothing to compare).
  missing = [
    f"README.md line {b.line} ({b.code.strip().splitlines()[-1][:60]!r}): add after it\n"
    f"```text\n{_normalized(b.printed)}\n```"
    for b in blocks
    if b.printed.strip() and b.shown is None
  ]
  assert not missing, "\n\n".join(missing)


def test_readme_first_lines_are_the_two_commands():
  lines = README.read_text(encoding="utf-8").splitlines()
  commands = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
  assert commands[0].startswith("python3 -m venv .venv") and commands[0].endswith("jaxl2 demo")
  assert commands[1].endswith(".venv/bin/python -m pytest")
