"""The one table layout of every report: aligned text for terminals, HTML for notebooks."""

from __future__ import annotations

import html
from collections.abc import Collection, Sequence

__all__ = ["html_table", "shape_cell", "text_table"]


def text_table(
  header: Sequence[str],
  body: Sequence[Sequence[str]],
  *,
  right: Collection[int] = (),
  title: Sequence[str] = (),
  footer: Sequence[str] = (),
) -> str:
  """Columns padded to their widest cell (``right``: right-aligned), ruled above and below.

  Example:
    >>> print(text_table(("a", "n"), [("x", "1"), ("yy", "22")], right={1}, footer=["2 rows"]))
    a    n
    ------
    x    1
    yy  22
    ------
    2 rows
  """
  widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

  def line(cells: Sequence[str]) -> str:
    padded = [
      cell.rjust(width) if i in right else cell.ljust(width)
      for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(padded).rstrip()

  rule = "-" * max(len(line(row)) for row in [header, *body])
  return "\n".join([*title, line(header), rule, *map(line, body), rule, *footer])


def html_table(
  header: Sequence[str],
  body: Sequence[Sequence[str]],
  *,
  title: Sequence[str] = (),
  footer: Sequence[str] = (),
) -> str:
  """The same table as plain HTML (every cell escaped), for `_repr_html_`.

  Example:
    >>> html_table(("a",), [("<b>",)])
    '<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>&lt;b&gt;</td></tr></tbody></table>'
  """
  top = "".join(f"<p><b>{html.escape(t)}</b></p>" for t in title)
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  rows = "".join(
    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body
  )
  bottom = f"<p>{'<br>'.join(html.escape(f) for f in footer)}</p>" if footer else ""
  return f"{top}<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>{bottom}"


def shape_cell(shape: tuple[int, ...]) -> str:
  """An array shape as a table cell: ``64x10``, or ``()`` for a scalar.

  Example:
    >>> shape_cell((64, 10)), shape_cell(())
    ('64x10', '()')
  """
  return "x".join(map(str, shape)) if shape else "()"
