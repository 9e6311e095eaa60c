"""The site's contract, checked without building it: every public name has an API entry, the
performance tables are what bench/results holds, and each guide is where the index links."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest

import jaxl2
from tests.markdown_blocks import ROOT

DOCS = ROOT / "docs"


def _extension(name):
  """A module of docs/_ext (imported from its file; Sphinx is not needed to import it)."""
  spec = importlib.util.spec_from_file_location(name, DOCS / "_ext" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _api_entries() -> Counter:
  """The names docs/api.md documents: its autosummary lists and its ``py:data`` entries."""
  text = (DOCS / "api.md").read_text(encoding="utf-8")
  names = Counter()
  for block in re.findall(r"\.\. autosummary::\n(.*?)\n```", text, flags=re.S):
    names.update(line.strip() for line in block.splitlines()[3:] if line.strip())
  names.update(re.findall(r"\.\. py:data:: (\S+)", text))
  return names


def test_api_page_lists_every_public_name_once():
  entries = _api_entries()
  assert not [n for n, k in entries.items() if k > 1], "listed twice in docs/api.md"
  assert set(entries) - set(jaxl2.__all__) == set(), "docs/api.md lists names not in __all__"
  missing = set(jaxl2.__all__) - set(entries)
  assert not missing, f"public names with no entry in docs/api.md: {sorted(missing)}"


def test_the_build_check_names_what_has_no_page():
  # docs/_ext/api_coverage.py fails the Sphinx build on what this returns.
  coverage = _extension("api_coverage")
  documented = {f"jaxl2.{name}" for name in jaxl2.__all__}
  assert coverage.missing_pages(documented) == []
  assert coverage.missing_pages(documented - {"jaxl2.sweep", "jaxl2.TrainState"}) == [
    "jaxl2.TrainState",
    "jaxl2.sweep",
  ]


def _run(name, targets):
  return {"name": name, "quick": False, "machine": {"platform": "cpu"}, "results": {},
          "targets": targets}  # fmt: skip


def test_targets_table_gives_first_run_range_and_count(tmp_path):
  tables = _extension("bench_tables")
  target = {"target": "t", "limit": 1.5, "unit": "x"}
  (tmp_path / "spread").mkdir()
  runs = {"m.json": 1.2, "spread/a.json": 2.0, "spread/b.json": 0.9}
  for path, value in runs.items():
    run = _run("m", [{**target, "value": value, "met": value <= 1.5}])
    (tmp_path / path).write_text(json.dumps(run))
  (tmp_path / "spread" / "other.json").write_text(
    json.dumps(_run("other", [{**target, "value": 99.0, "met": False}]))
  )  # another machine's run: not in m's range
  page = tables.render(tmp_path)
  assert "| t | 1.2x (0.9x–2x over 3 runs) | ≤ 1.5x | 2 of 3 runs |" in page.splitlines()


def test_performance_tables_are_bench_results():
  # Every target of every results file is on the page, with the first run's value and
  # the range over that machine's spread runs, computed here from the JSON.
  tables = _extension("bench_tables")
  page = tables.render()
  results = ROOT / "bench" / "results"
  spread = [json.loads(p.read_text()) for p in sorted((results / "spread").glob("*.json"))]
  checked = 0
  for path in sorted(results.glob("*.json")):
    report = json.loads(path.read_text())
    runs = [report, *[r for r in spread if r["name"] == path.stem]]
    section = page[page.index(f"### {path.stem}\n") :].split("\n### ")[0]
    for target in report.get("targets", []):
      values = [t["value"] for r in runs for t in r["targets"] if t["target"] == target["target"]]
      row = next(
        line for line in section.splitlines() if line.startswith(f"| {target['target']} |")
      )
      cells = [c.strip() for c in row.strip("|").split("|")]
      assert cells[1].startswith(f"{target['value']:.3g}{target['unit']}")
      if len(values) > 1 and f"{min(values):.3g}" != f"{max(values):.3g}":
        unit = target["unit"]
        assert f"({min(values):.3g}{unit}–{max(values):.3g}{unit} over {len(values)} runs)" in row
      checked += 1
  assert checked >= 10
  performance = (DOCS / "guides" / "performance.md").read_text(encoding="utf-8")
  assert "```{include} ../_generated/bench_tables.md" in performance
  assert "| target |" not in performance, "a targets table copied by hand"


@pytest.mark.parametrize("page", sorted((DOCS / "guides").glob("*.md")), ids=lambda p: p.stem)
def test_each_guide_is_in_the_index(page):
  index = (DOCS / "index.md").read_text(encoding="utf-8")
  assert f"\nguides/{page.stem}\n" in index
