"""The performance page's tables, generated from ``bench/results/`` at every build.

Each ``bench/results/<name>.json`` written by ``bench/run.py`` gives a table of
its targets and one table per suite; the runs in ``bench/results/spread/``
with the same machine name add the range over runs to that targets table.
Other result files (``bench/sharding.py``'s) give one table of their rows.
Nothing is copied by hand: the page shows what the JSON files hold.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
GENERATED = ROOT / "docs" / "_generated" / "bench_tables.md"


def fmt(value: Any) -> str:
  """A cell: floats to 3 significant digits, lists joined, None empty, pipes escaped."""
  if value is None:
    return ""
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.3g}"
  if isinstance(value, list):
    return ", ".join(map(fmt, value))
  return str(value).replace("|", "\\|")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  """A Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return lines


def _flat(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as dotted keys (``penalty.median_s``)."""
  out: dict[str, Any] = {}
  for key, value in row.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
  """A table of result rows, one column per key found in any row, in first-seen order."""
  flat = [_flat(row) for row in rows]
  keys = list(dict.fromkeys(k for row in flat for k in row))
  return table(keys, ([fmt(row.get(k)) for k in keys] for row in flat))


def _machine(report: dict[str, Any]) -> str:
  info = report["machine"]
  versions = info.get("versions", info)
  where = f"{info.get('device', info.get('platform'))} ({info.get('cpu', '?')}, "
  when = f"{info.get('cores', '?')} cores), {info.get('date', '?')}; "
  libraries = ", ".join(f"{k} {versions[k]}" for k in ("jax", "flax", "optax") if k in versions)
  return where + when + libraries + (" (quick sizes)" if report.get("quick") else "")


def _measured(target: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str]:
  """(measured cell, met cell): the first run's value and the range and count over ``runs``."""
  unit = target["unit"]
  same = [t for run in runs for t in run.get("targets", []) if t["target"] == target["target"]]
  values = [t["value"] for t in same]
  cell = f"{fmt(target['value'])}{unit}"
  if len(same) == 1:
    cell += " (1 run)"
  elif fmt(min(values)) == fmt(max(values)):
    cell += f" (the same over {len(same)} runs)"
  else:
    cell += f" ({fmt(min(values))}{unit}–{fmt(max(values))}{unit} over {len(same)} runs)"
  met = sum(t["met"] for t in same)
  verdict = "yes" if met == len(same) else "**no**" if met == 0 else f"{met} of {len(same)} runs"
  return cell, verdict


def targets_table(report: dict[str, Any], others: list[dict[str, Any]]) -> list[str]:
  """The report's targets; with ``others`` (more runs of the same suites), their range."""
  runs = [report, *others]
  rows = []
  for target in report["targets"]:
    measured, met = _measured(target, runs)
    rows.append((fmt(target["target"]), measured, f"≤ {fmt(target['limit'])}{target['unit']}", met))
  return table(("target", "measured (first run; range over the runs)", "limit", "met"), rows)


def _report_section(path: pathlib.Path, report: dict[str, Any], spread: list[dict]) -> list[str]:
  """A ``bench/run.py`` report: its machine, targets, then one table per suite."""
  others = [run for run in spread if run.get("name") == path.stem]
  where = f"`bench/results/{path.name}`"
  if others:
    where += f" and {len(others)} more run(s) in `bench/results/spread/`"
  lines = [f"### {path.stem}", "", f"{_machine(report)}. From {where}.", ""]
  lines += ["#### Targets", "", *targets_table(report, others), ""]
  for suite, rows in report["results"].items():
    if rows:
      lines += [f"#### {suite}", "", *rows_table(rows), ""]
  return lines


def _other_section(path: pathlib.Path, report: dict[str, Any]) -> list[str]:
  """Any other result file: what it measured, how, and its rows."""
  lines = [f"### {path.stem}", "", f"From `bench/results/{path.name}`."]
  for key in ("what", "method", "note"):
    if key in report:
      lines += ["", f"*{key}*: {report[key]}"]
  return [*lines, "", *rows_table(report["results"]), ""]


def render(results: pathlib.Path = RESULTS) -> str:
  """The Markdown of every result file in ``results`` (spread runs folded into theirs)."""
  load = lambda p: json.loads(p.read_text(encoding="utf-8"))  # noqa: E731
  spread = [load(p) for p in sorted((results / "spread").glob("*.json"))]
  lines = ["<!-- generated by docs/_ext/bench_tables.py from bench/results; do not edit -->", ""]
  for path in sorted(results.glob("*.json")):
    report = load(path)
    if "targets" in report:
      lines += _report_section(path, report, spread)
    else:
      lines += _other_section(path, report)
  return "\n".join(lines)


def _write(app: Any) -> None:
  GENERATED.parent.mkdir(exist_ok=True)
  text = render()
  if not GENERATED.exists() or GENERATED.read_text(encoding="utf-8") != text:
    GENERATED.write_text(text, encoding="utf-8")


def setup(app: Any) -> dict[str, Any]:
  app.connect("builder-inited", _write)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
