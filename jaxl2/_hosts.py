"""Params that span several processes (hosts): which arrays do, and reading a few numbers back.

On a pod every process runs the same program on its own devices, joined by
`jax.distributed.initialize`. A global `jax.Array`, placed with
``jax.device_put(host_value, NamedSharding(mesh, spec))`` over a mesh of
`jax.devices()`, holds only its own shards in each process: its value
cannot be read on one host, and a compiled program may take it as an
argument but not close over it. The reports (`jaxl2.describe`, the verify
checks) therefore reduce such leaves on the devices, in one compiled
program whose outputs are a few numbers per leaf, replicated, so that every
process reads the same numbers and builds the same report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxl2._dtypes import is_inexact

__all__ = ["check_devices", "closed_over_global", "placed_like", "spans_processes", "to_host"]


def spans_processes(x: Any) -> bool:
  """Whether ``x`` is a `jax.Array` with shards on other processes' devices."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def _devices(value: Any) -> frozenset[int] | None:
  """The devices a placed (committed) `jax.Array` is on; None for anything `jax.jit` may place."""
  if isinstance(value, jax.Array) and value.committed:
    return frozenset(d.id for d in value.sharding.device_set)
  return None


def check_devices(
  named: Iterable[tuple[str, Any]], argument: str, *, like: Iterable[tuple[str, Any]] = ()
) -> None:
  """The floating arrays in ``named`` (and ``like``) can enter one compiled program together.

  ``named`` holds (path, value) pairs of the argument ``argument``; ``like``
  (what, value) pairs it goes with, ``what`` said in full ("`params` leaf at 'w'").

  `jax.jit` takes placed (committed) arrays only when all are on one set of
  devices; NumPy values and arrays not placed (``jnp.zeros(...)``) go where
  the others are, taken to be the same in every process. An array placed on
  this process's devices, next to params spread over several processes, is
  the usual way to break this on a pod.

  Raises:
    ValueError: naming ``argument``, the leaf's path, both device sets and the fix.
  """
  first: tuple[str, frozenset[int]] | None = None
  named = [(f"`{argument}` leaf at '{path}'", value) for path, value in named]
  for what, value in [*like, *named]:
    devices = _devices(value) if is_inexact(value) else None
    if devices is None:
      continue
    if first is None:
      first = (what, devices)
    elif devices != first[1]:
      raise ValueError(
        f"{what} is placed on devices {sorted(devices)}, but {first[0]} "
        f"is on devices {sorted(first[1])}: one compiled program cannot take both. Place it as "
        "the others, e.g. `jax.device_put(np.asarray(value), NamedSharding(mesh, P()))` to "
        "replicate it over their mesh, or pass a NumPy array (the same in every process)."
      )


def placed_like(value: np.ndarray, like: Any) -> Any:
  """A host ``value`` (the same in every process) placed as ``like`` when that spans processes."""
  return jax.device_put(value, like.sharding) if spans_processes(like) else value


def to_host(tree: Any) -> Any:
  """A compiled program's small outputs as NumPy, the same in every process.

  Replicated outputs (what reductions to scalars give) are read from a local
  copy; any other that spans processes is gathered, which is cheap for the
  few numbers per leaf that reports read.
  """

  def read(x: Any) -> np.ndarray:
    if spans_processes(x) and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree_util.tree_map(read, tree)


# JAX's message when a compiled function closes over an array it cannot read here.
_CLOSURE = "Closing over jax.Array that spans non-addressable"


@contextlib.contextmanager
def closed_over_global(what: str, fix: str) -> Iterator[None]:
  """Turns JAX's error for a closure over a global array into one naming ``what`` and ``fix``.

  Raises:
    ValueError: ``what`` (a user's function) closes over an array that
      spans several processes.
  """
  try:
    yield
  except RuntimeError as err:
    if _CLOSURE not in str(err):
      raise
    raise ValueError(
      f"{what} closes over a jax.Array that spans several processes, which a compiled program "
      f"cannot capture (JAX: {str(err).split('Got jax.Array: ')[-1]}). {fix}"
    ) from err
