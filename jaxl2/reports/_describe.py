"""`describe`: the table of what is penalized, so that it is never a guess."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxl2.core._checks import check_lam, check_m
from jaxl2.core._dtypes import accumulation_dtype, is_inexact, upcast
from jaxl2.core._hosts import spans_processes, to_host
from jaxl2.masks._masks import MaskSpec, resolve
from jaxl2.penalties._setup import l2_from_sq_norm
from jaxl2.reports._table import html_table, shape_cell, text_table

__all__ = ["Description", "LeafRow", "describe"]


@dataclasses.dataclass(frozen=True)
class LeafRow:
  """One leaf of `describe`'s table.

  Attributes:
    path: the parameter's path (``params/Dense_0/kernel``).
    shape: the leaf's shape.
    dtype: the leaf's dtype name.
    size: the number of elements.
    selected: whether the mask selects it (multiplier > 0).
    multiplier: its multiplier on λ (0.0 when not selected).
    sq_norm: ‖W‖² in float64 (Σ|w|² for complex leaves); ``None`` for
      leaves that are not floating (integer counters, RNG keys). For a leaf
      spread over several processes, summed on its devices in float32
      (float64 for a 64-bit leaf): ~1e-7 relative.
    variable: the Flax NNX variable type (``Param``, ``BatchStat``), or "".
    why: the rule that decided ("kernel", "bias", "norm scale", "positional
      embedding", "not an nnx.Param (BatchStat)", "pattern '.*/kernel'",
      "mask" for a mask of your own...).
    aliases: the other paths of a shared Flax NNX Variable (tied weights),
      which is listed, and penalized, once.
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  size: int
  selected: bool
  multiplier: float
  sq_norm: float | None
  variable: str = ""
  why: str = ""
  aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Description:
  """What `describe` returns: the rows as data, and the table as ``str()``.

  Attributes:
    rows: one `LeafRow` per leaf, in pytree order.
    lam, m: as given (``None`` when not given).
    penalty: (λ / 2m) · Σ c_j ‖W_j‖² in float64 when ``lam`` and ``m`` are
      given and something is selected, else ``None``.
  """

  rows: tuple[LeafRow, ...]
  lam: float | None = None
  m: float | None = None
  penalty: float | None = None

  @property
  def n_selected(self) -> int:
    """Number of leaves the mask selects."""
    return sum(row.selected for row in self.rows)

  @property
  def params_selected(self) -> int:
    """Number of scalar parameters in selected leaves."""
    return sum(row.size for row in self.rows if row.selected)

  @property
  def params_total(self) -> int:
    """Number of scalar parameters in all leaves."""
    return sum(row.size for row in self.rows)

  @property
  def weighted_sq_norm(self) -> float:
    """Σ c_j ‖W_j‖² over the selected leaves (float64)."""
    return math.fsum(row.multiplier * (row.sq_norm or 0.0) for row in self.rows if row.selected)

  def _cells(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header = ("path", "shape", "dtype", "size", "selected", "mult", "‖W‖²", "why")
    body = [
      (
        row.path + (f" [{row.variable}]" if row.variable and row.variable != "Param" else ""),
        shape_cell(row.shape),
        row.dtype,
        f"{row.size:,}",
        "yes" if row.selected else "no",
        f"{row.multiplier:g}" if row.selected else "-",
        "-" if row.sq_norm is None else f"{row.sq_norm:.6g}",
        row.why + (f" (also at {', '.join(row.aliases)})" if row.aliases else ""),
      )
      for row in self.rows
    ]
    return header, body

  def _totals(self) -> list[str]:
    total = self.params_total
    share = f" ({100 * self.params_selected / total:.1f}%)" if total else ""
    lines = [
      f"penalized: {self.n_selected} of {len(self.rows)} leaves, "
      f"{self.params_selected:,} of {total:,} parameters{share}",
      f"Σ c·‖W‖² over penalized leaves: {self.weighted_sq_norm:.6g}",
    ]
    if self.rows and not self.n_selected:
      lines.append("nothing is selected: l2_penalty with this mask raises ValueError")
    if self.penalty is not None:
      lines.append(f"penalty (λ/2m)·Σ c·‖W‖² with λ={self.lam:g}, m={self.m:g}: {self.penalty:.6g}")
    return lines

  def __str__(self) -> str:
    header, body = self._cells()
    return text_table(header, body, right={3, 5, 6}, footer=self._totals())

  def _repr_html_(self) -> str:
    """The table as HTML, for Jupyter and Colab."""
    header, body = self._cells()
    return html_table(header, body, footer=self._totals())


def _host_sq_norm(value: Any) -> float:
  """‖W‖² in float64 NumPy: the table's own reference."""
  x = np.asarray(jax.device_get(value))
  x = x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  return float(np.sum(np.abs(x) ** 2)) if np.iscomplexobj(x) else float(np.sum(x * x))


@jax.jit
def _device_sq_norms(values: list[jax.Array]) -> list[jax.Array]:
  # Each leaf reduced where it lives: per-device partial sums, all-reduced to a scalar.
  ups = [upcast(x, accumulation_dtype([x])) for x in values]
  return [jnp.sum(jnp.real(x * jnp.conj(x))) for x in ups]


def _sq_norms(leaves: list[Any]) -> list[float | None]:
  """‖W‖² per leaf (None for a leaf L2 cannot select), the same in every process.

  Leaves that span several processes are reduced on their
  devices in one compiled program (float32 sums, float64 for 64-bit leaves);
  the others in float64 NumPy on the host.
  """
  norms: list[float | None] = [None] * len(leaves)
  on_devices = []
  for i, value in enumerate(leaves):
    if is_inexact(value) and spans_processes(value):
      on_devices.append(i)
    elif is_inexact(value):
      norms[i] = _host_sq_norm(value)
  if on_devices:
    sums = to_host(_device_sq_norms([leaves[i] for i in on_devices]))
    for i, total in zip(on_devices, sums, strict=True):
      norms[i] = float(total)
  return norms


def describe(params: Any, *, mask: MaskSpec = None, lam: Any = None, m: Any = None) -> Description:
  r"""Lists every leaf with whether, and how strongly, it is penalized.

  Uses the same mask resolver as `jaxl2.l2_penalty`, so what it shows is
  what the penalty uses. Norms are computed in float64 with NumPy, so this is
  a tool for concrete params, not for use under `jax.jit`. On params spread
  over several processes (a pod: global arrays over a mesh of
  `jax.devices()`), the leaves that span processes are reduced on their
  devices in one compiled program and only their ‖W‖² reach the host, so
  every process gets the same table; call it in every process, as any
  multi-host program. A mask that selects
  nothing is shown (and flagged) rather than raised, to help find why. A Flax
  NNX Variable referenced at several paths (tied weights) is one row, with
  its other paths under "why"; an Equinox module's non-array fields are rows
  of size 0, "not an array".

  Args:
    params: any pytree of arrays, as for `jaxl2.l2_penalty`.
    mask: as for `jaxl2.l2_penalty`.
    lam, m: optional; when both are given the penalty value is included.

  Returns:
    A `Description`: ``str()`` gives the table, ``.rows`` the data, and
    notebooks show it as an HTML table.

  Example:
    >>> import jax.numpy as jnp, jaxl2
    >>> d = jaxl2.describe({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, lam=1.0, m=2)
    >>> [(r.path, r.selected, r.why) for r in d.rows]
    [('b', False, 'bias'), ('w', True, 'kernel')]
    >>> d.penalty
    1.5
  """
  if (lam is None) != (m is None):
    raise ValueError("`describe` needs both `lam` and `m` to report the penalty, or neither.")
  if lam is not None:
    check_lam(lam)
    check_m(m)
  selection = resolve(params, mask, allow_empty=True)
  norms = _sq_norms([leaf.value for leaf in selection.leaves])
  aliases: dict[str, list[str]] = {}
  for leaf in selection.leaves:
    if leaf.shared_with is not None:
      aliases.setdefault(leaf.shared_with, []).append(leaf.path)
  rows = []
  for leaf, multiplier, why, sq_norm in zip(
    selection.leaves, selection.multipliers, selection.reasons, norms, strict=True
  ):
    if leaf.shared_with is not None:
      continue
    shape = () if leaf.not_array else tuple(np.shape(leaf.value))
    rows.append(
      LeafRow(
        path=leaf.path,
        shape=shape,
        dtype=str(getattr(leaf.value, "dtype", type(leaf.value).__name__)),
        size=0 if leaf.not_array else int(np.prod(shape, dtype=np.int64)),
        selected=multiplier != 0.0,
        multiplier=multiplier,
        sq_norm=None if leaf.not_array else sq_norm,
        variable=leaf.variable.__name__ if leaf.variable is not None else "",
        why=why,
        aliases=tuple(aliases.get(leaf.path, ())),
      )
    )
  description = Description(rows=tuple(rows))
  if lam is not None and description.n_selected:
    penalty = l2_from_sq_norm(description.weighted_sq_norm, lam, m)
    description = dataclasses.replace(description, lam=float(lam), m=float(m), penalty=penalty)
  elif lam is not None:
    description = dataclasses.replace(description, lam=float(lam), m=float(m))
  return description
