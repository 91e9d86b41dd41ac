"""`--src` given as a Hugging Face hub id (`Salesforce/blip-itm-base-coco`): resolve it to a
local `BlipForImageTextRetrieval` directory through `huggingface_hub`'s own cache.

  resolve_source("Salesforce/blip-itm-base-coco")
    -> "<HF_HUB_CACHE>/models--Salesforce--blip-itm-base-coco/snapshots/<commit>"

Order: an existing local path is returned unchanged; otherwise a string shaped like a hub id
(`owner/name`, optionally `owner/name@revision`) is looked up in the cache first (no network);
when it is not cached and `HF_HUB_OFFLINE` is not set, `huggingface_hub.snapshot_download`
fetches `config.json` and the safetensors weights (with the hub's progress bars). With no cached
copy and no network (or HF_HUB_OFFLINE=1) a `ConversionError` says which files to download,
with which command, and where to put them (the CLI exits with status 2).

The cache location and HF_HUB_OFFLINE are read from the environment at call time (HF_HUB_CACHE,
else HF_HOME/hub, else huggingface_hub's default), so a caller may set them late.
"""

from __future__ import annotations

import os
import re
from typing import Callable

from weight_convert.loaders import ConversionError

# BLIP image-text matching / retrieval checkpoints on the hub (BlipForImageTextRetrieval). Any
# other id of that architecture works too; these are named in the help and error messages.
KNOWN_IDS = ("Salesforce/blip-itm-base-coco", "Salesforce/blip-itm-large-coco",
             "Salesforce/blip-itm-base-flickr", "Salesforce/blip-itm-large-flickr")
# What the converter reads from a hub directory (loaders.py, 'hf' format).
WEIGHT_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json",
                   "model-*.safetensors"]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")
_TRUE = ("1", "ON", "YES", "TRUE")


def looks_like_hub_id(src: str) -> bool:
  """True for `owner/name[@revision]` that is not an existing local path nor a URL."""
  return (not os.path.exists(src) and "://" not in src and not src.startswith((".", "/", "~"))
          and not src.endswith((".pth", ".pt", ".bin", ".safetensors"))
          and _ID.match(src) is not None)


def hub_cache_dir() -> str:
  """The hub cache directory as huggingface_hub computes it, read from the environment now."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def hub_offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def _has_weights(path: str) -> bool:
  names = set(os.listdir(path))
  return "config.json" in names and any(n.endswith(".safetensors") or n == "pytorch_model.bin"
                                        for n in names)


def download_instructions(repo_id: str, revision: str | None, cache: str) -> str:
  """The sentence telling a user what to fetch, with which command, and where it goes."""
  rev = f" --revision {revision}" if revision else ""
  folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  return (f"download config.json and model.safetensors of {repo_id} on a machine with network "
          f"(`pip install huggingface_hub`, then `hf download {repo_id} config.json "
          f"model.safetensors{rev}`), and copy its cache folder {os.path.basename(folder)} into "
          f"{cache} here (or set HF_HUB_CACHE / HF_HOME to where it is); or save both files from "
          f"https://huggingface.co/{repo_id} into one directory and pass that directory as --src")


def resolve_source(src: str, log: Callable[[str], None] | None = None) -> str:
  """A local path as given, or the cached (or freshly fetched) snapshot of a hub id."""
  if not looks_like_hub_id(src):
    return src
  log = log or (lambda s: None)
  repo_id, _, revision = src.partition("@")
  revision = revision or None
  cache = hub_cache_dir()
  try:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
  except ImportError as e:
    raise ConversionError(
        f"--src {src}: not a local file or directory, and huggingface_hub is not installed to "
        f"look it up as a hub id (pip install -e \".[convert]\"): {e}") from None
  path = None
  try:
    path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                             allow_patterns=WEIGHT_PATTERNS)
  except LocalEntryNotFoundError:
    path = None
  if path is not None and not _has_weights(path):
    path = None   # a snapshot folder without the files the converter reads (e.g. only a README)
  where = f"the Hugging Face cache {cache}"
  if path is None and hub_offline():
    raise ConversionError(f"--src {src}: not a local path and not in {where} (HF_HUB_OFFLINE is "
                          f"set): {download_instructions(repo_id, revision, cache)}")
  if path is None:
    log(f"[0/4] hub: {repo_id} is not in {where}; downloading config.json + safetensors")
    try:
      path = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                               allow_patterns=WEIGHT_PATTERNS)
    except Exception as e:   # network, unknown repo, gated repo: all user-facing
      raise ConversionError(f"--src {src}: not a local path, not in {where}, and the hub could "
                            f"not be reached or refused it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): "
                            f"{download_instructions(repo_id, revision, cache)}") from None
    if not _has_weights(path):
      raise ConversionError(f"--src {src}: the hub snapshot {path} has no config.json with "
                            "safetensors weights; is it a BlipForImageTextRetrieval model?")
  log(f"[0/4] hub: {repo_id} -> {path}")
  return path
