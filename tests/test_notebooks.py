"""The notebooks carry the outputs of their current code, run top to bottom at small sizes,
and import only public names.

Each notebook is stored executed (notebooks/execute.py runs it at full size), so a
reader on GitHub sees its tables and plots; its metadata records the SHA-256 of the
code its outputs came from. Here each one runs again at small sizes
(``JAXL2_NOTEBOOK_SMALL=1``), and the text outputs of the cells not tagged
``varies`` must be the stored ones (numbers to rtol 1e-4, plus one unit in the last
digit shown: CPUs round float sums differently).
"""

from __future__ import annotations

import pathlib
import re

import nbformat
import pytest

from notebooks.execute import NOTEBOOKS, VARIES, execute, source_hash
from tests.markdown_blocks import same_text

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_three_notebooks_are_there():
  assert [p.name for p in NOTEBOOKS] == [
    "01_l2_regularization.ipynb",
    "02_training_on_tpu.ipynb",
    "03_l2_vs_weight_decay.ipynb",
  ]


def _text(cell: nbformat.NotebookNode) -> str:
  """A code cell's text outputs: what it printed and the plain text of what it displayed."""
  parts = []
  for out in cell.get("outputs", []):
    if out.output_type == "stream" and out.name == "stdout":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts.append(out.data.get("text/plain", "") + "\n")
  return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_with_the_outputs_of_its_code_and_public_names_only(path):
  nb = nbformat.read(path, as_version=4)
  stored = nb.metadata.get("jaxl2", {}).get("source_sha256")
  assert stored == source_hash(nb), (
    f"{path.name}'s outputs are not those of its code: run `python notebooks/execute.py "
    f"{path.name}` and commit the result"
  )
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.execution_count is not None, f"{path.name}: a cell was not executed"
      assert not re.search(r"jaxl2\._", cell.source), f"{path.name} uses a private jaxl2 name"
      assert not [o for o in cell.outputs if o.output_type == "error"], path.name
  # Readers on GitHub see the plots.
  assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_install_cell_floors_are_pyproject_s():
  # The first code cell keeps the runtime's jax when it meets these floors.
  text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
  floors = {name: re.search(rf'"{name}>=([\d.]+)', text)[1] for name in ("jax", "jaxlib")}
  for path in NOTEBOOKS:
    install = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    shown = dict(re.findall(r'"(jax|jaxlib)": "([\d.]+)"', install.source))
    assert shown == floors, f"{path.name}'s install cell: {shown}, pyproject.toml: {floors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom_and_prints_what_is_stored(path):
  stored = nbformat.read(path, as_version=4)
  nb = nbformat.read(path, as_version=4)
  execute(nb, small=True, timeout=600)  # a cell error raises CellExecutionError
  compared = 0
  for old, new in zip(stored.cells, nb.cells, strict=True):
    if old.cell_type != "code" or VARIES in old.metadata.get("tags", []):
      continue
    assert same_text(_text(new), _text(old), 1e-4), (
      f"{path.name}: a cell printed\n{_text(new)}\nbut the stored output is\n{_text(old)}\n"
      f"(its code:\n{new.source[:300]})"
    )
    compared += 1
  assert compared >= 1  # 02: only its install cell prints the same on every machine
  # `describe` and the verify reports display as HTML tables, not dataclass dumps.
  html = [
    out["data"]["text/html"]
    for cell in nb.cells
    if cell.cell_type == "code"
    for out in cell.get("outputs", [])
    if "text/html" in out.get("data", {})
  ]
  expected = {"01_l2_regularization": "<th>why</th>", "03_l2_vs_weight_decay": "<th>status</th>"}
  if path.stem in expected:
    assert any(
      page.startswith(("<table>", "<p><b>")) and expected[path.stem] in page for page in html
    )
