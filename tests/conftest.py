"""pytest configuration: hypothesis profiles, and what the Markdown pages' tests compare."""

import os

import pytest
from hypothesis import HealthCheck, settings

# CI runs the property tests at >= 200 examples; locally "dev" keeps them quick.
settings.register_profile(
  "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
  "dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
  parser.addoption(
    "--doc-outputs",
    choices=("compare", "run"),
    default="compare",
    help="compare (default): the Python blocks of README.md and the docs must print what "
    "their ```text blocks show; run: only run them (the floors run, whose float digits "
    "are older releases')",
  )


@pytest.fixture
def doc_outputs(request):
  """ "compare" or "run": what tests/markdown_blocks.py checks of a page's printed output."""
  return request.config.getoption("--doc-outputs")
