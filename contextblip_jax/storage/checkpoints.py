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

A step that cannot be read back (a truncated array file, a missing item directory, garbage
metadata, an empty step directory: disk faults or files edited by hand) is never silently
used: `restore_intact` tries the steps newest first, warns naming each one that fails (its
path and the error), and resumes from the newest one that restores. Falling back is safe
because a step and its data-iterator position reproduce the run exactly from there (the cost
is recomputing the steps after it); the unreadable newer steps are moved to `corrupt_dir`
(kept for inspection, and out of the way of the steps the resumed run saves again). When no
step restores, nothing is moved and `CheckpointRestoreError` names the newest step's path
(e.g. the config changed so the checkpoints no longer fit the state).

`SigtermGuard` turns SIGTERM (a preemption notice) into a flag the training loop polls; the
loop then saves, waits for the save to finish and exits cleanly.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp

from contextblip_jax.storage import paths

STATE, DATA_ITER, META = "state", "data_iter", "meta"


class CheckpointRestoreError(RuntimeError):
  """No checkpoint step could be restored; the message names the step directories."""


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
               async_save: bool = True, corrupt_dir: str | None = None):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 (or None: all), got {max_to_keep}")
    self.directory = paths.abspath(directory)
    self.corrupt_dir = paths.abspath(corrupt_dir or self.directory + "_corrupt")
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
      if not paths.isdir(paths.join(self.directory, str(step), DATA_ITER)):
        raise FileNotFoundError(
            f"checkpoint {self.directory}/{step} holds no data iterator state to restore")
      items[DATA_ITER] = grain_ckpt.CheckpointRestore(data_iter)
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return out[STATE], dict(out[META] or {})

  def restore_intact(self, abstract_state: Any, data_iter: Any = None
                     ) -> tuple[Any, dict[str, Any], int]:
    """(state, meta, step) of the newest step that restores (see the module doc).

    Raises CheckpointRestoreError (naming the paths) when there are steps but none restores.
    """
    bad: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      path = paths.join(self.directory, str(step))
      try:
        state, meta = self.restore(abstract_state, data_iter, step)
      except Exception as e:  # noqa: BLE001 - reported with the path, then the next step
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        logging.warning("checkpoint %s cannot be restored (%s); trying the step before it",
                        path, reason)
        bad.append((step, reason))
        continue
      if bad:
        self._move_aside([b for b, _ in bad])
        logging.warning("checkpoint: resumed from step %d, the newest intact one; unreadable "
                        "newer steps moved to %s: %s", step, self.corrupt_dir,
                        ", ".join(f"{s} ({r})" for s, r in bad))
      return state, meta, step
    if not bad:
      raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    newest, reason = bad[0]
    raise CheckpointRestoreError(
        f"no checkpoint in {self.directory} can be restored; the newest, "
        f"{paths.join(self.directory, str(newest))}, fails with {reason}"
        + (f" ({len(bad) - 1} older steps fail too)" if len(bad) > 1 else "")
        + ". If the config changed since they were written, they do not fit the new state: "
        "start over with --config.train.restart=True (moves them aside) or a new --workdir")

  def _move_aside(self, steps: list[int]) -> None:
    """Moves step directories to corrupt_dir (process 0) and re-reads the step list."""
    if jax.process_index() == 0:
      paths.makedirs(self.corrupt_dir, exist_ok=True)
      for step in steps:
        dest = paths.join(self.corrupt_dir, f"{step}.{int(time.time())}")
        paths.rename(paths.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_move_aside:{self.directory}")
    self._mngr.reload()

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


def silence_shutdown_noise() -> None:
  """Drops the 'Event loop is closed' errors Orbax's asynchronous machinery leaves at
  interpreter exit (its asyncio loop is closed from a background thread; the messages mean
  nothing to a user): a filter on the logging records and on `sys.unraisablehook`. Called by
  the command entry points; once per process."""
  if getattr(silence_shutdown_noise, "done", False):
    return
  silence_shutdown_noise.done = True

  class _Drop(logging.Filter):
    def filter(self, record) -> bool:
      return "Event loop is closed" not in record.getMessage()
  logging.getLogger("asyncio").addFilter(_Drop())
  logging.getLogger().addFilter(_Drop())
  previous = sys.unraisablehook

  def hook(unraisable):
    if "Event loop is closed" not in str(unraisable.exc_value):
      previous(unraisable)
  sys.unraisablehook = hook


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
