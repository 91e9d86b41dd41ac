"""Checkpoints: a thin layer over Orbax `CheckpointManager`.

One checkpoint step directory holds three items:
  state      the train state pytree (params, optimizer state, step, rng), sharded arrays
  data_iter  the Grain iterator state (grain's own Orbax handler), one JSON per process
  meta       a small JSON dict (stage, epoch, best metric so far, ...)

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the
files are written in the background. Orbax writes each step into a temporary directory and
renames it into place only when every item is complete, so a crash or a kill during a save
leaves the previous step as the latest restorable checkpoint (the temporary directory is
ignored, and removed when the next manager opens the directory).

Restores go straight into the target shardings: pass an abstract state (a pytree of
`jax.ShapeDtypeStruct` with `.sharding`, e.g. from `abstract_like`).

`SigtermGuard` turns SIGTERM (a preemption notice) into a flag the training loop polls; the
loop then saves, waits for the save to finish and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp

STATE, DATA_ITER, META = "state", "data_iter", "meta"


def abstract_like(tree: Any) -> Any:
  """Pytree of ShapeDtypeStructs (with shardings) matching concrete or abstract `tree`."""
  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(one, tree)


class Checkpointer:
  """Periodic asynchronous checkpoints of (state, data iterator, meta) under `directory`.

  Args:
    directory: where the step directories go (created if missing).
    save_every: `save(step, ...)` writes only when `step % save_every == 0` (or `force`).
    max_to_keep: the number of most recent steps kept on disk.
    async_save: write in a background thread (`wait()` blocks until written).
  """

  def __init__(self, directory: str, *, save_every: int = 1, max_to_keep: int | None = 2,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain_ckpt.CheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()})

  # -- queries -------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    """The newest complete step on disk, or None."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  # -- save / restore ------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_iter: Any = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (+ iterator state, meta) at `step`.

    Returns True when a save was started (on the interval, or `force`).
    """
    if not force and not self.should_save(step):
      return False
    if step in self._mngr.all_steps():
      return False  # already saved (e.g. the periodic save landed on the final step)
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta or {}))}
    if data_iter is not None:
      items[DATA_ITER] = grain_ckpt.CheckpointSave(data_iter)
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, data_iter: Any = None,
              step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta) at `step` (default: latest) into `abstract_state`'s shardings.

    `data_iter`, when given, is set in place to the saved iterator position.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    if data_iter is not None:
      if not os.path.isdir(os.path.join(self.directory, str(step), DATA_ITER)):
        raise FileNotFoundError(
            f"checkpoint {self.directory}/{step} holds no data iterator state to restore")
      items[DATA_ITER] = grain_ckpt.CheckpointRestore(data_iter)
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return out[STATE], dict(out[META] or {})

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class SigtermGuard:
  """Context manager: SIGTERM sets `requested` instead of killing the process.

  The training loop polls `requested` after each step, saves a checkpoint, waits for it and
  returns. Outside the main thread (where handlers cannot be installed) it is a no-op flag.
  """

  def __init__(self, signals=(signal.SIGTERM,),
               on_signal: Callable[[int], None] | None = None):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._on_signal = on_signal
    self.requested = False

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.requested = True
    if self._on_signal is not None:
      self._on_signal(signum)

  def __enter__(self) -> "SigtermGuard":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, prev in self._previous.items():
      signal.signal(s, prev)
    self._previous.clear()
