"""Executes the notebooks in place, so that they carry their outputs, and records what ran.

    python notebooks/execute.py                # all three, at full size, on this machine
    python notebooks/execute.py 02_training_on_tpu.ipynb

Run it after editing a notebook. It stores each notebook's outputs (for readers
on GitHub, who see tables and plots without running anything) and, in the
notebook's metadata, the SHA-256 of its code cells' sources: the tests fail
while a notebook's code differs from the code its outputs came from. The tests
also run every notebook at small sizes (``JAXL2_NOTEBOOK_SMALL=1``) and compare
the text outputs of the cells not tagged ``varies`` (tag a cell whose output
depends on the size, the machine or the time) with the stored ones.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import tempfile

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))
# The tag of a cell whose text output depends on the size, the machine or the time.
VARIES = "varies"


def source_hash(nb: nbformat.NotebookNode) -> str:
  """SHA-256 of the notebook's code cells' sources, in order."""
  digest = hashlib.sha256()
  for cell in nb.cells:
    if cell.cell_type == "code":
      digest.update(cell.source.encode("utf-8") + b"\0")
  return digest.hexdigest()


def execute(nb: nbformat.NotebookNode, *, small: bool, timeout: int = 1200) -> None:
  """Runs ``nb`` top to bottom in a fresh kernel, in an empty folder; raises on a cell error."""
  from nbclient import NotebookClient

  env = dict(os.environ)
  env.pop("JAXL2_NOTEBOOK_SMALL", None)
  # Figures as PNG outputs, as in Jupyter and Colab, whatever backend the caller's shell sets.
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  if small:
    env["JAXL2_NOTEBOOK_SMALL"] = "1"
  with tempfile.TemporaryDirectory() as folder:
    client = NotebookClient(
      nb,
      timeout=timeout,
      kernel_name="python3",
      record_timing=False,
      resources={"metadata": {"path": folder}},
    )
    saved = os.environ.copy()
    try:  # the kernel inherits this process's environment
      os.environ.clear()
      os.environ.update(env)
      client.execute()
    finally:
      os.environ.clear()
      os.environ.update(saved)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
  args = parser.parse_args()
  paths = [HERE / name for name in args.names] if args.names else NOTEBOOKS
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    execute(nb, small=False)
    nb.metadata["jaxl2"] = {"source_sha256": source_hash(nb)}
    nbformat.write(nb, path)
    print(f"executed {path.name}")


if __name__ == "__main__":
  main()
