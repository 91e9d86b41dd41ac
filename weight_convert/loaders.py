"""Safe loading of BLIP / ContextBLIP weights: safetensors, or `torch.load(weights_only=True)`.

Nothing here unpickles arbitrary objects: a `.pth`/`.bin` whose pickle names any global that
torch's weights-only unpickler does not allow (e.g. a `__reduce__` calling `os.system`) is
refused with `UnsafeCheckpointError` before anything in it runs. torch is imported lazily, only
when a torch file is actually read; safetensors files are read with `safetensors.numpy`.

Sources (`detect_format`):
  * 'original': one file (`.pth`, `.pt`, `.bin` or `.safetensors`) with Salesforce BLIP keys
    (`visual_encoder.*`, `text_encoder.*`, ...), at the top level or under "model",
    "model_state_dict" or "state_dict". The authors' ContextBLIP checkpoints of every stage
    (`STAGE_LAYOUTS`, detected from the keys) are read too:
      pretrain  main.py {"model": ...}: `pretrained_blip.*` (BLIP_Base), `vision_adapter.*`,
                the TMIM modules (text_adapter, visual_decoder, decoder_pos_embed, recon_head,
                mask_embed)
      stage1    finetune_notf.py {"model_state_dict": ...}: `blip.pretrained_blip.*`,
                `blip.vision_adapter.*`, `prediction_layer.*`
      stage2    finetune_context.py {"model_state_dict": ...}: `blip.blip.pretrained_blip.*`,
                `blip.blip.vision_adapter.*`, `blip.prediction_layer.*`, `transformer.{i}.*`,
                `positional_emb.weight`
    Their keys are read under canonical names (the stage prefixes and `pretrained_blip.`
    removed). A uniform DDP `module.` prefix is removed.
  * 'hf': a directory holding a `BlipForImageTextRetrieval` `config.json` and `model.safetensors`
    (or a sharded `model.safetensors.index.json`, or `pytorch_model.bin`).

A source in a bucket (`gs://...`) is read through `local_copy`: the file, or the files an HF
directory's loader reads, are copied to a local temporary directory first (the loaders need
real files: torch memory-maps them), with progress lines for large files; error messages name
the gs:// path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from contextblip_jax.storage import paths

BLIP_PREFIX = "pretrained_blip."        # ContextBLIP: BLIP_Base lives under this attribute
WRAPPERS = ("model", "model_state_dict", "state_dict")   # dict keys a state dict may sit under

# How each layout's file keys map to canonical keys: ordered (file prefix, canonical prefix)
# pairs, the first that matches wins; a key matching none keeps its name (and is reported as
# unexpected unless the table uses it or an ignored group names it). `detect` is a file-key
# prefix that only that layout has. The wrapper is the one the authors' code saves under.
STAGE_LAYOUTS: dict[str, dict[str, Any]] = {
    "stage2": dict(detect="blip.blip.", wrapper="model_state_dict", prefixes=(
        ("blip.blip.pretrained_blip.", ""), ("blip.blip.vision_adapter.", "vision_adapter."),
        ("blip.prediction_layer.", "prediction_layer."), ("transformer.", "transformer."),
        ("positional_emb.", "positional_emb."))),
    "stage1": dict(detect="blip.pretrained_blip.", wrapper="model_state_dict", prefixes=(
        ("blip.pretrained_blip.", ""), ("blip.vision_adapter.", "vision_adapter."),
        ("prediction_layer.", "prediction_layer."))),
    "pretrain": dict(detect=BLIP_PREFIX, wrapper="model", prefixes=(
        (BLIP_PREFIX, ""),) + tuple((p, p) for p in (
            "vision_adapter.", "text_adapter.", "visual_decoder.", "decoder_pos_embed.",
            "recon_head.", "mask_embed"))),
}


def stage_layout(keys) -> str:
  """'stage2', 'stage1' or 'pretrain' (a ContextBLIP checkpoint; 'pretrain' also when it has no
  TMIM modules) for file keys holding that layout's prefix; '' for plain BLIP keys."""
  keys = list(keys)
  for name, spec in STAGE_LAYOUTS.items():
    if any(k.startswith(spec["detect"]) for k in keys):
      return name
  return ""


