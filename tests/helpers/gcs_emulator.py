"""A local Google Cloud Storage emulator for tests of gs:// paths.

`gcs_emulator()` starts `gcp-storage-emulator` (requirements-dev.txt) on 127.0.0.1 in a
subprocess with one in-memory bucket, `bkt`, and yields an `Emulator`: its `host` URL, `env`
(the variables that point every client at it) and `objects()` (every object name, listed
through the emulator's JSON API). gcsfs/etils and google-cloud-storage find it through
STORAGE_EMULATOR_HOST, tensorstore (Orbax's array store) through TENSORSTORE_GCS_HTTP_URL and
array_record's reader (google-cloud-cpp) through CLOUD_STORAGE_EMULATOR_ENDPOINT.

Two things real GCS does that the emulator does not are added by `_SERVER` below: the
x-goog-generation header on downloads (tensorstore's OCDBT reads it) and the ifGenerationMatch
precondition on uploads (tensorstore's conditional writes and the workdir LOCK).

`use_in_process(em)` also sets `em.env` in this process's os.environ (restored afterwards) for
tests that call the storage functions directly rather than in a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

BUCKET = "bkt"

_SERVER = r'''
import http, sys
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert = objects.download, objects.insert

def _generation(storage, bucket, name):
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"

def download(request, response, storage, *args, **kwargs):
  response["x-goog-generation"] = _generation(storage, request.params["bucket_name"],
                                              request.params["object_id"])
  return _download(request, response, storage, *args, **kwargs)

def insert(request, response, storage, *args, **kwargs):
  want = request.query.get("ifGenerationMatch")
  if want:
    name = (request.query.get("name") or [None])[0] or request.data["meta"].get("name")
    if _generation(storage, request.params["bucket_name"], name) != want[0]:
      response.status = http.HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "conditionNotMet"}})
      return None
  return _insert(request, response, storage, *args, **kwargs)

objects.download, objects.insert = download, insert
from gcp_storage_emulator.server import create_server  # after the patch: its routes bind them
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
'''


@dataclasses.dataclass
class Emulator:
  host: str                   # http://127.0.0.1:<port>
  env: dict[str, str]         # variables pointing gcsfs, etils, google-cloud-storage and
                              # tensorstore at the emulator
  bucket: str = BUCKET

  def objects(self, prefix: str = "") -> list[str]:
    """Every object name in the bucket (under `prefix`), through the JSON API (pages of 1000)."""
    names, token = [], ""
    while True:
      url = (f"{self.host}/storage/v1/b/{self.bucket}/o?maxResults=1000"
             + (f"&pageToken={token}" if token else ""))
      with urllib.request.urlopen(url, timeout=30) as r:
        page = json.load(r)
      names += [o["name"] for o in page.get("items", []) if o["name"].startswith(prefix)]
      token = page.get("nextPageToken")
      if not token:
        return names


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator() -> Iterator[Emulator]:
  """Runs the emulator for the block; stops it (and waits for it) when the block ends."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), BUCKET],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(200):
      try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        break
      except OSError:
        if proc.poll() is not None:
          raise RuntimeError(f"the GCS emulator exited with status {proc.returncode}")
        time.sleep(0.05)
    else:
      raise RuntimeError("the GCS emulator did not start")
    host = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": host, "TENSORSTORE_GCS_HTTP_URL": host,
           "CLOUD_STORAGE_EMULATOR_ENDPOINT": host, "GOOGLE_CLOUD_PROJECT": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}   # its gRPC bucket probe: no emulator
    yield Emulator(host, env)
  finally:
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def use_in_process(em: Emulator) -> Iterator[None]:
  """Sets `em.env` in os.environ for the block (and drops gcsfs' cached clients, which hold
  the endpoint they were made with); restores the previous values afterwards."""
  old = {k: os.environ.get(k) for k in em.env}
  os.environ.update(em.env)
  _clear_fs_cache()
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _clear_fs_cache()


def _clear_fs_cache() -> None:
  import fsspec
  fsspec.get_filesystem_class("gs").clear_instance_cache()
