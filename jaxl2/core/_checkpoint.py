"""Checkpoints of long runs (`jaxl2.sweep`, `jaxl2.tune_lam`): save after each unit, resume.

A thin layer over orbax (`orbax.checkpoint.CheckpointManager`, flax's own
checkpointing library), which writes each checkpoint into a temporary folder
and renames it only once complete, so a process killed during a save leaves
the previous checkpoint as the latest. Each checkpoint holds the run's arrays
(a pytree, restored onto the shardings of a template) and a small JSON record:
where the run is, and the ``fingerprint`` of the run that wrote it, so that a
directory is never resumed by a different run.
"""

from __future__ import annotations

import os
from typing import Any

import jax

__all__ = ["Checkpointer", "check_checkpoint_dir"]


def check_checkpoint_dir(directory: Any, name: str = "checkpoint_dir") -> str | None:
  """``directory`` as an absolute path (orbax needs one), or None when it is None."""
  if directory is None:
    return None
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(
      f"`{name}` must be a path (str or os.PathLike) or None; got {type(directory).__name__}."
    )
  return os.path.abspath(os.fspath(directory))


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of ``tree``: where a restore puts each array."""
  import orbax.checkpoint as ocp

  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Saves a run's arrays and progress to ``directory``; restores the latest checkpoint.

  Args:
    directory: where the checkpoints go (created if missing); absolute.
    what: the run's name for messages (``"sweep"``, ``"tune_lam"``).
    fingerprint: JSON-able facts that identify the run (its options and
      shapes): a directory written by a run with another fingerprint is an
      error, never silently resumed.
  """

  def __init__(self, directory: str, *, what: str, fingerprint: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    self.directory, self.what, self.fingerprint = directory, what, fingerprint
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def restore(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    """The latest checkpoint's (arrays, progress), shaped and placed as ``like``; None if none.

    The record is read and checked first, so a checkpoint of another run is
    reported as such, never as a shape mismatch of its arrays.

    Raises:
      ValueError: the directory holds a checkpoint of another run.
    """
    import orbax.checkpoint as ocp

    step = self._manager.latest_step()
    if step is None:
      return None
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    meta = dict(meta)
    self._check(meta.pop("fingerprint", None))
    arrays = self._manager.restore(
      step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(_abstract(like)))
    ).arrays
    return arrays, meta

  def _check(self, found: Any) -> None:
    if found == self.fingerprint:
      return
    found = found if isinstance(found, dict) else {}
    keys = sorted(set(found) | set(self.fingerprint))
    diff = [k for k in keys if found.get(k) != self.fingerprint.get(k)]
    shown = "; ".join(f"{k}: saved {found.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in diff)
    raise ValueError(
      f"`checkpoint_dir` {self.directory!r} holds a checkpoint of another {self.what} run "
      f"({shown}). Resume with the same arguments, or pass a new directory."
    )

  def save(self, step: int, arrays: Any, meta: dict[str, Any]) -> None:
    """Checkpoint ``step``, complete on disk when this returns; the last two are kept."""
    import orbax.checkpoint as ocp

    record = {**meta, "fingerprint": self.fingerprint}
    self._manager.save(
      step,
      args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(record)),
    )
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