def canonical_key(key: str, layout: str) -> str:
  """File key -> canonical key under `layout` (see STAGE_LAYOUTS)."""
  for file_prefix, canon in STAGE_LAYOUTS[layout]["prefixes"] if layout else ():
    if key.startswith(file_prefix):
      return canon + key[len(file_prefix):]
  return key


def file_key(key: str, layout: str) -> str:
  """Canonical key -> the key the authors' code saves under `layout` (inverse of
  `canonical_key` for the keys the table uses)."""
  if not layout:
    return key
  prefixes = STAGE_LAYOUTS[layout]["prefixes"]
  for file_prefix, canon in prefixes:
    if canon and key.startswith(canon):
      return file_prefix + key[len(canon):]
  blip = next(f for f, c in prefixes if c == "")
  return blip + key
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class ConversionError(ValueError):
  """Any problem with a source checkpoint; the message names the file and key(s)."""


class UnsafeCheckpointError(ConversionError):
  """A pickle that `torch.load(weights_only=True)` refused: it was not executed."""


@dataclasses.dataclass
class SourceState:
  """Source tensors under canonical keys (ContextBLIP `pretrained_blip.` prefix removed).

  `arrays` holds torch tensors or NumPy arrays as read (converted only when used, so the
  momentum encoders and decoder of a pre-train checkpoint never get copied); `names` maps each
  canonical key back to the key in the file, for messages.
  """
  arrays: dict[str, Any]
  names: dict[str, str]
  path: str
  format: str                       # 'original' | 'hf'
  hf_config: dict | None = None     # config.json of an HF directory
  notes: list[str] = dataclasses.field(default_factory=list)
  layout: str = ""                  # STAGE_LAYOUTS name ('pretrain', 'stage1', 'stage2') or ''
  prefix: str = ""                  # a uniform prefix removed from every file key ('module.')

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.arrays[key].shape)

  def numpy(self, key: str) -> np.ndarray:
    """The tensor at canonical `key` as a float32 NumPy array (every target parameter is
    floating point). Raises ConversionError naming the key for an integer / bool tensor (it
    would be silently truncated or reinterpreted) and for NaN / infinite values."""
    x = to_numpy(self.arrays[key])
    if not np.issubdtype(x.dtype, np.floating):
      raise ConversionError(f"{self.path}: tensor {self.name(key)!r} has dtype {x.dtype}, but "
                            f"the parameter it fills is floating point")
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
      raise ConversionError(f"{self.path}: tensor {self.name(key)!r} holds {bad} NaN or "
                            f"infinite values (of {x.size})")
    return x

  def name(self, key: str) -> str:
    """The key in the file for canonical `key` (also for a key the file lacks: where the
    authors' code would have saved it)."""
    if key in self.names:
      return self.names[key]
    return self.prefix + file_key(key, self.layout) if self.format == "original" else key


def to_numpy(x: Any) -> np.ndarray:
  """torch tensor / NumPy array -> NumPy; floating types become float32."""
  if hasattr(x, "detach"):                                   # torch.Tensor (no torch import)
    x = x.detach().cpu()
    if x.is_floating_point():
      x = x.float()
    x = x.numpy()
  x = np.asarray(x)
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except Exception as e:  # noqa: BLE001 - re-raised with the file name
    raise ConversionError(f"{path}: cannot read safetensors file: {e}") from e


def _load_torch(path: str) -> Any:
  """`torch.load(weights_only=True)`; refuses (without running) any pickle naming a global."""
  import pickle
  try:
    import torch  # lazy: only the converter reading a torch file needs torch
  except ImportError as e:
    raise ConversionError(f"{path}: reading a torch checkpoint needs torch (pip install "
                          f"torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu), "
                          f"or convert the file to safetensors first") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f"refused to load {path}: torch.load(weights_only=True) rejected it, so it is not a "
        f"plain tensor checkpoint and nothing in it was executed. Re-save only the state dict "
        f"(torch.save(model.state_dict(), ...)) or convert it to safetensors. Reason: "
        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  except Exception as e:  # noqa: BLE001
    raise ConversionError(f"{path}: cannot read torch checkpoint: {type(e).__name__}: {e}") from e


def _is_zip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04"


