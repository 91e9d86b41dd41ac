"""File operations on local paths and on remote URLs (`gs://bucket/dir`, any `scheme://`).

Every file the project reads or writes by a user-given path goes through these functions, so
a workdir, a parameter directory, evaluation outputs or data directories may live in a Google
Cloud Storage bucket. A local path is handled by `os`/`shutil` exactly as before; a URL by
fsspec, which uses `gcsfs` for `gs://` (as etils.epath does without TensorFlow). Orbax
and tensorstore read and write `gs://` themselves.

What differs on GCS (an object store, not a file system):

  * Directories are prefixes: `makedirs` writes nothing, an empty "directory" does not
    exist, `isdir` is true once an object lies under it.
  * A single object is written atomically: it becomes visible, whole, when its upload
    finishes (`atomic_write` uploads a finished local temporary file), so a reader never
    sees half a file; a crash leaves the previous object.
  * Renaming a "directory" copies every object and deletes the originals; it is NOT atomic.
    `storage/atomic.atomic_directory` therefore writes a remote directory under a temporary
    prefix and moves it into place only when complete; a crash during the move can leave a
    partial target, which the writers detect through their marker files (provenance.json,
    commit_success.txt of Orbax) written last.
  * Appending rewrites the object: `open(url, "a")` reads the object and writes it back
    whole when the file is closed (metrics.jsonl is appended in batches, not per line).

Tests point gcsfs/etils at an emulator with STORAGE_EMULATOR_HOST and tensorstore with
TENSORSTORE_GCS_HTTP_URL (tests/test_remote_workdir.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import tempfile
from typing import IO, Any, Iterator


def is_remote(path: Any) -> bool:
  """True for a URL such as gs://bucket/x (anything with '://'), False for a local path."""
  return "://" in os.fspath(path)


def _fs(path: str):
  """The fsspec file system of a URL (gcsfs for gs://) and the path inside it. Its cached
  directory listings are dropped first: other processes (and Orbax/tensorstore, which do not
  go through fsspec) write the same bucket, so a cached listing may be stale."""
  import fsspec                # imported lazily: local runs never need the remote backends
  fs, inner = fsspec.core.url_to_fs(os.fspath(path))
  fs.invalidate_cache()
  return fs, inner


def abspath(path: str) -> str:
  """os.path.abspath(expanduser) for a local path; a URL unchanged but for a trailing '/'."""
  path = os.fspath(path)
  if is_remote(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest) if rest.strip('/') else rest}"
  return os.path.abspath(os.path.expanduser(path))


def realpath(path: str) -> str:
  return abspath(path) if is_remote(path) else os.path.realpath(path)


def join(path: str, *parts: str) -> str:
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: str) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
  path = os.fspath(path)
  return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def _remote(method: str, path: str, *args):
  fs, inner = _fs(path)
  return getattr(fs, method)(inner, *args)


def exists(path: str) -> bool:
  return _remote("exists", path) if is_remote(path) else os.path.exists(path)


def lexists(path: str) -> bool:
  return _remote("exists", path) if is_remote(path) else os.path.lexists(path)


