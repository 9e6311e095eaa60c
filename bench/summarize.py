"""jaxl2 against its peers over runs: ``python bench/summarize.py A.json B.json --out X.md``.

Reads the reports `bench/run.py` wrote (penalty and grad suites) and writes,
per tree and step, jaxl2's steady time over the faster peer's (the median of
round-by-round ratios, and the ratio of the fastest rounds) and its compile
time over the naive sum's (process CPU seconds, and wall seconds): the median
over the runs, the smallest and largest run beside it, and each run's own
steady and CPU compile figures.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

_RATIOS = (
  ("jaxl2_vs_best_peer", "steady, jaxl2 / faster peer"),
  ("jaxl2_vs_best_peer_fastest", "steady, fastest rounds"),
  ("jaxl2_compile_vs_naive", "compile (CPU s), jaxl2 / naive"),
  ("jaxl2_compile_wall_vs_naive", "compile (wall s), jaxl2 / naive"),
)
_LIMIT = 1.02


def _rows(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
  out = {(r["case"], "penalty"): r for r in report["results"].get("penalty", [])}
  out.update({(r["case"], r["step"]): r for r in report["results"].get("grad", [])})
  return out


def _cell(values: list[float]) -> str:
  mid = statistics.median(values)
  flag = "" if mid <= _LIMIT else " **over**"
  return f"{mid:.3f} ({min(values):.3f}-{max(values):.3f}){flag}"


def summary(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
  """The markdown table: one line per (tree, step), medians over the runs."""
  per_run = [_rows(r) for r in reports]
  keys = [k for k in per_run[0] if all(k in rows for rows in per_run)]
  lines = [
    "# jaxl2 vs the faster peer, over runs",
    "",
    f"Runs: {', '.join(names)}. Each cell: the median over the runs (smallest-largest run); "
    f"**over** marks a median above {_LIMIT}.",
    "",
  ]
  for name, report in zip(names, reports, strict=True):
    info = report["machine"]
    lines.append(
      f"- {name}: {info['device']} ({info['cpu']}, {info['cores']} cores), {info['date']}; "
      f"load average at start {info.get('load_average_start')}, at end "
      f"{info.get('load_average_end')}. {report.get('note', '')}".rstrip()
    )
  header = ["tree", "step"] + [label for _, label in _RATIOS] + ["runs (steady / compile)"]
  lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for key in keys:
    rows = [rows[key] for rows in per_run]
    cells = [_cell([r[column] for r in rows]) for column, _ in _RATIOS]
    each = ", ".join(
      f"{r['jaxl2_vs_best_peer']:.3f} / {r['jaxl2_compile_vs_naive']:.3f}" for r in rows
    )
    lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {each} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("reports", nargs="+", type=pathlib.Path, help="bench/run.py JSON reports")
  parser.add_argument("--out", type=pathlib.Path, help="markdown file to write (default: print)")
  args = parser.parse_args(argv)
  reports = [json.loads(p.read_text(encoding="utf-8")) for p in args.reports]
  text = summary(reports, [str(p) for p in args.reports])
  if args.out:
    args.out.write_text(text, encoding="utf-8")
  else:
    sys.stdout.write(text)
  return text


if __name__ == "__main__":
  main()