def read_weight_file(path: str) -> dict[str, Any]:
  """One weight file -> its top-level dict (safetensors or safe torch load)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weight file not found: {path}")
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  obj = _load_torch(path)
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
  return obj


def _is_tensor(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _unwrap(obj: dict[str, Any], path: str, notes: list[str]) -> dict[str, Any]:
  """Returns the state dict: the top level, or the dict under one of WRAPPERS."""
  for wrapper in WRAPPERS:
    if isinstance(obj.get(wrapper), dict):
      others = sorted(k for k in obj if k != wrapper)
      if others:
        notes.append(f"read the weights under {wrapper!r}; other top-level entries not read: "
                     f"{', '.join(others)}")
      obj = obj[wrapper]
      break
  bad = sorted(k for k, v in obj.items() if not _is_tensor(v))
  if bad:
    raise ConversionError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}"
                          + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
  return obj


def _canonical(state: dict[str, Any], path: str, notes: list[str]
               ) -> tuple[dict[str, Any], dict[str, str], str, str]:
  """Strips a uniform DDP `module.` prefix and the prefixes of the detected ContextBLIP layout
  -> (arrays, names: canonical -> file key, layout, removed uniform prefix)."""
  prefix = ""
  if state and all(k.startswith("module.") for k in state):
    prefix = "module."
    state = {k[len(prefix):]: v for k, v in state.items()}
    notes.append("removed the DDP prefix 'module.' from every key")
  layout = stage_layout(state)
  arrays, names = {}, {}
  for key, value in state.items():
    canon = canonical_key(key, layout)
    if canon in arrays:
      raise ConversionError(f"{path}: both {prefix + names[canon]!r} and {prefix + key!r} are "
                            f"read as {canon!r}")
    arrays[canon], names[canon] = value, prefix + key
  if layout:
    notes.append(f"ContextBLIP {layout} checkpoint: keys read under the prefixes "
                 + ", ".join(repr(f) for f, c in STAGE_LAYOUTS[layout]["prefixes"] if f != c))
  return arrays, names, layout, prefix


def load_original(path: str) -> SourceState:
  """An original Salesforce BLIP / ContextBLIP checkpoint file -> SourceState."""
  notes: list[str] = []
  state = _unwrap(read_weight_file(path), path, notes)
  arrays, names, layout, prefix = _canonical(state, path, notes)
  if any(k.startswith("vision_model.") for k in arrays):
    raise ConversionError(f"{path}: holds Hugging Face keys (vision_model.*); pass the HF model "
                          f"directory (with config.json) and --format hf")
  return SourceState(arrays, names, path, "original", notes=notes, layout=layout,
                     prefix=prefix)


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from e


def _index_shards(index_path: str) -> list[str]:
  """The shard files a safetensors index names (sorted, each once), each checked to be a
  plain file name inside the index's directory: an index naming a path outside it (absolute,
  '..', a symlink leading out) or not of the form {"weight_map": {key: file}} is refused."""
  index = _read_json(index_path)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise ConversionError(f"{index_path}: expected {{\"weight_map\": {{tensor name: shard "
                          f"file}}}}, got {type(index).__name__}"
                          + ("" if not isinstance(index, dict) else " without such a map"))
  root = os.path.realpath(os.path.dirname(index_path))
  out = []
  for shard in sorted(set(weight_map.values())):
    full = os.path.realpath(os.path.join(root, shard))
    if os.path.isabs(shard) or os.path.dirname(full) != root:
      raise ConversionError(f"{index_path}: shard {shard!r} is not a file of the model "
                            f"directory {root}")
    out.append(full)
  return out


def load_hf_dir(path: str) -> SourceState:
  """A Hugging Face BlipForImageTextRetrieval directory -> SourceState (with config.json)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConversionError(f"{path}: not a Hugging Face model directory (no config.json)")
  hf_config = _read_json(cfg_path)
  if not isinstance(hf_config, dict):
    raise ConversionError(f"{cfg_path}: expected a JSON object, got {type(hf_config).__name__}")
  state: dict[str, Any] = {}
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    state = read_weight_file(os.path.join(path, "model.safetensors"))
  elif os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
    for shard in _index_shards(os.path.join(path, "model.safetensors.index.json")):
      state.update(read_weight_file(shard))
  elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    state = read_weight_file(os.path.join(path, "pytorch_model.bin"))
  else:
    raise ConversionError(f"{path}: no weights found (expected one of "
                          f"{', '.join(HF_WEIGHT_FILES)})")
  notes: list[str] = []
  state = _unwrap(state, path, notes)
  return SourceState(dict(state), {k: k for k in state}, path, "hf", hf_config, notes)


