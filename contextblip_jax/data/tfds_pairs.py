"""TFDS builder for pre-training pairs (array_record, no TensorFlow needed).

The manual directory holds the pair JSON files (config `files`, default pairs.json; the
"coco_vg" config reads coco.json + vg.json) and the images their relative paths point to
(joined to the manual directory; absolute paths are kept). The builder reads them with
`pairs.read_pairs` (same checks, captions cleaned by pre_caption_blip at 30 words) and writes
one record per pair:

  pair_id, caption (cleaned), raw_caption, image_name: text
  image_bytes: bytes   the image file, verbatim

Read with `as_data_source()` or `tfds_storage.data_sources(version_dir)` (records in hashed
order: match by `pair_id`); `TfdsPairSource` feeds `pipeline.pretrain_pipeline`. See
tfds_imagecode for the no-TF notes. The manual directory and the output data_dir may be
gs:// URLs (tfds_storage: what works there and how).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from contextblip_jax.data import pairs as pairs_lib
from contextblip_jax.data import tfds_storage
from contextblip_jax.data.tfds_imagecode import as_text
from contextblip_jax.storage import paths


@dataclasses.dataclass(eq=False)
class PairsConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = ("pairs.json",)  # pair JSON files inside the manual directory
  on_error: str = "raise"                   # reader policy: "raise" | "skip"
  max_words: int = 30                       # pre_caption_blip word limit


class PairsBuilder(tfds.core.GeneratorBasedBuilder):
  """(image, caption) pre-training pairs from a manual directory."""

  name = "contextblip_pairs"
  # tfds' default `code_path` lazily imports the `importlib_resources` backport (not a
  # dependency on Python 3.11) for installed packages; point it at this file instead.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One record per pair; raw image bytes."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the pair JSON files ([{\"image\": path, \"caption\": str}]) and the images they "
      "name (paths relative to this directory) in the manual directory.")
  BUILDER_CONFIGS = [PairsConfig(name="default", description="pairs.json"),
                     PairsConfig(name="coco_vg", files=("coco.json", "vg.json"),
                                 description="BLIP's coco.json + vg.json")]

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description="Image-caption pre-training pairs",
        features=tfds.features.FeaturesDict({
            "pair_id": text, "caption": text, "raw_caption": text, "image_name": text,
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir: str):
    cfg = self.builder_config
    data = pairs_lib.read_pairs([paths.join(manual_dir, f) for f in cfg.files], manual_dir,
                                max_words=cfg.max_words, on_error=cfg.on_error)
    for e in data.examples:
      with paths.open(e.image_path, "rb") as f:
        image = f.read()
      yield e.pair_id, {"pair_id": e.pair_id, "caption": e.caption, "raw_caption": e.raw_caption,
                        "image_name": _relative(e.image_path, manual_dir),
                        "image_bytes": image}


def _relative(path: str, root: str) -> str:
  """`path` relative to `root` (local paths as os.path.relpath; URLs under root: the rest)."""
  if paths.is_remote(path) or paths.is_remote(root):
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path
  return os.path.relpath(path, root)


def build(manual_dir: str, data_dir: str, config: str | PairsConfig = "default"
          ) -> PairsBuilder:
  """Builds (once; later calls reuse the files) and returns the builder; `manual_dir` and
  `data_dir` may be gs:// URLs (tfds_storage.build)."""
  return tfds_storage.build(PairsBuilder, manual_dir, data_dir, config)


class TfdsPairSource:
  """A built split as pipeline pair records {"image": bytes, "caption", "id"}. Picklable."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    r = self._source[i]
    return {"image": bytes(r["image_bytes"]), "caption": as_text(r["caption"]),
            "id": as_text(r["pair_id"])}
