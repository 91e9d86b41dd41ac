"""TFDS builder for IMAGECODE (array_record, no TensorFlow needed).

The manual directory holds the benchmark's layout (train_data.json, valid_data.json,
test_data_unlabeled.json, image-sets/<set>/img<k>.jpg, optionally
manual_annotation_valid.yaml); the builder reads it with `imagecode.read_imagecode_dir` (same
checks, same example ids) and writes one record per description:

  example_id, set_name, description: text    position, label (-1 test): int32
  is_video: bool    tags: [text]    image_names: [10 text]
  image_bytes: [10 bytes]   the candidate files' bytes, verbatim (no re-encoding), in order

Without TensorFlow only this route works (docs/environment.md): `download_and_prepare()` then
`as_data_source()` / `tfds.builder_from_directory(...).as_data_source()`; `tfds.load` and
`as_dataset` need TensorFlow and are not used. The data source returns records in hashed
order, so match them by `example_id`. `TfdsImagecodeSource` turns records into the pipeline's
example records, whose images decode through the same PIL path as files, so a TFDS-backed
training pipeline produces exactly the plain reader's pixels.

Splits present in the manual directory are built: "train", "valid", "test".
Evaluation grouped by set uses the plain reader (images on disk); this builder stores examples.
The manual directory and the output data_dir may be gs:// URLs (tfds_storage: what works
there and how).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from contextblip_jax.data import imagecode, tfds_storage
from contextblip_jax.storage import paths

_INSTRUCTIONS = """\
Put the IMAGECODE files in the manual directory: train_data.json, valid_data.json,
test_data_unlabeled.json (any subset), image-sets/<set_name>/img<k>.jpg (image-sets.zip from
the benchmark's distribution), and optionally manual_annotation_valid.yaml. The synthetic
stand-in (`python -m contextblip_jax.data.synthetic --out DIR`) has the same layout.
"""


@dataclasses.dataclass(eq=False)
class ImagecodeConfig(tfds.core.BuilderConfig):
  on_error: str = "raise"      # imagecode reader policy: "raise" | "skip"
  decode_check: bool = False   # decode every image while building (finds corrupt files)


class ImagecodeBuilder(tfds.core.GeneratorBasedBuilder):
  """IMAGECODE descriptions with their 10 candidate images, from a manual directory."""

  name = "contextblip_imagecode"
  # tfds' default `code_path` lazily imports the `importlib_resources` backport (not a
  # dependency on Python 3.11) for installed packages; point it at this file instead.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One record per description; raw candidate image bytes."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [ImagecodeConfig(name="default", description="raise on bad input"),
                     ImagecodeConfig(name="skip_bad", on_error="skip", decode_check=True,
                                     description="leave out bad entries and corrupt images")]

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description="IMAGECODE (image retrieval from contextual descriptions)",
        features=tfds.features.FeaturesDict({
            "example_id": text, "set_name": text, "description": text,
            "position": tfds.features.Scalar(np.int32),
            "label": tfds.features.Scalar(np.int32),
            "is_video": tfds.features.Scalar(np.bool_),
            "tags": tfds.features.Sequence(tfds.features.Text()),
            "image_names": tfds.features.Sequence(tfds.features.Text(),
                                                  length=imagecode.NUM_CANDIDATES),
            "image_bytes": tfds.features.Sequence(
                tfds.features.Tensor(shape=(), dtype=np.object_),
                length=imagecode.NUM_CANDIDATES),
        }),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    splits = {s: self._generate_examples(manual, s) for s, f in imagecode.SPLIT_FILES.items()
              if paths.exists(paths.join(manual, f))}   # local or gs://
    if not splits:
      raise FileNotFoundError(f"{manual}: none of {sorted(imagecode.SPLIT_FILES.values())}")
    return splits

  def _generate_examples(self, manual_dir: str, split: str):
    cfg = self.builder_config
    data = imagecode.read_imagecode_dir(
        manual_dir, split, check_images="decode" if cfg.decode_check else True,
        on_error=cfg.on_error)
    for e in data.examples:
      images = []
      for p in e.image_paths:
        with paths.open(p, "rb") as f:
          images.append(f.read())
      yield e.example_id, {
          "example_id": e.example_id, "set_name": e.set_name, "description": e.description,
          "position": e.position, "label": e.label, "is_video": e.is_video,
          "tags": list(e.tags), "image_names": [paths.basename(p) for p in e.image_paths],
          "image_bytes": images}


def build(manual_dir: str, data_dir: str, config: str | ImagecodeConfig = "default"
          ) -> ImagecodeBuilder:
  """Builds (once; later calls reuse the files) and returns the builder; `manual_dir` and
  `data_dir` may be gs:// URLs (tfds_storage.build)."""
  return tfds_storage.build(ImagecodeBuilder, manual_dir, data_dir, config)


def as_text(x) -> str:
  """A TFDS text feature (bytes or str) as str."""
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def decode_record(r: dict[str, Any]) -> dict[str, Any]:
  """A data-source record with text as str: example_id, set_name, description, position,
  label, is_video, tags, image_names, image_bytes."""
  return {"example_id": as_text(r["example_id"]), "set_name": as_text(r["set_name"]),
          "description": as_text(r["description"]), "position": int(r["position"]),
          "label": int(r["label"]), "is_video": bool(r["is_video"]),
          "tags": tuple(as_text(t) for t in r["tags"]),
          "image_names": tuple(as_text(t) for t in r["image_names"]),
          "image_bytes": tuple(bytes(b) for b in r["image_bytes"])}


class TfdsImagecodeSource:
  """A built split as pipeline example records {"images": 10 x bytes, "description",
  "label", "is_video", "id"} (for `pipeline.imagecode_train_pipeline`). Picklable."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    r = decode_record(self._source[i])
    return {"images": r["image_bytes"], "description": r["description"], "label": r["label"],
            "is_video": r["is_video"], "id": r["example_id"]}