def detect_format(path: str) -> str:
  """'hf' for a directory with config.json and HF weights, 'original' for a weight file."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHT_FILES):
      return "hf"
    raise ConversionError(f"{path}: a directory but not a Hugging Face model directory "
                          f"(needs config.json and one of {', '.join(HF_WEIGHT_FILES)})")
  if os.path.isfile(path):
    return "original"
  raise FileNotFoundError(f"source not found: {path}")


_CHUNK = 16 * 2**20           # bytes per read when copying a remote file
_REPORT = 64 * 2**20          # remote files larger than this get progress lines


def fetch_file(url: str, dest: str, log: Callable[[str], None] | None = None) -> None:
  """Copies the remote file `url` to the local path `dest`, logging progress (every ~10%)
  for files over 64 MiB."""
  log = log or (lambda s: None)
  size = paths.getsize(url)
  every = max(size // 10, _CHUNK) if size > _REPORT else 0
  log(f"      fetch: {url} ({size / 2**20:,.1f} MiB) -> local temporary copy")
  done, next_report = 0, every
  with paths.open(url, "rb") as src, open(dest, "wb") as out:
    while chunk := src.read(_CHUNK):
      out.write(chunk)
      done += len(chunk)
      if every and done >= next_report and done < size:
        log(f"      fetch: {done / 2**20:,.0f}/{size / 2**20:,.0f} MiB ({100 * done // size}%)")
        next_report += every


def _hf_files(url: str) -> list[str]:
  """The names in a remote HF directory the 'hf' loader reads: every .json file and the one
  weight set it picks (model.safetensors; else the index's shards; else pytorch_model.bin)."""
  names = set(paths.listdir(url))
  wanted = sorted(n for n in names if n.endswith(".json"))
  if "model.safetensors" in names:
    return wanted + ["model.safetensors"]
  if "model.safetensors.index.json" in names:
    with paths.open(paths.join(url, "model.safetensors.index.json"), "rb") as f:
      try:
        index = json.load(f)
      except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{url}/model.safetensors.index.json: not valid JSON ({e})") from e
    shards = (index.get("weight_map") or {}) if isinstance(index, dict) else {}
    # Only plain names listed in the directory are copied; the loader checks the index itself.
    return wanted + sorted({v for v in shards.values() if isinstance(v, str) and v in names})
  return wanted + [n for n in ("pytorch_model.bin",) if n in names]


@contextlib.contextmanager
def local_copy(src: str, log: Callable[[str], None] | None = None) -> Iterator[str]:
  """Yields `src` itself when local; for a URL (gs://...) a local temporary copy of the file
  or HF directory (removed at the end), and errors raised in the block that name the copy
  are re-raised naming `src` instead."""
  if not paths.is_remote(src):
    yield src
    return
  src = paths.abspath(src)
  with tempfile.TemporaryDirectory(prefix="contextblip-convert-") as tmp:
    local = os.path.join(tmp, paths.basename(src) or "source")
    if paths.isdir(src):
      os.mkdir(local)
      for name in _hf_files(src):
        fetch_file(paths.join(src, name), os.path.join(local, name), log)
    elif paths.isfile(src):
      fetch_file(src, local, log)
    else:
      raise FileNotFoundError(f"source not found: {src}")
    try:
      yield local
    except (ConversionError, OSError) as e:
      if local not in str(e):
        raise
      renamed = type(e)(str(e).replace(local, src))
      raise renamed.with_traceback(e.__traceback__) from e


def load_source(path: str, fmt: str = "auto") -> SourceState:
  """Reads `path` as `fmt` ('auto', 'original' or 'hf') -> SourceState. A gs:// path is
  read through a temporary local copy (`local_copy`; `SourceState.path` is the URL)."""
  if paths.is_remote(path):
    with local_copy(path) as local:
      state = load_source(local, fmt)
      state.path = paths.abspath(path)
      return state
  if fmt == "auto":
    fmt = detect_format(path)
  if fmt == "hf":
    if not os.path.isdir(path):
      raise ConversionError(f"--format hf needs a model directory, got a file: {path}")
    return load_hf_dir(path)
  if fmt == "original":
    if os.path.isdir(path):
      raise ConversionError(f"--format original needs a checkpoint file, got a directory: {path}")
    return load_original(path)
  raise ValueError(f"unknown format {fmt!r} (auto, original or hf)")
