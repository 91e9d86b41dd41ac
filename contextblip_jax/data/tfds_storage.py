"""Building and reading the TFDS array_record datasets on local disk or in a bucket (gs://).

What this stack does with a `gs://` data_dir (tensorflow-datasets without TensorFlow, which
goes through etils.epath / gcsfs, and array_record's C++ reader and writer):

  * Writing: array_record's writer opens local files only ("open() failed: No such file or
    directory; opening gs://..."). `build` therefore builds a remote dataset in a local
    temporary directory (it needs the dataset's size free on local disk) and uploads it,
    the record files first and the `dataset_info.json` / `features.json` that make TFDS see
    a finished dataset last, so an interrupted upload is not taken for a built dataset (the
    next `build` deletes the partial folder and builds again).
  * Reading: TFDS reads the dataset's JSON files through gcsfs, and array_record's reader
    opens `gs://` record files itself, through its own Google Cloud Storage client
    (google-cloud-cpp). That client finds credentials the Application Default Credentials
    way (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, the VM's
    service account) and an emulator through CLOUD_STORAGE_EMULATOR_ENDPOINT, not
    STORAGE_EMULATOR_HOST. Without credentials it retries the metadata server for many
    minutes instead of failing, so `data_sources` checks for credentials first and raises
    `RemoteDataError` saying what to do.

The manual (input) directory may be local or a gs:// URL either way.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import tensorflow_datasets as tfds

from contextblip_jax.storage import paths

# Files that make TFDS see a finished dataset (file_utils.is_valid_variant_dir): uploaded last.
_LAST = ("features.json", "dataset_info.json")
Log = Callable[[str], None]


class RemoteDataError(ValueError):
  """A gs:// dataset this process cannot read; the message names the path and what to do."""


def build(builder_cls: type, manual_dir: str, data_dir: str, config: Any,
          log: Log = print) -> tfds.core.DatasetBuilder:
  """Builds `builder_cls` (array_record) from `manual_dir` into `data_dir` once (later calls
  reuse it) and returns the builder reading `data_dir`; either may be a gs:// URL."""
  manual_dir, data_dir = os.fspath(manual_dir), os.fspath(data_dir)
  download = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if not paths.is_remote(data_dir):
    builder = builder_cls(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare(download_config=download)
    return builder
  remote = builder_cls(data_dir=data_dir, config=config, file_format="array_record")
  variant = os.fspath(remote.data_path)
  if all(paths.isfile(paths.join(variant, name)) for name in _LAST):
    log(f"tfds: reusing {variant}")
    return remote
  if paths.exists(variant):
    log(f"tfds: {variant} holds a partial upload (no dataset_info.json); building again")
    paths.rmtree(variant)
  with tempfile.TemporaryDirectory(prefix="contextblip-tfds-") as tmp:
    local = builder_cls(data_dir=tmp, config=config, file_format="array_record")
    local.download_and_prepare(download_config=download)
    upload_dataset(tmp, data_dir, log)
  return builder_cls(data_dir=data_dir, config=config, file_format="array_record")


def upload_dataset(local_dir: str, remote_dir: str, log: Log = print) -> None:
  """Copies a locally built TFDS data_dir tree under `remote_dir`, the files that mark a
  dataset finished (`_LAST`) after all the others."""
  files = []
  for root, _, names in os.walk(local_dir):
    files += [os.path.join(root, n) for n in names]
  files.sort(key=lambda f: (os.path.basename(f) in _LAST, f))
  total = sum(os.path.getsize(f) for f in files)
  log(f"tfds: uploading {len(files)} files ({total / 2**20:,.1f} MiB) to {remote_dir}")
  for f in files:
    rel = os.path.relpath(f, local_dir).replace(os.sep, "/")
    paths.upload(f, paths.join(remote_dir, rel))


def check_readable(data_dir: str) -> None:
  """Raises RemoteDataError when array_record's reader could not open gs:// files here: no
  Google credentials, or a gcsfs emulator (STORAGE_EMULATOR_HOST) without the variable the
  reader uses (CLOUD_STORAGE_EMULATOR_ENDPOINT). Local paths always pass."""
  data_dir = os.fspath(data_dir)
  if not paths.is_remote(data_dir):
    return
  if not data_dir.startswith("gs://"):
    raise RemoteDataError(f"{data_dir}: array_record reads local files and gs:// only; copy "
                          "the dataset folder to local disk")
  advice = (f"or copy the dataset to local disk (gcloud storage cp -r {data_dir} DIR) and "
            "read it from there")
  if os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT"):
    return
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    raise RemoteDataError(
        f"{data_dir}: STORAGE_EMULATOR_HOST is set but array_record's reader finds an emulator "
        "through CLOUD_STORAGE_EMULATOR_ENDPOINT; set that one too, " + advice)
  import google.auth                 # imported lazily: only remote datasets need it
  from google.auth import exceptions as auth_exceptions
  try:
    google.auth.default()
  except auth_exceptions.DefaultCredentialsError as e:
    raise RemoteDataError(
        f"{data_dir}: reading array_record files from gs:// needs Google credentials, and "
        f"none were found ({str(e).splitlines()[0]}); run `gcloud auth application-default "
        "login` or set GOOGLE_APPLICATION_CREDENTIALS, " + advice) from None


def data_sources(data_dir: str) -> dict[str, Any]:
  """{split: random-access data source} of a built dataset folder (the version folder, e.g.
  <data_dir>/contextblip_pairs/default/1.0.0), local or gs:// (checked by check_readable)."""
  check_readable(data_dir)
  return tfds.builder_from_directory(os.fspath(data_dir)).as_data_source()
