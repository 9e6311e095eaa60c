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
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from jaxl2.core._paths import path_str

__all__ = [
  "HOST_DATA_FIX",
  "check_devices",
  "check_same_everywhere",
  "closed_over_global",
  "from_host",
  "placed_like",
  "placed_on",
  "raise_together",
  "spans_processes",
  "to_host",
  "tree_spans_processes",
]


def spans_processes(x: Any) -> bool:
  """Whether ``x`` is a `jax.Array` with shards on other processes' devices."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def tree_spans_processes(*trees: Any) -> bool:
  """Whether any leaf of ``trees`` spans several processes: their program is then one for all."""
  return any(spans_processes(x) for x in jax.tree_util.tree_leaves(trees))


def _devices(value: Any) -> frozenset[int] | None:
  """The devices a placed (committed) `jax.Array` is on; None for anything `jax.jit` may place."""
  if isinstance(value, jax.Array) and value.committed:
    return frozenset(d.id for d in value.sharding.device_set)
  return None


# How to place an array as the others are (`check_devices`).
PLACE_FIX = (
  "Place it as the others, e.g. `jax.device_put(np.asarray(value), NamedSharding(mesh, P()))` "
  "to replicate it over their mesh, or pass a NumPy array (the same in every process)."
)


def check_devices(
  named: Iterable[tuple[str, Any]],
  argument: str,
  *,
  like: Iterable[tuple[str, Any]] = (),
  fix: str = PLACE_FIX,
) -> None:
  """The arrays in ``named`` (and ``like``) can enter one compiled program together.

  ``named`` holds (path, value) pairs of the argument ``argument``; ``like``
  (what, value) pairs it goes with, ``what`` said in full ("`params` leaf at 'w'");
  ``fix`` says how to place a leaf that is elsewhere.

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
    devices = _devices(value)
    if devices is None:
      continue
    if first is None:
      first = (what, devices)
    elif devices != first[1]:
      raise ValueError(
        f"{what} is placed on devices {sorted(devices)}, but {first[0]} "
        f"is on devices {sorted(first[1])}: one compiled program cannot take both. {fix}"
      )


def placed_like(value: np.ndarray, like: Any) -> Any:
  """A host ``value`` (the same in every process) placed as ``like`` when that spans processes."""
  return jax.device_put(value, like.sharding) if spans_processes(like) else value


# The fix for data that differs between processes (`check_same_everywhere`), or is placed
# away from the model (`check_devices`).
HOST_DATA_FIX = (
  "Pass the same NumPy data in every process, or the data as one global array over the "
  "model's mesh, each process giving its own rows: "
  "`jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local_rows)`."
)


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def from_host(x: Any, sharding: Sharding) -> jax.Array:
  """A value that every process holds alike (NumPy, a number, an array on this process's
  devices) placed on ``sharding``, which may span processes: each process fills its own
  shards from its copy (JAX moves no array between hosts by itself)."""
  if _is_key(x):  # a PRNG key: its raw bits
    data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.device_put(np.asarray(x), sharding)


def placed_on(tree: Any, sharding: Sharding) -> Any:
  """Every leaf of ``tree`` on ``sharding``: arrays that span processes resharded on the
  devices, any other value from the host (`from_host`), taken to be the same in every
  process (`check_same_everywhere` checks it)."""

  def place(x: Any) -> Any:
    if jax.process_count() == 1 or spans_processes(x):
      return jax.device_put(x, sharding)
    return from_host(x, sharding)

  return jax.tree_util.tree_map(place, tree)


def _digest(*parts: Any) -> np.ndarray:
  """Two int32 words of a BLAKE2 digest of ``parts`` (strings and arrays), to all-gather."""
  h = hashlib.blake2b(digest_size=8)
  for part in parts:
    # An array's bytes as they are (no copy); anything else as its text.
    is_array = isinstance(part, np.ndarray)
    h.update(part.reshape(-1).view(np.uint8).data if is_array else str(part).encode())
  return np.frombuffer(h.digest(), np.int32)


def _host_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
  """(path, value) of each leaf that does not span processes, as NumPy."""
  out = []
  for key_path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not spans_processes(x):
      x = np.asarray(jax.random.key_data(x) if _is_key(x) else x)
      out.append((path_str(key_path), np.ascontiguousarray(x)))
  return out


def _first_difference(digests: np.ndarray) -> tuple[int, int] | None:
  """(index, process) of the first entry of an all-gathered (process, index, 2) array of
  digests on which a process differs from process 0; None if all agree."""
  differs = (digests != digests[:1]).any(axis=2)  # (process, index)
  if not differs.any():
    return None
  index = int(np.flatnonzero(differs.any(axis=0))[0])
  return index, int(np.flatnonzero(differs[:, index])[0])


def check_same_everywhere(named: dict[str, Any], fix: str) -> None:
  """Each tree in ``named`` ({argument: tree}) holds the same host values in every process.

  A value that does not span processes (NumPy, a number, an array on this
  process's devices) enters a program that spans processes as one value that
  every process holds alike; JAX neither checks nor moves it, so a process
  holding other values (its own rows of the data) silently computes with them.
  Compares a digest per argument (its structure, shapes and dtypes; its
  values), then per leaf where values differ: all-gathers of a few bytes and
  one pass over the host values. Call it in every process; a no-op on one.

  Raises:
    ValueError: naming the argument, the leaf's path (or its structure), the
      process that differs from process 0, and ``fix``.
  """
  if jax.process_count() == 1:
    return
  names = list(named)
  leaves = [_host_leaves(named[name]) for name in names]
  layouts = [_digest(*((p, x.shape, x.dtype) for p, x in each)) for each in leaves]
  values = [_digest(*(x for _, x in each)) for each in leaves]
  found = _first_difference(np.asarray(multihost_utils.process_allgather(np.stack(layouts))))
  what = "its structure, shapes or dtypes"
  if found is None:
    found = _first_difference(np.asarray(multihost_utils.process_allgather(np.stack(values))))
    if found is None:
      return
    # The same structure everywhere: find the leaf.
    each = leaves[found[0]]
    index, _ = _first_difference(
      np.asarray(multihost_utils.process_allgather(np.stack([_digest(x) for _, x in each])))
    )
    what = f"its leaf at '{each[index][0]}'"
  index, process = found
  raise ValueError(
    f"`{names[index]}` differs between processes: {what} in process {process} and in process 0 "
    "differ. A NumPy array, or an array on one process's devices, enters a program over "
    f"several processes as one value that every process holds alike. {fix}"
  )


def raise_together(error: ValueError | None) -> None:
  """Raises ``error``, and on several processes raises in every process when any has one.

  A check that fails in some processes only (data pinned to a device in one of
  them) must not leave the others waiting in the next collective for peers that
  have stopped: all raise, those that passed naming the first process that did
  not. Call it in every process, where the program spans processes.

  Raises:
    ValueError: ``error``, or the refusal of another process.
  """
  if jax.process_count() > 1:
    flags = multihost_utils.process_allgather(np.array([error is not None], np.int32))
    failed = np.flatnonzero(np.asarray(flags).reshape(-1))
    if error is None and failed.size:
      raise ValueError(
        f"process {int(failed[0])} refused its arguments (its error says which and how to fix "
        "it); every process stops with it rather than wait for it."
      )
  if error is not None:
    raise error


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
