"""The `jaxl2` command line."""

from __future__ import annotations

import subprocess
import sys

import jaxl2
from jaxl2.cli import main


def test_version_and_help(capsys):
  assert main([]) == 0
  assert "usage: jaxl2" in capsys.readouterr().out


def test_python_dash_m_runs_the_same_command():
  out = subprocess.run(
    [sys.executable, "-m", "jaxl2", "--version"], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == f"jaxl2 {jaxl2.__version__}"
