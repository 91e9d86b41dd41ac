"""A lock on a workdir, so that two runs never write one workdir at the same time.

`<dir>/LOCK` holds {"pid", "host", "start" (seconds), "argv"}; it is created with
O_CREAT | O_EXCL (exactly one of two racing runs creates it) and removed when the run ends,
normally, by an exception or after SIGTERM (the training loop turns SIGTERM into a clean
return). A run killed with kill -9 leaves the file behind; the next run

  * on the same host, whose process id is no longer alive: removes it (a warning) and goes on;
  * on the same host, whose process is alive: refuses (`WorkdirBusyError` naming the pid);
  * from another host: refuses naming that host (whether its process is alive cannot be
    seen from here) and says to remove the file once no run uses the workdir;
  * unreadable (a crash between creating and writing it): refuses naming the file.

On GCS (a gs:// workdir) the lock is an object created with the precondition "must not
exist" (ifGenerationMatch=0, storage/paths.create_exclusive), so of two racing runs exactly
one creates it there too. Other remote schemes check then write, which is not race-free.

In a multi-process run only process 0 takes the lock (`WorkdirLock(..., enabled=...)`); the
caller makes every process stop when process 0 was refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from typing import Iterator

from contextblip_jax.parallel import distributed
from contextblip_jax.storage import paths

LOCK = "LOCK"


class WorkdirBusyError(RuntimeError):
  """The workdir is locked by another run (or by a lock that cannot be judged stale)."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:          # exists, owned by another user
    return True
  return True


class WorkdirLock:
  """Context manager holding `<directory>/LOCK` for the duration of a run.

  Args:
    directory: the workdir (created if missing).
    enabled: False makes it a no-op (processes other than 0).
  """

  def __init__(self, directory: str, enabled: bool = True):
    self.directory = paths.abspath(directory)
    self.path = paths.join(self.directory, LOCK)
    self.enabled = enabled
    self._held = False

  def acquire(self) -> None:
    if not self.enabled:
      return
    paths.makedirs(self.directory, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "start": time.time(),
              "argv": sys.argv[:8]}
    for _ in range(3):
      if not paths.create_exclusive(self.path, json.dumps(record).encode()):
        self._judge_existing()       # raises, or removed a stale lock: try again
        continue
      self._held = True
      return
    raise WorkdirBusyError(f"{self.path}: could not take the workdir lock (another run keeps "
                           "creating it)")

  def _judge_existing(self) -> None:
    """Removes a stale lock of this host; raises WorkdirBusyError otherwise."""
    try:
      with paths.open(self.path, encoding="utf-8") as f:
        other = json.load(f)
      pid, host = int(other["pid"]), str(other["host"])
    except FileNotFoundError:
      return                                   # released meanwhile
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WorkdirBusyError(
          f"{self.directory} has an unreadable lock file {self.path} ({e}); if no run is "
          f"using this workdir, remove the file and start again") from None
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(other.get("start", 0))))
    if host != socket.gethostname():
      raise WorkdirBusyError(
          f"{self.directory} is locked by process {pid} on host {host} (since {since}); "
          f"if that run is over (e.g. the host was lost), remove {self.path} and start again")
    if pid != os.getpid() and _pid_alive(pid):
      raise WorkdirBusyError(
          f"{self.directory} is in use by process {pid} on this host (since {since}); wait "
          f"for it to finish or stop it (a run stopped with SIGTERM saves and releases the "
          f"lock)")
    logging.warning("%s: removing the stale lock of process %d (no longer running; started "
                    "%s)", self.directory, pid, since)
    try:
      paths.remove(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:
      with paths.open(self.path, encoding="utf-8") as f:
        mine = json.load(f).get("pid") == os.getpid()
    except (OSError, ValueError):
      mine = False
    if mine:
      try:
        paths.remove(self.path)
      except OSError as e:
        if e.errno != errno.ENOENT:
          raise

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold_workdir(directory: str) -> Iterator[WorkdirLock]:
  """Holds the workdir lock for the block: process 0 takes it, and every process raises
  WorkdirBusyError when process 0 could not (one tiny all-gather with several processes)."""
  lock = WorkdirLock(directory, enabled=distributed.is_main_process())
  error = None
  try:
    lock.acquire()
  except WorkdirBusyError as e:
    error = e
  if distributed.any_process(error is not None):
    raise error or WorkdirBusyError(f"{directory}: process 0 could not lock the workdir")
  try:
    yield lock
  finally:
    lock.release()
