"""The README's Python blocks run as written, in order, in one namespace, and print what the
README shows (the rules: tests/markdown_blocks.py); its first lines are the two commands; its
demo output is what docs/demo.json holds."""

from __future__ import annotations

import json

import pytest

from tests.markdown_blocks import ROOT, check_page, same_text

README = ROOT / "README.md"


def test_readme_runs_and_shows_what_it_prints(doc_outputs):
  blocks = check_page(README, compare=doc_outputs == "compare")
  assert blocks, "the README's python blocks were not found"


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
  # The rule of ```text rtol=R blocks (tests/markdown_blocks.py), for README and guides.
  assert same_text(printed, shown, rtol) is same


def test_readme_is_short_and_links_every_guide():
  # The reference lives in the site (docs/); the README says what jaxl2 is and points there.
  text = README.read_text(encoding="utf-8")
  assert len(text.splitlines()) <= 250
  guides = sorted(p.name for p in (ROOT / "docs" / "guides").glob("*.md"))
  assert [g for g in guides if f"(docs/guides/{g})" not in text] == []
  assert "python -m sphinx -W -b html docs" in text  # how to build the site locally


def test_readme_first_lines_are_the_two_commands():
  lines = README.read_text(encoding="utf-8").splitlines()
  commands = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
  assert commands[0].startswith("python3 -m venv .venv") and commands[0].endswith("jaxl2 demo")
  assert commands[1].endswith(".venv/bin/python -m pytest")


def _demo_text(page: str) -> list[str]:
  """The lines of the ```text block after a page's "## The demo" heading."""
  section = page[page.index("## The demo\n") :]
  start = section.index("```text\n") + len("```text\n")
  return section[start : section.index("```", start)].splitlines()


def test_the_demo_output_shown_is_docs_demo_json():
  # The demo's table and test figures in the README and on the site's index are the run
  # recorded in docs/demo.json, formatted here independently of the demo's own code.
  report = json.loads((ROOT / "docs" / "demo.json").read_text(encoding="utf-8"))
  rows = [
    [
      f"{r['lam']:.4g}",
      f"{r['train_accuracy']:.3f}",
      f"{r['val_accuracy']:.3f}",
      "±",
      f"{r['val_accuracy_std']:.3f}",
      f"{r['weight_sq_norm']:.2f}",
      f"{r['penalty']:.4f}",
    ]
    for r in report["results"]
  ]
  test = report["test"]
  chosen = f"λ = {test['lam']:g} (chosen) {test['accuracy']:.3f} ± {test['std']:.3f}"
  zero = test["unregularized"]
  unregularized = f"λ = 0 (no L2) {zero['accuracy']:.3f} ± {zero['std']:.3f}"
  for page in (README, ROOT / "docs" / "index.md"):
    lines = _demo_text(page.read_text(encoding="utf-8"))
    table = [line.split()[:7] for line in lines[2 : 2 + len(rows)]]
    assert table == rows, f"{page.name}: the demo table is not docs/demo.json's"
    best = lines[2 + [r["lam"] for r in report["results"]].index(report["best_lam"])]
    assert best.endswith("<- chosen (lowest val loss)"), page.name
    flat = [" ".join(line.split()) for line in lines]
    assert chosen in flat and unregularized in flat, f"{page.name}: test accuracy"
    assert f"test accuracy on {test['size']} held-out images" in " ".join(flat)
