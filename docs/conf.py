"""Sphinx configuration of jaxl2's documentation site (myst-nb, as optax and flax use).

Build it from the repository root with

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The guides in ``guides/`` are MyST Markdown whose Python blocks are run by the
test suite (tests/test_guides.py), which compares what each prints with the
```text block shown after it. The three notebooks are copied from
``notebooks/`` and executed here, at the small sizes the tests use. The
performance page's tables are generated from ``bench/results/*.json``.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))  # a checkout's jaxl2 when it is not installed

import jaxl2  # noqa: E402

project = "jaxl2"
author = "jaxl2 authors"
copyright = "jaxl2 authors"
release = version = jaxl2.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "myst_nb",
  "api_coverage",  # fails the build when a name in jaxl2.__all__ has no page
  "bench_tables",  # the performance tables, from bench/results/*.json
]
if os.environ.get("READTHEDOCS"):  # links into the anchors' docs; needs the network
  extensions.append("sphinx.ext.intersphinx")
  intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "jax": ("https://docs.jax.dev/en/latest/", None),
    "optax": ("https://optax.readthedocs.io/en/latest/", None),
    "flax": ("https://flax.readthedocs.io/en/latest/", None),
  }

templates_path = ["_templates"]
exclude_patterns = ["_build", "_generated", "**/.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
# `jaxl2.describe` in a docstring is a link; a name that is not a documented
# object (`m`) stays code, and one that names several (`lam`: TrainState.lam,
# TuneStep.lam, ...) too, without a warning: backticks in docstrings mean code
# first, a link where one is certain.
default_role = "py:obj"
suppress_warnings = ["ref.python"]

# ---- API pages --------------------------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" as a field list of the class, not as attribute objects that would
# duplicate the fields autodoc finds.
napoleon_use_ivar = True
napoleon_attr_annotations = False  # the docstrings say the types in words

# ---- MyST and notebooks ---------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("JAXL2_DOCS_EXECUTE", "force")
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 600
nb_merge_streams = True
# The notebooks at the sizes the test suite runs them at, on the CPU of the build.
os.environ["JAXL2_NOTEBOOK_SMALL"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# ---- HTML -----------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"jaxl2 {version}"
html_static_path = ["_static"]
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
}


def _copy_notebooks() -> None:
  """The notebooks live in notebooks/ (Colab's links point there); Sphinx reads docs/."""
  target = DOCS / "notebooks"
  target.mkdir(exist_ok=True)
  for old in target.glob("*.ipynb"):
    old.unlink()
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copyfile(notebook, target / notebook.name)


_copy_notebooks()


def _escape_bars(app, what, name, obj, options, lines: list[str]) -> None:
  """``|w|`` in a docstring is an absolute value, not a reST substitution: escape its bars.

  Doctest lines (from ``>>>`` to the next blank line) are literal and left as they are.
  """
  in_doctest = False
  for i, line in enumerate(lines):
    stripped = line.strip()
    in_doctest = stripped.startswith(">>>") or (in_doctest and bool(stripped))
    if not in_doctest:
      lines[i] = line.replace("|", "\\|")


def _join_shared_fields(app, what, name, obj, options, lines: list[str]) -> None:
  """``lam, m: as given`` in "Attributes:" (napoleon's ``:ivar lam, m:``) names two fields:
  Sphinx would read "lam," as a type, so the names are joined without the space."""
  for i, line in enumerate(lines):
    match = re.match(r"(\s*:ivar )([\w, ]+?):(.*)", line)
    if match and "," in match[2]:
      lines[i] = f"{match[1]}{match[2].replace(', ', ',')}:{match[3]}"


def _class_signature(app, what, name, obj, options, signature, return_annotation):
  """A class built by jaxl2 (a field named ``_x`` in its signature) shows no constructor."""
  if what == "class" and signature and re.search(r"[(,]\s*_\w", signature):
    return "", None
  return None


def _skip_field_aliases(app, what, name, obj, skip, options) -> bool | None:
  """A NamedTuple's fields are its "Attributes:"; skip their "Alias for field number" twins."""
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return None


def setup(app) -> None:
  app.connect("autodoc-process-docstring", _escape_bars)
  app.connect("autodoc-process-docstring", _join_shared_fields, priority=600)  # after napoleon
  app.connect("autodoc-process-signature", _class_signature)
  app.connect("autodoc-skip-member", _skip_field_aliases)
