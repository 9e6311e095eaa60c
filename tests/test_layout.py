"""The package's shape (DESIGN.md "Layout", STYLE.md): small modules, small functions, and
private names crossing modules only through the exporting module's ``__all__``."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxl2"
MODULES = sorted(PACKAGE.rglob("*.py"))
SUBPACKAGES = sorted({p.parent for p in PACKAGE.glob("*/*.py")})
# The public namespace and the command line; every other module is in a subpackage.
ROOT_MODULES = {"__init__.py", "__main__.py", "cli.py"}
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60  # code lines: docstrings and comments excluded


def _name(path: pathlib.Path) -> str:
  """Test ids and messages: the path under jaxl2/ (``penalties/_reduce.py``)."""
  return path.relative_to(PACKAGE).as_posix()


def _module(path: pathlib.Path) -> str:
  """The dotted name of the module at ``path`` (``jaxl2.penalties._reduce``)."""
  parts = ("jaxl2", *path.relative_to(PACKAGE).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, str]]:
  """(module, name) for each ``from jaxl2.<subpackage>._x import name`` in ``path``, nested too."""
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


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_is_small(path):
  lines = len(path.read_text(encoding="utf-8").splitlines())
  assert lines <= MAX_MODULE_LINES, f"{_name(path)} has {lines} lines (at most {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_functions_are_small(path):
  source = path.read_text(encoding="utf-8")
  lines = source.splitlines()
  long = [
    f"{node.name} ({_code_lines(node, lines)} code lines, line {node.lineno})"
    for node in ast.walk(ast.parse(source))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    and _code_lines(node, lines) > MAX_FUNCTION_LINES
  ]
  assert not long, f"{_name(path)}: functions over {MAX_FUNCTION_LINES} code lines: {long}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_cross_module_imports_are_in_all(path):
  # A private name used by another module is part of its module's interface.
  missing = [
    f"{module}.{name}"
    for module, name in _imports(path)
    if name not in getattr(importlib.import_module(module), "__all__", ())
  ]
  assert not missing, f"{_name(path)} imports names missing from their module's __all__: {missing}"


# `python -m jaxl2` runs the command line on import; it defines nothing to export.
@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__main__.py"], ids=_name)
def test_all_lists_only_defined_names(path):
  module = importlib.import_module(_module(path))
  undefined = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
  assert not undefined, f"{_name(path)} __all__ names what it does not define: {undefined}"


def test_a_planted_violation_is_caught(tmp_path):
  # The checks above must be able to fail: a long function and a stray import.
  bad = tmp_path / "bad.py"
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
  bad.write_text(f"from jaxl2.core._checks import _describe_value\n\ndef f():\n{body}\n")
  tree = ast.parse(bad.read_text())
  (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
  assert _code_lines(func, bad.read_text().splitlines()) > MAX_FUNCTION_LINES
  ((module, name),) = _imports(bad)
  assert name not in importlib.import_module(module).__all__


def test_only_the_namespace_and_the_command_line_sit_at_the_root():
  stray = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_MODULES)
  assert not stray, f"jaxl2/ root holds {stray}: move each into the subpackage of its concept"


@pytest.mark.parametrize("package", SUBPACKAGES, ids=lambda p: p.name)
def test_a_subpackage_says_its_concept(package):
  init = package / "__init__.py"
  assert init.is_file(), f"jaxl2/{package.name}/ has no __init__.py"
  assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), (
    f"jaxl2/{package.name}/__init__.py has no docstring saying what the subpackage holds"
  )


@pytest.mark.parametrize("package", SUBPACKAGES, ids=lambda p: p.name)
def test_no_subpackage_shadows_a_public_name(package):
  # `jaxl2.sweep` is the function, so its folder is `sweeps/` (STYLE.md).
  import jaxl2

  assert package.name not in jaxl2.__all__, f"jaxl2/{package.name}/ shares a public name"


def test_tests_mirror_the_package():
  tests = pathlib.Path(__file__).resolve().parent
  folders = {p.parent for p in tests.glob("*/test_*.py")}
  strays = sorted(f.name for f in folders if not (PACKAGE / f.name / "__init__.py").is_file())
  assert not strays, f"tests/ folders {strays} name no jaxl2 subpackage"
  no_init = sorted(f.name for f in folders if not (f / "__init__.py").is_file())
  assert not no_init, f"tests/ folders {no_init} have no __init__.py"