def isdir(path: str) -> bool:
  return _remote("isdir", path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _remote("isfile", path) if is_remote(path) else os.path.isfile(path)


def islink(path: str) -> bool:
  return False if is_remote(path) else os.path.islink(path)


def getsize(path: str) -> int:
  if is_remote(path):
    fs, inner = _fs(path)
    return int(fs.size(inner))
  return os.path.getsize(path)


def listdir(path: str) -> list[str]:
  """The names in a directory (FileNotFoundError when there is none)."""
  if is_remote(path):
    fs, inner = _fs(path)
    if not fs.isdir(inner):
      raise FileNotFoundError(f"no such directory: {path}")
    return [posixpath.basename(c.rstrip("/")) for c in fs.ls(inner, detail=False)]
  return os.listdir(path)


def makedirs(path: str, exist_ok: bool = False) -> None:
  """os.makedirs; on GCS nothing to create (directories are prefixes)."""
  if is_remote(path):
    return
  os.makedirs(path, exist_ok=exist_ok)


def open(path: str, mode: str = "r", encoding: str | None = None) -> IO:   # pylint: disable=redefined-builtin
  """builtins.open; for a URL, the remote file (text modes default to UTF-8)."""
  if not is_remote(path):
    return io.open(path, mode, encoding=encoding)
  if "b" not in mode:
    encoding = encoding or "utf-8"
  fs, inner = _fs(path)
  if "a" in mode:
    return _RemoteAppend(path, mode, encoding)
  # Reads use a plain read-ahead cache: the files read here (images, JSON, weights copied in
  # large chunks) are read whole, front to back, and gcsfs' default adaptive cache starts a
  # background prefetcher (and logs a line) for every file opened.
  kwargs = {"cache_type": "readahead"} if "r" in mode else {}
  if "b" not in mode:
    kwargs["encoding"] = encoding
  return fs.open(inner, mode, **kwargs)


class _RemoteAppend(io.StringIO):
  """Text append to an object: buffers, and on flush/close rewrites the object whole."""

  def __init__(self, path: str, mode: str, encoding: str):
    super().__init__()
    self._path, self._encoding = path, encoding
    self._old = ""
    if exists(path):
      with open(path, "r", encoding=encoding) as f:
        self._old = f.read()
    self._flushed = 0

  def flush(self) -> None:
    value = self.getvalue()
    if len(value) != self._flushed:
      atomic_write_bytes(self._path, (self._old + value).encode(self._encoding))
      self._flushed = len(value)

  def close(self) -> None:
    if not self.closed:
      self.flush()
    super().close()


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` whole (local: temp file + os.replace; GCS: one upload)."""
  with atomic_write(path, "wb") as f:
    f.write(data)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
  """Yields a local temporary file; when the block finishes it replaces `path` (local:
  os.replace; remote: one upload, which GCS makes visible only when complete). When the block
  raises, `path` is left as it was."""
  path = abspath(path)
  encoding = None if "b" in mode else "utf-8"
  if not is_remote(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
  else:
    fd, tmp = tempfile.mkstemp(prefix="contextblip-upload-")
    os.close(fd)
  try:
    with io.open(tmp, mode, encoding=encoding) as f:
      yield f
    if is_remote(path):
      upload(tmp, path)
      os.remove(tmp)
    else:
      os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def upload(local: str, remote: str) -> None:
  """Copies a local file or directory tree to `remote` (a URL; or a local path: a copy)."""
  if not is_remote(remote):
    if os.path.isdir(local):
      shutil.copytree(local, remote, dirs_exist_ok=True)
    else:
      shutil.copyfile(local, remote)
    return
  fs, inner = _fs(remote)
  if os.path.isdir(local):
    for root, _, files in os.walk(local):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
        fs.put_file(os.path.join(root, name), posixpath.join(inner, rel))
  else:
    fs.put_file(local, inner)


def copyfile(src: str, dst: str) -> None:
  """Copies one file; either side may be a URL."""
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  with open(src, "rb") as f:
    atomic_write_bytes(dst, f.read())


def rename(src: str, dst: str) -> None:
  """os.rename; on GCS a copy of every object followed by deleting them (not atomic)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  fs, inner = _fs(src)
  _, inner_dst = _fs(dst)
  if fs.isdir(inner):              # server-side copies (not fs.mv: gcsfs first tries the
    fs.copy(inner.rstrip("/") + "/", inner_dst.rstrip("/") + "/", recursive=True)
    fs.rm(inner, recursive=True)   # moveTo API, which not every server offers, with retries)
  else:
    fs.copy(inner, inner_dst)
    fs.rm_file(inner)


replace = rename


def remove(path: str) -> None:
  if is_remote(path):
    if not exists(path):
      raise FileNotFoundError(path)
    fs, inner = _fs(path)
    fs.rm_file(inner)
    return
  os.remove(path)


def rmtree(path: str, ignore_errors: bool = False) -> None:
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  try:
    fs, inner = _fs(path)
    fs.rm(inner, recursive=True)
  except (OSError, FileNotFoundError):
    if not ignore_errors:
      raise


def create_exclusive(path: str, data: bytes) -> bool:
  """Creates `path` holding `data` only if it does not exist; False when it existed.

  Local: O_CREAT | O_EXCL (fsync'ed). GCS: an upload with the precondition
  `ifGenerationMatch=0` (the object must not exist) through google-cloud-storage, so exactly
  one of two racing writers succeeds; other schemes: an exists-then-write check, which is
  not race-free.
  """
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True
  if path.startswith("gs://"):
    from google.api_core import exceptions as gexc
    from google.cloud import storage as gcs
    bucket, _, name = path[len("gs://"):].partition("/")
    client = gcs.Client()
    try:
      client.bucket(bucket).blob(name).upload_from_string(data, if_generation_match=0)
    except gexc.PreconditionFailed:
      return False
    return True
  if exists(path):
    return False
  atomic_write_bytes(path, data)
  return True


@contextlib.contextmanager
def local_staging(path: str) -> Iterator[str]:
  """For a writer that only writes local files (tensorboardX, matplotlib): yields `path`
  itself when local; for a URL a local temporary directory whose files are uploaded under
  `path` when the block finishes."""
  if not is_remote(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="contextblip-stage-")
  try:
    yield tmp
    upload(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
