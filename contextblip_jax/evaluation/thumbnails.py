"""Small JPEG thumbnails of IMAGECODE candidate images, made once per image.

  thumbs = Thumbnails(out_dir, size=128)
  rel = thumbs.add("/data/image-sets/set_a/img3.jpg", "set_a")   # "thumbs/set_a/img3.jpg"
  made, reused = thumbs.flush()                                 # writes the new ones + index

A thumbnail lies at `<out_dir>/thumbs/<set>/<image stem>.jpg` (the longer side `size` px, JPEG
quality 85). `<out_dir>/thumbs/index.json` records, for each thumbnail, the source file it was
made from with its size and modification time and the thumbnail size; a later run reuses a
thumbnail whose record matches the source as it is now, and remakes the others. Every file is
written atomically (`storage/atomic.py`), the index last, so an interrupted run at worst remakes
some thumbnails. A source that is missing or not an image raises `preprocess.ImageLoadError`,
which names the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from contextblip_jax.data import preprocess
from contextblip_jax.storage import paths
from contextblip_jax.storage.atomic import atomic_file

THUMB_DIR = "thumbs"
INDEX_FILE = "index.json"
DEFAULT_SIZE = 128
JPEG_QUALITY = 85


def source_signature(path: str, size: int) -> dict[str, Any]:
  """What a thumbnail depends on: the source path, its byte size and (local files) its
  modification time in ns, and the thumbnail size. Raises ImageLoadError for a missing file."""
  if not paths.isfile(path):
    raise preprocess.ImageLoadError(path, "no such file")
  sig: dict[str, Any] = {"source": paths.abspath(path), "bytes": paths.getsize(path),
                         "size": int(size)}
  if not paths.is_remote(path):
    sig["mtime_ns"] = os.stat(path).st_mtime_ns
  return sig


def make_thumbnail(src: str, dst: str, size: int = DEFAULT_SIZE) -> None:
  """Writes the thumbnail of `src` (RGB, longer side `size` px) to `dst` as a JPEG."""
  img = preprocess.open_rgb(src)
  img.thumbnail((size, size))
  with atomic_file(dst, "wb") as f:
    img.save(f, format="JPEG", quality=JPEG_QUALITY)


class Thumbnails:
  """The thumbnails of one page's images under `<out_dir>/thumbs`, reused across runs."""

  def __init__(self, out_dir: str, size: int = DEFAULT_SIZE):
    self.out_dir, self.size = out_dir, int(size)
    self.root = paths.join(out_dir, THUMB_DIR)
    self._old = self._read_index()
    self._index: dict[str, dict[str, Any]] = {}
    self._pending: list[tuple[str, str]] = []     # (source, relative thumbnail path)
    self.reused = 0

  def _read_index(self) -> dict[str, dict[str, Any]]:
    path = paths.join(self.root, INDEX_FILE)
    try:
      with paths.open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, ValueError):
      return {}                                  # none yet, or unreadable: remake all
    return data if isinstance(data, dict) else {}

  def add(self, src: str, set_name: str) -> str:
    """The page-relative path of `src`'s thumbnail ('thumbs/<set>/<stem>.jpg'); the image is
    queued unless an up-to-date thumbnail exists. Raises ImageLoadError for a missing file."""
    stem = os.path.splitext(paths.basename(src))[0]
    rel = f"{THUMB_DIR}/{set_name}/{stem}.jpg"
    if rel in self._index:
      return rel
    sig = source_signature(src, self.size)
    self._index[rel] = sig
    if self._old.get(rel) == sig and paths.isfile(paths.join(self.out_dir, rel)):
      self.reused += 1
    else:
      self._pending.append((src, rel))
    return rel

  @property
  def pending(self) -> int:
    return len(self._pending)

  def flush(self, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Makes the queued thumbnails, then writes the index (the old entries of images this
    page no longer uses are kept); returns (made, reused). `progress(done, total)` is called
    after each thumbnail."""
    total = len(self._pending)
    for done, (src, rel) in enumerate(self._pending, 1):
      make_thumbnail(src, paths.join(self.out_dir, rel), self.size)
      if progress:
        progress(done, total)
    self._pending = []
    index = {**self._old, **self._index}
    with atomic_file(paths.join(self.root, INDEX_FILE)) as f:
      json.dump(index, f, indent=0, sort_keys=True)
    self._old = index
    return total, self.reused
