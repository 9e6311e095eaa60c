"""What `verify_penalty` and `verify_update` return: one row per leaf, a verdict, a table."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxl2.reports._table import html_table, shape_cell, text_table

__all__ = ["UNTESTABLE", "Status", "VerifyReport", "VerifyRow"]

Status = Literal[
  "ok", "missing", "unexpected", "scaled", "differs", "unverified", "frozen-decayed", "rounds-away"
]

# The note of an "unverified" row, and the reason the verdict gives for such rows.
UNTESTABLE = "untestable: `base_tx` does not respond to this change of the gradient"


@dataclasses.dataclass(frozen=True)
class VerifyRow:
  """One leaf of a `VerifyReport`.

  Multipliers are in units of the intended per-leaf term (λ/m)·W: a kernel
  the mask selects has ``intended == 1.0``; a bias it leaves out has 0.0.

  Attributes:
    path: the parameter's path (``params/Dense_0/bias``), as in `jaxl2.describe`.
    shape: the leaf's shape.
    status: ``"ok"``; ``"missing"`` (intended but not penalized);
      ``"unexpected"`` (penalized but not intended); ``"scaled"`` (penalized
      with the wrong strength, see ``factor``; also a penalty of the wrong
      form in λ, such as λ²); ``"differs"`` (not proportional to the
      intended term at all); ``"unverified"`` (the decay cannot be observed
      through ``base_tx``, e.g. a sign-based optimizer); ``"frozen-decayed"``
      (``base_tx`` leaves the leaf frozen, a zero update, but ``tx`` decays
      it); ``"rounds-away"`` (the decay per step is below half an ulp of the
      leaf's bf16/fp16 weights, so applying the update loses it).
    intended: the multiplier c_j that the intended ``mask`` gives the leaf.
    found: the multiplier measured in the user's code: the least-squares
      fit of the measured term onto the term of multiplier 1 ((λ/m)·W for a
      penalty; its effect through ``base_tx`` for an update); 0.0 when
      nothing is measured.
    factor: ``found / intended`` for intended leaves, ``found`` for others.
    misfit: ‖measured − fit‖ / ‖measured‖: 0 when proportional.
    note: the diagnosis in words ("λ/m used instead of λ/2m"), or "".
  """

  path: str
  shape: tuple[int, ...]
  status: Status
  intended: float
  found: float
  factor: float
  misfit: float
  note: str = ""


@dataclasses.dataclass(frozen=True)
class VerifyReport:
  """What `verify_penalty` and `verify_update` return.

  ``str(report)`` is a table with one row per floating leaf and a one-line
  verdict; ``report.ok`` is True when every row is ``"ok"``.

  Attributes:
    check: ``"verify_penalty"`` or ``"verify_update"``.
    rows: one `VerifyRow` per floating leaf, in pytree order (integer and
      key leaves cannot be penalized and are left out).
    lam, m: as given.
    rtol: the relative tolerance the rows were judged with.
    batch_size: as given, or ``None``.
    unverified: why nothing could be verified (λ = 0), or "".
  """

  check: str
  rows: tuple[VerifyRow, ...]
  lam: float
  m: float
  rtol: float
  batch_size: int | None = None
  unverified: str = ""

  @property
  def ok(self) -> bool:
    """True when the check could run and every leaf gets exactly what the intended mask says."""
    return not self.unverified and all(row.status == "ok" for row in self.rows)

  @property
  def failures(self) -> tuple[VerifyRow, ...]:
    """The rows whose status is not ``"ok"``."""
    return tuple(row for row in self.rows if row.status != "ok")

  @property
  def verdict(self) -> str:
    """One line: OK, or what is wrong."""
    if self.unverified:
      return f"UNVERIFIED: {self.unverified}"
    if self.ok:
      what = (
        "penalized with (λ/m)·c·W"
        if self.check == "verify_penalty"
        else "decayed as coupled L2 through `base_tx`"
      )
      intended = sum(row.intended > 0 for row in self.rows)
      return (
        f"OK: {intended} of {len(self.rows)} leaves {what}, as intended; the others are left alone."
      )
    return self._failed()

  def _failed(self) -> str:
    """The verdict when some row is not ``"ok"``."""
    failures = self.failures
    if all(row.status == "unverified" for row in failures):
      return (
        f"UNVERIFIED: {len(failures)} of {len(self.rows)} leaves: {UNTESTABLE}; "
        "nothing wrong was found, but nothing was verified there either."
      )
    intended = sum(row.intended > 0 for row in self.rows)
    if intended and len(failures) == intended and all(row.status == "missing" for row in failures):
      penalty = self.check == "verify_penalty"
      verb, cause = (
        ("penalized", "`loss_fn` ignores its `lam`")
        if penalty
        else ("decayed", "`tx` adds no decay")
      )
      return f"FAILED: no leaf is {verb}: a mask that matches nothing? (or {cause})"
    counts: dict[str, int] = {}
    for row in failures:
      counts[row.status] = counts.get(row.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"FAILED: {len(failures)} of {len(self.rows)} leaves wrong ({summary})."

  def raise_if_failed(self) -> None:
    """Raises ValueError with the table unless `ok`.

    Raises:
      ValueError: some leaf is not penalized as intended, or nothing could be
        verified (λ = 0); the message is ``str(self)``, ending with the verdict.
    """
    if not self.ok:
      raise ValueError(str(self))

  def _cells(self) -> tuple[str, tuple[str, ...], list[tuple[str, ...]]]:
    what = (
      "the penalty gradient in `loss_fn` vs (λ/m)·c·W"
      if self.check == "verify_penalty"
      else "the decay in `tx` vs (λ/m)·c·W through `base_tx`"
    )
    title = f"{self.check}: {what}; λ={self.lam:g}, m={self.m:g}, rtol={self.rtol:g}"
    header = ("path", "shape", "intended", "found", "status", "note")
    body = [
      (
        row.path,
        shape_cell(row.shape),
        f"{row.intended:.4g}" if row.intended else "-",
        f"{row.found:.4g}" if row.found else "-",
        row.status,
        row.note,
      )
      for row in self.rows
    ]
    return title, header, body

  def __str__(self) -> str:
    title, header, body = self._cells()
    return text_table(header, body, right={2, 3}, title=[title], footer=[self.verdict])

  def _repr_html_(self) -> str:
    """The report as an HTML table, for Jupyter and Colab."""
    title, header, body = self._cells()
    return html_table(header, body, title=[title], footer=[self.verdict])
