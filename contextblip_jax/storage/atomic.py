"""Writing an output file or directory so that a failure never leaves a partial one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
  """Yields an empty temporary directory beside `out_dir` to write into.

  When the block finishes, the temporary directory becomes `out_dir` by a rename (an existing
  `out_dir` is moved aside first and deleted only after the new one is in place). When the
  block raises, the temporary directory is removed and `out_dir` is left as it was. Callers
  decide beforehand whether replacing an existing `out_dir` is allowed.
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(out_dir)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)                      # mkdtemp creates 0o700
    if os.path.exists(out_dir):
      trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(out_dir, os.path.join(trash, "old"))
      os.rename(tmp, out_dir)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
  """Yields a file open for writing beside `path` that replaces `path` when the block
  finishes (os.replace); when the block raises it is removed and `path` is left as it was."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  try:
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
