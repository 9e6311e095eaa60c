"""jaxl2 benchmark suite: ``python bench/run.py [--quick] [--suites a,b] [--repeats N]``.

Every figure is a ratio to a baseline measured in the same run (the machines
are noisy): compile excluded from steady times, a warm-up call excluded,
`block_until_ready` on every call, medians of ``--repeats`` calls (fewer for
the long sweep cases, as that suite states; compile-only cases in fresh
processes for the multi-device suite). Results go to
``bench/results/<machine>.json`` and ``.md`` with the versions and machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # `python bench/run.py` from a checkout

SUITES = (
  "penalty",
  "grad",
  "train",
  "peer",
  "sweep",
  "precision",
  "multidevice",
  "verify",
  "hyper",
)


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
  import jax

  device = jax.devices()[0]
  versions = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
    try:
      versions[name] = importlib.import_module(name).__version__
    except ImportError:
      versions[name] = None
  return {
    "platform": device.platform,
    "device": getattr(device, "device_kind", str(device)),
    "cpu": _cpu_model(),
    "cores": os.cpu_count(),
    "versions": versions,
    "date": datetime.date.today().isoformat(),
    "load_average_start": _load_average(),
  }


def _load_average() -> list[float] | None:
  """The 1, 5 and 15-minute load averages: how busy the machine was (other jobs included)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine_name(info: dict[str, Any]) -> str:
  if info["platform"] == "cpu":
    return f"cpu-{info['cores']}core"
  return info["device"].lower().replace(" ", "-")


def targets(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
  """Each target of the issue, with the figure measured and whether it is met."""
  out = []

  def add(name: str, value: float | None, limit: float, unit: str = "x") -> None:
    if value is None:
      return
    out.append(
      {"target": name, "value": value, "limit": limit, "unit": unit, "met": value <= limit}
    )

  rows = {r["case"]: r for r in results.get("penalty", [])}
  if "leaves-2000x1000" in rows:
    r = rows["leaves-2000x1000"]
    add("penalty compile at 2,000 leaves", r["jaxl2_compile_s"], 1.0, "s")
    add("penalty steady at 2,000 leaves vs floor", r["jaxl2_vs_floor"], 1.5)
  if "leaves-1000x1000" in rows:
    r = rows["leaves-1000x1000"]
    add(
      "penalty compile vs naive at 1,000 leaves", r["jaxl2_compile_s"] / r["naive_compile_s"], 0.15
    )
  for case, limit in (("mlp-37M", 1.05), ("resnet50-like", 1.10)):
    if case in rows:
      add(f"penalty steady vs limit, {case}", rows[case]["jaxl2_vs_limit"], limit)
  peers = [("penalty", r) for r in rows.values()]
  peers += [(r["step"], r) for r in results.get("grad", [])]
  for step, r in peers:
    add(f"{step} steady vs best peer, {r['case']}", r["jaxl2_vs_best_peer"], 1.02)
    add(f"{step} compile vs naive, {r['case']}", r["jaxl2_compile_vs_naive"], 1.02)
  for r in results.get("train", []):
    if r["case"].startswith("leaves"):
      add(f"train step with penalty, compile, {r['case']}", r["jaxl2_penalty_compile_ratio"], 1.3)
      add(f"train step with penalty, steady, {r['case']}", r["jaxl2_penalty_ratio"], 1.1)
    else:
      add(f"train step, penalty path, {r['case']}", r["jaxl2_penalty_ratio"], 1.01)
      add(f"train step, transform path, {r['case']}", r["jaxl2_add_l2_grad_ratio"], 1.01)
  for r in results.get("peer", []):
    if "jaxl2_vs_torch" in r:
      add("jaxl2 step vs torch step", r["jaxl2_vs_torch"], 0.85)
  for r in results.get("precision", []):
    add(f"relative error, {r['case']}", r["jaxl2_rel_error"], 1e-6, "")
  for r in results.get("sweep", []):
    if "checkpointed_vs_plain" in r:
      add(f"sweep with checkpoints (default chunks) vs without, {r['case']}",
          r["checkpointed_vs_plain"], 1.05)  # fmt: skip
      continue
    limit = 0.6 if r["case"].startswith("demo") else 1.0
    add(f"sweep16 vs sequential16, steady, {r['case']}", r["sweep_vs_sequential"], limit)
  for r in results.get("multidevice", []):
    if "eight_vs_one" in r:
      add(
        f"8-device compile vs 1 device, {r['leaves']:,} replicated leaves, {r['mesh']} mesh",
        r["eight_vs_one"],
        1.5,
      )
    if "jaxl2_vs_naive" in r:
      add(
        f"8-device compile vs naive, {r['leaves']:,} replicated leaves, {r['mesh']} mesh",
        r["jaxl2_vs_naive"],
        0.15,
      )
  return out


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.3g}"
  return str(value)


def markdown(report: dict[str, Any]) -> str:
  info = report["machine"]
  v = info["versions"]
  lines = [
    f"# jaxl2 benchmarks: {report['name']}",
    "",
    f"{info['device']} ({info['cpu']}, {info['cores']} cores), {info['date']}; "
    f"jax {v['jax']}, flax {v['flax']}, optax {v['optax']}, python {v['python']}"
    + (" (quick sizes)" if report["quick"] else ""),
    "",
    f"Load average (1, 5, 15 min) at the start {info.get('load_average_start')}, "
    f"at the end {info.get('load_average_end')}."
    + (f" {report['note']}" if report.get("note") else ""),
    "",
    "## Targets",
    "",
    "| target | measured | limit | met |",
    "|---|---|---|---|",
  ]
  for t in report["targets"]:
    unit = t["unit"]
    lines.append(
      f"| {t['target']} | {_fmt(t['value'])}{unit} | ≤ {_fmt(t['limit'])}{unit} | "
      f"{'yes' if t['met'] else '**no**'} |"
    )
  for suite, rows in report["results"].items():
    if not rows:
      continue
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines += ["", f"## {suite}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
      lines.append("| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suites", default=",".join(SUITES), help=f"comma list of {SUITES}")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test)")
  parser.add_argument("--repeats", type=int, default=20, help="repeats per steady time (>= 20)")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results", help="result folder")
  parser.add_argument("--note", default="", help="what else ran on the machine, in words")
  args = parser.parse_args(argv)
  chosen = [s.strip() for s in args.suites.split(",") if s.strip()]
  unknown = sorted(set(chosen) - set(SUITES))
  if unknown:
    parser.error(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")

  info = machine()
  name = machine_name(info) + ("-quick" if args.quick else "")
  print(f"jaxl2 bench on {name}: {', '.join(chosen)}", flush=True)
  results = {}
  for suite in chosen:
    module = importlib.import_module(f"bench.suite_{suite}")
    results[suite] = module.run(quick=args.quick, repeats=args.repeats)
  info["load_average_end"] = _load_average()
  report = {
    "name": name,
    "quick": args.quick,
    "note": args.note,
    "machine": info,
    "results": results,
    "targets": targets(results),
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
  (args.out / f"{name}.md").write_text(markdown(report), encoding="utf-8")
  print(f"wrote {args.out / name}.json and .md", flush=True)
  return report


if __name__ == "__main__":
  main()
