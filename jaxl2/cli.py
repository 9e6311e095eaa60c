"""The ``jaxl2`` command line. Argument parsing and checks only; the work lives in the library."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxl2.core._checks import check_lam
from jaxl2.demo._datasets import check_train_size

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
  """An argparse parser whose errors are one line on stderr and exit status 2."""

  def error(self, message: str) -> None:  # type: ignore[override]
    self.exit(2, f"{self.prog}: error: {message}\n")


def _argument_type(parse: Callable[[str], Any], check: Callable[[Any], None]) -> Callable:
  """An argparse type: ``parse`` the text, then the library's own ``check`` of the value."""

  def convert(text: str) -> Any:
    try:
      value = parse(text)
      check(value)
    except ValueError as err:
      raise argparse.ArgumentTypeError(str(err)) from None
    return value

  return convert


def _parse_lambdas(text: str) -> list[float]:
  values = []
  for item in text.split(","):
    try:
      values.append(float(item))
    except ValueError:
      raise ValueError(
        f"λ must be numbers separated by commas (e.g. 0,0.01,0.1,1); got {item.strip()!r}"
      ) from None
  return values


def _check_lambdas(values: list[float]) -> None:
  for value in values:
    check_lam(value, "λ")


def _check_positive(value: int) -> None:
  if value < 1:
    raise ValueError(f"expected a positive integer; got {value}")


def _parse_int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"expected a positive integer; got {text!r}") from None


_lambdas = _argument_type(_parse_lambdas, _check_lambdas)
_positive_int = _argument_type(_parse_int, _check_positive)
_train_size = _argument_type(_parse_int, check_train_size)


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The ``jaxl2`` parser and its ``demo`` subcommand's parser."""
  from jaxl2 import __version__

  parser = _Parser(
    prog="jaxl2",
    description="L2 regularization for JAX: loss + (λ/2m)·Σ‖W‖², verified by autodiff.",
  )
  parser.add_argument("--version", action="version", version=f"jaxl2 {__version__}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  demo = commands.add_parser(
    "demo",
    help="sweep λ for an MLP on scikit-learn's digits; print a table, write JSON and a plot",
    description="Trains one MLP per λ and initialization on a small subset of scikit-learn's "
    "bundled digits set (no download), in one compiled program; chooses λ on half the other "
    "images (validation) and reports the accuracy on the other half (test), which neither "
    "training nor the choice saw, as mean ± std over 3 initializations.",
  )
  demo.add_argument(
    "--lambdas",
    type=_lambdas,
    default=None,
    help="comma-separated λ grid (default: 0 and 9 log-spaced values from 0.001 to 10)",
  )
  demo.add_argument(
    "--train-size",
    type=_train_size,
    default=100,
    help="training images, m (default 100: small enough that λ = 0 overfits)",
  )
  demo.add_argument("--steps", type=_positive_int, default=800, help="Adam steps (default 800)")
  demo.add_argument("--hidden", type=_positive_int, default=256, help="hidden units (default 256)")
  demo.add_argument(
    "--seed", type=int, default=0, help="seed of the split and of the first initialization"
  )
  demo.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path("jaxl2-demo"),
    help="folder for demo.json and demo.png (default ./jaxl2-demo)",
  )
  demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  return parser, demo


def _check_out(parser: argparse.ArgumentParser, out: pathlib.Path) -> None:
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".jaxl2-write-test"
    probe.write_text("", encoding="utf-8")
    probe.unlink()
  except OSError as err:
    parser.error(f"argument --out: cannot write to {str(out)!r}: {err.strerror or err}")


def _use_every_cpu_core() -> None:
  # One CPU "device" per core lets the sweep shard its models over all cores.
  # XLA reads this when the backend starts, so it must be set before any JAX
  # computation; an explicit user setting wins. It does not affect GPU/TPU.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    cores = os.cpu_count() or 1
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cores}".strip()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  parser, demo_parser = _parsers()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help(sys.stdout)
    return 0
  _check_out(demo_parser, args.out)
  _use_every_cpu_core()
  from jaxl2.demo._demo import DEFAULT_LAMBDAS, run_demo

  run_demo(
    lambdas=args.lambdas if args.lambdas is not None else DEFAULT_LAMBDAS,
    train_size=args.train_size,
    steps=args.steps,
    hidden=args.hidden,
    seed=args.seed,
    out=args.out,
    show_progress=not args.no_progress,
  )
  return 0
