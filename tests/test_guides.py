"""The site's pages (docs/*.md, docs/guides/*.md) run as written and print what they show.

Each page is a reader's session: its Python blocks run in order, in one
namespace, and each block's printed output must be the ```text block after
it (the rules: tests/markdown_blocks.py). One test per page, so that a page
runs once however the tests are spread over workers.
"""

from __future__ import annotations

import pytest

from tests.markdown_blocks import FENCE, ROOT, check_page

DOCS = ROOT / "docs"
# Hand-written pages; "_"-folders hold what the build generates.
PAGES = sorted(
  p
  for p in DOCS.rglob("*.md")
  if not any(part.startswith("_") for part in p.relative_to(DOCS).parts)
)
WITH_CODE = [
  p for p in PAGES if any(m[1] == "python" for m in FENCE.finditer(p.read_text("utf-8")))
]


def test_every_guide_has_code_that_is_checked():
  guides = {p.name for p in (DOCS / "guides").glob("*.md")}
  assert {"penalized.md", "training.md", "sweeps.md", "verify.md", "sharding.md"} <= guides
  # Every guide with code is run below (the performance page's is a shell session).
  assert guides - {p.name for p in WITH_CODE} == {"performance.md"}


@pytest.mark.parametrize("path", WITH_CODE, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_runs_and_shows_what_it_prints(path, doc_outputs):
  blocks = check_page(path, compare=doc_outputs == "compare")
  assert blocks
