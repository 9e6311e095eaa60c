"""The ``jaxl2`` command line. Argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
  from jaxl2 import __version__

  parser = argparse.ArgumentParser(
    prog="jaxl2",
    description="L2 regularization for JAX: loss + (λ/2m)·Σ‖W‖², verified by autodiff.",
  )
  parser.add_argument("--version", action="version", version=f"jaxl2 {__version__}")
  parser.add_subparsers(dest="command", metavar="COMMAND")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help(sys.stdout)
  return 0
