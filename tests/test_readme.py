"""The README's Python blocks run as written, in order, in one namespace."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(monkeypatch):
  # The scaling example sets XLA_FLAGS; keep it out of later subprocesses.
  monkeypatch.setenv("XLA_FLAGS", "")
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
  assert blocks, "the README has no python blocks to check"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)


def test_readme_first_lines_are_the_two_commands():
  lines = README.read_text(encoding="utf-8").splitlines()
  commands = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
  assert commands[0].startswith("python3 -m venv .venv") and commands[0].endswith("jaxl2 demo")
  assert commands[1].endswith(".venv/bin/python -m pytest")
