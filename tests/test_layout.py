"""The package's shape (DESIGN.md "Layout", STYLE.md): small modules, small functions, and
private names crossing modules only through the exporting module's ``__all__``."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxl2"
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60  # code lines: docstrings and comments excluded


def _imports(path: pathlib.Path) -> list[tuple[str, str]]:
  """(module, name) for every ``from jaxl2._x import name`` in ``path``, nested ones included."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxl2."):
      out.extend((node.module, alias.name) for alias in node.names)
  return out


def _code_lines(node: ast.AST, source_lines: list[str]) -> int:
  """Lines of ``node`` that hold code: not blank, not comments, not its docstring."""
  doc = set()
  body = getattr(node, "body", [])
  if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
    doc = set(range(body[0].lineno, body[0].end_lineno + 1))
  code = 0
  for n in range(node.lineno, node.end_lineno + 1):
    text = source_lines[n - 1].strip()
    code += n not in doc and bool(text) and not text.startswith("#")
  return code


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_is_small(path):
  lines = len(path.read_text(encoding="utf-8").splitlines())
  assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines (at most {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_functions_are_small(path):
  source = path.read_text(encoding="utf-8")
  lines = source.splitlines()
  long = [
    f"{node.name} ({_code_lines(node, lines)} code lines, line {node.lineno})"
    for node in ast.walk(ast.parse(source))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    and _code_lines(node, lines) > MAX_FUNCTION_LINES
  ]
  assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} code lines: {long}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_cross_module_imports_are_in_all(path):
  # A private name used by another module is part of its module's interface.
  missing = [
    f"{module}.{name}"
    for module, name in _imports(path)
    if name not in getattr(importlib.import_module(module), "__all__", ())
  ]
  assert not missing, f"{path.name} imports names missing from their module's __all__: {missing}"


# `python -m jaxl2` runs the command line on import; it defines nothing to export.
@pytest.mark.parametrize("path", [p for p in MODULES if p.stem != "__main__"], ids=lambda p: p.name)
def test_all_lists_only_defined_names(path):
  module = importlib.import_module(f"jaxl2.{path.stem}" if path.stem != "__init__" else "jaxl2")
  undefined = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
  assert not undefined, f"{path.name} __all__ names what it does not define: {undefined}"


def test_a_planted_violation_is_caught(tmp_path):
  # The checks above must be able to fail: a long function and a stray import.
  bad = tmp_path / "bad.py"
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
  bad.write_text(f"from jaxl2._checks import _describe_value\n\ndef f():\n{body}\n")
  tree = ast.parse(bad.read_text())
  (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
  assert _code_lines(func, bad.read_text().splitlines()) > MAX_FUNCTION_LINES
  ((module, name),) = _imports(bad)
  assert name not in importlib.import_module(module).__all__
