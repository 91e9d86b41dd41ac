"""Pre-training pairs reader (docs/method.md#pre-training): BLIP / ALBEF `[{"image": path, "caption": str}]`.

Each JSON file (coco.json, vg.json, the synthetic pairs.json) is a list of objects with an
`image` path and a `caption`. Relative image paths are joined to `image_root` (default: the
JSON file's directory); absolute paths and URLs are kept. Captions are cleaned with BLIP's
`pre_caption` at 30 words (`tokenizer.pre_caption_blip`).

The JSON files, the image root and the images may be local or in a bucket (`gs://...`,
through storage/paths.py). For images in a bucket the existence check lists each image
folder once (one listing instead of a request per image).

Bad input raises `PairsDataError` naming the file and entry index, or, with on_error="skip",
is recorded in `PairsData.skipped` (and logged) and left out: a JSON that is not a list of
objects (always raises), a missing / non-string image path, a missing, non-string or
(after cleaning) empty caption, and, with check_images, a missing image file (True) or an
undecodable one ("decode").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Sequence

from contextblip_jax.data import preprocess
from contextblip_jax.data.tokenizer import pre_caption_blip
from contextblip_jax.storage import paths as fs_paths

log = logging.getLogger(__name__)


class PairsDataError(ValueError):
  """Malformed pre-training pair input; the message names the file and entry."""


@dataclasses.dataclass(frozen=True)
class PairExample:
  pair_id: str          # "<json file name>:<index>"
  image_path: str       # absolute or joined with image_root
  caption: str          # after pre_caption_blip(max_words)
  raw_caption: str


@dataclasses.dataclass(frozen=True)
class SkippedPair:
  file: str
  index: int
  reason: str


@dataclasses.dataclass
class PairsData:
  examples: list[PairExample]
  skipped: list[SkippedPair]

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)


class _FileCheck:
  """Whether image files exist: os.path.isfile for local paths; for URLs, membership in
  the listing of the file's folder (listed once per folder and remembered)."""

  def __init__(self):
    self._listings: dict[str, set[str]] = {}

  def __call__(self, path: str) -> bool:
    if not fs_paths.is_remote(path):
      return os.path.isfile(path)
    folder = fs_paths.dirname(path)
    if folder not in self._listings:
      try:
        self._listings[folder] = set(fs_paths.listdir(folder))
      except FileNotFoundError:
        self._listings[folder] = set()
    return fs_paths.basename(path) in self._listings[folder]


def _image_path(image: str, root: str) -> str:
  """`image` when absolute or a URL (whatever `root` is), else joined to `root`."""
  if fs_paths.is_remote(image) or os.path.isabs(image):
    return image
  return fs_paths.join(root, image)


def _check_entry(entry, root, max_words, check_images, exists) -> tuple[str, str, str]:
  """(image_path, caption, raw caption) of one entry; raises ValueError with the reason."""
  if not isinstance(entry, dict):
    raise ValueError(f"expected an object {{image, caption}}, got {type(entry).__name__}")
  image, caption = entry.get("image"), entry.get("caption")
  if not isinstance(image, str) or not image.strip():
    raise ValueError(f"'image' must be a non-empty string, got {image!r}")
  if not isinstance(caption, str):
    raise ValueError(f"'caption' must be a string, got {caption!r}")
  cleaned = pre_caption_blip(caption, max_words)
  if not cleaned:
    raise ValueError(f"caption is empty after cleaning: {caption!r}")
  path = _image_path(image, root)
  if check_images == "decode":
    try:
      preprocess.open_rgb(path)
    except preprocess.ImageLoadError as e:
      raise ValueError(str(e)) from e
  elif check_images and not exists(path):
    raise ValueError(f"image file not found: {path}")
  return path, cleaned, caption


def read_pairs(json_paths: str | Sequence[str], image_root: str | Sequence[str | None] | None
               = None, *, max_words: int = 30, check_images: bool | str = True,
               on_error: str = "raise") -> PairsData:
  """Reads and concatenates pair files.

  Args:
    json_paths: one path or a list (e.g. [coco.json, vg.json]).
    image_root: root for relative image paths: one for all files or one per file; None
      means each JSON file's own directory. Files and roots may be gs:// URLs.
    max_words: caption word limit of pre_caption_blip (30 in BLIP / ContextBLIP).
    check_images: True: each image file exists; "decode": also decodes it; False: no check.
    on_error: "raise" (PairsDataError) or "skip" (record in `skipped`, log, leave out).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if check_images not in (True, False, "decode"):
    raise ValueError(f"check_images must be True, False or 'decode', got {check_images!r}")
  files = [json_paths] if isinstance(json_paths, (str, os.PathLike)) else list(json_paths)
  roots = (list(image_root) if isinstance(image_root, (list, tuple))
           else [image_root] * len(files))
  if len(roots) != len(files):
    raise ValueError(f"{len(roots)} image roots for {len(files)} pair files")
  examples, skipped, exists = [], [], _FileCheck()
  for path, root in zip(files, roots):
    path = os.fspath(path)
    root = os.fspath(root) if root is not None else fs_paths.dirname(fs_paths.abspath(path))
    try:
      with fs_paths.open(path, encoding="utf-8") as f:
        data = json.load(f)
    except FileNotFoundError as e:
      raise PairsDataError(f"{path}: pair file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise PairsDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
      raise PairsDataError(f"{path}: expected a list of {{image, caption}} objects, got "
                           f"{type(data).__name__}")
    name = fs_paths.basename(path)
    for i, entry in enumerate(data):
      try:
        image, caption, raw = _check_entry(entry, root, max_words, check_images, exists)
      except ValueError as e:
        if on_error == "raise":
          raise PairsDataError(f"{path}: entry {i}: {e}") from e
        log.warning("skipping %s entry %d: %s", path, i, e)
        skipped.append(SkippedPair(path, i, str(e)))
        continue
      examples.append(PairExample(f"{name}:{i}", image, caption, raw))
  if skipped:
    log.warning("pairs: skipped %d of %d entries", len(skipped), len(skipped) + len(examples))
  return PairsData(examples, skipped)
