"""Writing an output file or directory so that a failure never leaves a partial one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import IO, Any, Callable, Iterator, Sequence

import numpy as np

from contextblip_jax.storage import paths


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
  """Yields an empty temporary directory beside `out_dir` to write into.

  When the block finishes, the temporary directory becomes `out_dir` by a rename (an existing
  `out_dir` is moved aside first and deleted only after the new one is in place). When the
  block raises, the temporary directory is removed and `out_dir` is left as it was. Callers
  decide beforehand whether replacing an existing `out_dir` is allowed.
  """
  out_dir = paths.abspath(out_dir)
  if paths.is_remote(out_dir):
    with _remote_directory(out_dir) as tmp:
      yield tmp
    return
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(out_dir)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)                      # mkdtemp creates 0o700
    if os.path.lexists(out_dir):
      trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(out_dir, os.path.join(trash, "old"))
      try:
        os.rename(tmp, out_dir)
      except BaseException:
        os.rename(os.path.join(trash, "old"), out_dir)   # put the old one back
        os.rmdir(trash)
        raise
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def _remote_directory(out_dir: str) -> Iterator[str]:
  """atomic_directory for a URL: the block writes under the prefix `.<name>.tmp-<random>`
  beside `out_dir`, which replaces `out_dir` (object by object: not atomic, see
  storage/paths.py) only when the block finished."""
  tmp = paths.join(paths.dirname(out_dir),
                   f".{paths.basename(out_dir)}.tmp-{uuid.uuid4().hex[:12]}")
  try:
    yield tmp
    if paths.exists(out_dir):
      paths.rmtree(out_dir)
    paths.rename(tmp, out_dir)
  except BaseException:
    paths.rmtree(tmp, ignore_errors=True)
    raise


def check_replaceable(out_dir: str, sources: Sequence[str], ours: Callable[[str], bool],
                      what: str) -> None:
  """Raises FileExistsError unless `out_dir` may be replaced by an `overwrite` write.

  Allowed: a missing or empty `out_dir`, or a directory `ours(out_dir)` recognises (this project's
  marker) that neither is nor holds any of `sources` (compared after resolving symlinks).
  Refused, naming the directory: one that is or holds a source, a file, and any directory
  without the marker (`what` says which marker was expected).
  """
  out = paths.realpath(out_dir)
  for src in sources:
    s = paths.realpath(src)
    if s == out or s.startswith(out.rstrip(os.sep) + os.sep):
      raise FileExistsError(f"refusing to replace {out_dir}: it {'is' if s == out else 'holds'} "
                            f"the source {src}; choose another output directory")
  if not paths.lexists(out_dir):
    return
  if not paths.isdir(out_dir) or paths.islink(out_dir):
    raise FileExistsError(f"refusing to replace {out_dir}: not a directory this project wrote")
  if paths.listdir(out_dir) and not ours(out_dir):
    raise FileExistsError(f"refusing to replace {out_dir}: it is not {what} (no marker file "
                          f"found), so overwrite could destroy files it did not write; remove "
                          f"it yourself or choose another output directory")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
  """Yields a file open for writing beside `path` that replaces `path` when the block
  finishes (os.replace); when the block raises it is removed and `path` is left as it was.
  For a URL (gs://) the file is local and uploaded whole at the end (storage/paths.py)."""
  with paths.atomic_write(path, mode) as f:
    yield f


def json_default(x: Any) -> Any:
  """`json.dump(..., default=json_default)` of the files a run writes: NumPy values as lists
  or numbers, anything else as its str."""
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return str(x)
