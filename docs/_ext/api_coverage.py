"""Fails the docs build when a name in ``jaxl2.__all__`` has no page (as chex's coverage check).

After every document is read, the Python objects the site documents are those
in Sphinx's ``py`` domain; each public name must be one of them, as
``jaxl2.<name>``. A missing one is an error, with or without ``-W``.
"""

from __future__ import annotations

from typing import Any


def missing_pages(documented: set[str]) -> list[str]:
  """The names of ``jaxl2.__all__`` that are not documented objects, as ``jaxl2.<name>``."""
  import jaxl2

  return sorted(f"jaxl2.{name}" for name in jaxl2.__all__ if f"jaxl2.{name}" not in documented)


def _check(app: Any, env: Any) -> None:
  from sphinx.errors import ExtensionError  # here, so that tests import this file without Sphinx

  missing = missing_pages(set(env.get_domain("py").objects))
  if missing:
    raise ExtensionError(
      f"{len(missing)} public name(s) of jaxl2 have no API page: {', '.join(missing)}. "
      "Add each to docs/api.md (in the autosummary list of its group)."
    )


def setup(app: Any) -> dict[str, Any]:
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
