"""Pre-training pairs reader (docs/method.md#pre-training): BLIP / ALBEF `[{"image": path, "caption": str}]`.

Each JSON file (coco.json, vg.json, the synthetic pairs.json) is a list of objects with an
`image` path and a `caption`. Relative image paths are joined to `image_root` (default: the
JSON file's directory); absolute paths are kept. Captions are cleaned with BLIP's
`pre_caption` at 30 words (`tokenizer.pre_caption_blip`).

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


def _check_entry(entry, root, max_words, check_images) -> tuple[str, str, str]:
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
  path = image if os.path.isabs(image) else os.path.join(root, image)
  if check_images == "decode":
    try:
      preprocess.open_rgb(path)
    except preprocess.ImageLoadError as e:
      raise ValueError(str(e)) from e
  elif check_images and not os.path.isfile(path):
    raise ValueError(f"image file not found: {path}")
  return path, cleaned, caption


def read_pairs(json_paths: str | Sequence[str], image_root: str | Sequence[str | None] | None
               = None, *, max_words: int = 30, check_images: bool | str = True,
               on_error: str = "raise") -> PairsData:
  """Reads and concatenates pair files.

  Args:
    json_paths: one path or a list (e.g. [coco.json, vg.json]).
    image_root: root for relative image paths: one for all files or one per file; None
      means each JSON file's own directory.
    max_words: caption word limit of pre_caption_blip (30 in BLIP / ContextBLIP).
    check_images: True: each image file exists; "decode": also decodes it; False: no check.
    on_error: "raise" (PairsDataError) or "skip" (record in `skipped`, log, leave out).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if check_images not in (True, False, "decode"):
    raise ValueError(f"check_images must be True, False or 'decode', got {check_images!r}")
  paths = [json_paths] if isinstance(json_paths, (str, os.PathLike)) else list(json_paths)
  roots = (list(image_root) if isinstance(image_root, (list, tuple))
           else [image_root] * len(paths))
  if len(roots) != len(paths):
    raise ValueError(f"{len(roots)} image roots for {len(paths)} pair files")
  examples, skipped = [], []
  for path, root in zip(paths, roots):
    path = os.fspath(path)
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except FileNotFoundError as e:
      raise PairsDataError(f"{path}: pair file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise PairsDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
      raise PairsDataError(f"{path}: expected a list of {{image, caption}} objects, got "
                           f"{type(data).__name__}")
    name = os.path.basename(path)
    for i, entry in enumerate(data):
      try:
        image, caption, raw = _check_entry(entry, root, max_words, check_images)
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
