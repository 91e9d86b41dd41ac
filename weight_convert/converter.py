"""Target-driven, strict conversion of a BLIP / ContextBLIP / HF checkpoint to our Flax tree.

Stages (each logs one progress line):
  1. load   `load_source`: safe read of the file or HF directory (loaders.py; a gs:// source
            through a local temporary copy).
  2. map    the config comes from the source (infer_config.py); the abstract target tree
            (`jax.eval_shape` of `Blip(config).init`, unboxed, plus the adapter when the source
            has one, and the authors' stage modules it holds: TMIM, prediction layer, context
            encoder, `mapping.STAGE_RULES`) is flattened and *every* leaf is filled through
            the one table in mapping.py (`map_source`). The table names the unscanned layout
            (`blocks_{i}`, `layer_{i}`); a scanned target (`scan_layers`: stacks with a leading
            layer axis, models/layout.py) is filled through its unscanned twin, block by block, then
            stacked by `layout.to_layout`.
  3. check  every source key is used or in a named ignored group; any missing, unexpected or
            mis-shaped key raises `ConversionError` naming all of them (`MappingReport.check`).
  4. write  `contextblip_jax.storage.param_dir.write_param_dir` (temp dir + rename: a failure
            leaves nothing behind): params/, model.json (the ContextBlipConfig of the source:
            BLIP sizes, the layer layout, and the adapter's taps / reduction when it has one),
            vocab.txt, and provenance.json {writer "weight_convert", source {path, format
            original|contextblip|hf, sha256 of the file(s)}, summary (the mapping report)}.

  convert("model_base.pth", "ckpt/blip_base")                  # -> absolute path of the dir
  converted = to_flax(load_source("hf_dir"), image_size=224)   # in memory, no write
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from contextblip_jax.data.tokenizer import VOCAB_PATH
from contextblip_jax.models import layout
from contextblip_jax.models.adapter import MultiScaleAdapter
from contextblip_jax.models.blip import Blip
from contextblip_jax.models.contextblip import (PARAM_GROUPS, ContextBlip, ContextBlipConfig,
                                                init_params)
from contextblip_jax.models.variants import BlipConfig
from contextblip_jax.storage import paths
from contextblip_jax.storage.atomic import check_replaceable
from contextblip_jax.storage.param_dir import (blip_model_config, is_parameter_directory,
                                               write_param_dir)
from weight_convert import mapping
from weight_convert.infer_config import (adapter_from_source, config_from_hf,
                                         config_from_original, stage_fields)
from weight_convert.loaders import ConversionError, SourceState, load_source, local_copy

Log = Callable[[str], None]


def abstract_params(model: ContextBlipConfig | BlipConfig, groups: tuple[str, ...] = ()
                    ) -> dict:
  """{"pretrained_blip": ..., ["vision_adapter": ...], [stage groups]} of jax.ShapeDtypeStruct
  (unboxed).

  The adapter subtree is there when `model` is a ContextBlipConfig with `use_adapter`; a
  BlipConfig gives the BLIP tree only. `groups` adds the stage modules of mapping.STAGE_RULES
  ('tmim', 'head', 'context': models/contextblip.py PARAM_GROUPS), shaped by `model`.
  """
  config = model.blip if isinstance(model, ContextBlipConfig) else model
  s = config.vision.image_size
  px, ids = jnp.zeros((1, s, s, 3)), jnp.ones((1, 2), jnp.int32)
  tree = {"pretrained_blip": jax.eval_shape(
      lambda: nn.unbox(Blip(config).init(jax.random.key(0), px, ids, ids))["params"])}
  if isinstance(model, ContextBlipConfig) and model.use_adapter:
    x = jnp.zeros((1, config.vision.num_patches + 1, config.vision.width))
    mod = MultiScaleAdapter(width=config.vision.width, taps=model.adapter_taps,
                            reduction=model.adapter_reduction)
    tree["vision_adapter"] = jax.eval_shape(
        lambda: nn.unbox(mod.init(jax.random.key(0), x, [x] * config.vision.depth))["params"])
  if groups:
    if not isinstance(model, ContextBlipConfig):
      raise ValueError(f"stage groups {groups} need a ContextBlipConfig")
    full = jax.eval_shape(lambda: nn.unbox(init_params(
        ContextBlip(model.replace(use_tmim=True).with_layers(scan_layers=False)),
        jax.random.key(0), "all")))
    for group in groups:
      for name in PARAM_GROUPS[group]:
        tree[name] = full[name]
    if model.scan_layers:
      tree = {k: (v if k in ("pretrained_blip", "vision_adapter") else layout.to_layout(v, True))
              for k, v in tree.items()}
  return tree


@dataclasses.dataclass
class MappingReport:
  """What `map_source` did: used keys, ignored groups with counts, and every problem."""
  source: SourceState
  used: set[str] = dataclasses.field(default_factory=set)
  ignored: dict[str, int] = dataclasses.field(default_factory=dict)
  missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)     # (target, key)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  misshaped: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def check(self) -> None:
    """Raises ConversionError listing every missing, unexpected and mis-shaped key."""
    parts, src = [], self.source
    if self.missing:
      parts.append(f"missing source keys ({len(self.missing)}): " + "; ".join(
          f"{key if key.startswith('<') else src.name(key)} (for "
          f"{target})" for target, key in self.missing))
    if self.unexpected:
      parts.append(f"unexpected source keys ({len(self.unexpected)}), neither used nor in an "
                   f"ignored group: " + ", ".join(src.name(k) for k in self.unexpected))
    if self.misshaped:
      parts.append(f"mis-shaped ({len(self.misshaped)}): " + "; ".join(self.misshaped))
    if parts:
      raise ConversionError(f"{src.path} ({src.format} format) does not fit the target:\n  "
                            + "\n  ".join(parts))

  def summary(self) -> str:
    groups = ", ".join(f"{k} {v}" for k, v in sorted(self.ignored.items())) or "none"
    return (f"used {len(self.used)} of {len(self.source.arrays)} source tensors; "
            f"ignored groups: {groups}")

  def as_dict(self) -> dict[str, Any]:
    """The JSON-ready summary recorded in provenance.json."""
    return {"used_tensors": len(self.used), "source_tensors": len(self.source.arrays),
            "ignored_groups": dict(sorted(self.ignored.items())), "notes": list(self.notes)}


def map_source(source: SourceState, target: dict, allow_resample: bool = False
               ) -> tuple[dict, MappingReport]:
  """Fills every leaf of the abstract `target` tree from `source` through mapping.RULES.

  Returns (nested params of float32 NumPy arrays, report); call `report.check()` before use.
  `allow_resample` lets the pos_embed hook resize a different patch grid (bicubic). A target
  in the scanned layout is filled in the unscanned one and returned stacked.
  """
  report = MappingReport(source)
  scanned = layout.is_scanned(target)
  flat = traverse_util.flatten_dict(layout.to_layout(target, False), sep="/")
  out = {}
  for path, leaf in flat.items():
    key, rule = mapping.source_key(path, source.format)
    if key is None or key not in source.arrays:
      report.missing.append((path, key or f"<no {source.format} key>"))
      continue
    report.used.add(key)
    shape, src_shape = tuple(leaf.shape), source.shape(key)
    if rule.hook is mapping.POS_EMBED and src_shape != shape and not allow_resample:
      report.misshaped.append(f"{source.name(key)} {list(src_shape)} vs {path} {list(shape)} "
                              f"(image size differs: pass image_size / --image-size to resample)")
      continue
    value = rule.hook.forward(source.numpy(key), shape)
    if value.shape != shape:
      report.misshaped.append(f"{source.name(key)} {list(src_shape)} -> {path} expects "
                              f"{list(shape)} (hook {rule.hook.name})")
      continue
    if rule.hook is mapping.POS_EMBED and src_shape != shape:
      report.notes.append(f"resampled {source.name(key)} {list(src_shape)} -> {list(shape)} "
                          f"(bicubic, CLS kept)")
    out[path] = np.ascontiguousarray(value, dtype=leaf.dtype)
  counts = collections.Counter()
  for key in source.arrays:
    if key in report.used:
      continue
    group = mapping.ignored_group(key)
    if group is None:
      report.unexpected.append(key)
    else:
      counts[group] += 1
  report.ignored = dict(counts)
  params = traverse_util.unflatten_dict(out, sep="/")
  return (layout.to_layout(params, True) if scanned else params), report


@dataclasses.dataclass
class Converted:
  model: ContextBlipConfig              # BLIP sizes (+ the adapter's taps / reduction)
  params: dict                          # {"pretrained_blip": ..., ["vision_adapter": ...]}
  report: MappingReport

  @property
  def config(self) -> BlipConfig:
    """The BLIP part of `model`."""
    return self.model.blip


def source_config(source: SourceState, image_size: int | None = None, *,
                  vision_heads: int | None = None, text_heads: int | None = None,
                  hf_config: str = "blip") -> tuple[BlipConfig, list[str], bool]:
  """(target config, notes, resample?) for `source`, at `image_size` if given."""
  if source.format == "hf":
    config, notes = config_from_hf(source.hf_config, hf_config)
    if vision_heads or text_heads:
      raise ConversionError("vision_heads / text_heads apply to original checkpoints only; "
                            "an HF directory's config.json gives the heads")
    key = "vision_model.embeddings.position_embedding"
    if key in source.arrays and source.shape(key)[1:2] != (config.vision.num_patches + 1,):
      raise ConversionError(f"{source.path}: config.json image_size {config.vision.image_size} "
                            f"(patch {config.vision.patch_size}) disagrees with {key} "
                            f"{list(source.shape(key))}")
  else:
    config, notes = config_from_original(source, vision_heads, text_heads)
  native = config.vision.image_size
  if image_size and image_size != native:
    if image_size % config.vision.patch_size:
      raise ConversionError(f"image size {image_size} is not a multiple of the patch size "
                            f"{config.vision.patch_size}")
    config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
    notes.append(f"image size {native} -> {image_size}: position embeddings resampled")
  return config, notes, config.vision.image_size != native


def _tied_embedding_note(source: SourceState) -> list[str]:
  """ContextBLIP's load_checkpoint copies the *decoder's* word embeddings into the encoder
  (docs/method.md#checkpoint). BLIP pre-training ties them, so they are equal; say so if they are not."""
  enc, dec = ("text_encoder.embeddings.word_embeddings.weight",
              "text_decoder.bert.embeddings.word_embeddings.weight")
  if enc in source.arrays and dec in source.arrays and (
      source.shape(enc) != source.shape(dec)
      or not np.array_equal(source.numpy(enc), source.numpy(dec))):
    return [f"{source.name(dec)} differs from {source.name(enc)}; the encoder's was used "
            f"(ContextBLIP's loader would copy the decoder's)"]
  return []


def source_groups(source: SourceState, tmim: bool = True) -> tuple[str, ...]:
  """The stage groups of mapping.STAGE_RULES an original-format source holds ('tmim' left out
  when `tmim` is False: its keys are then an ignored group)."""
  if source.format != "original":
    return ()
  return tuple(g for g in mapping.stage_groups_of(source.arrays) if tmim or g != "tmim")


def to_flax(source: SourceState, image_size: int | None = None, *,
            vision_heads: int | None = None, text_heads: int | None = None,
            hf_config: str = "blip", adapter_taps: tuple[int, ...] | None = None,
            scan_layers: bool = False, tmim: bool = True, decoder_heads: int | None = None,
            context_heads: int | None = None, log: Log | None = None) -> Converted:
  """Map + check stages: SourceState -> Converted (raises ConversionError on any mismatch);
  `scan_layers`: the parameters in the scanned layout (models/layout.py). The stage modules
  the source holds (TMIM unless `tmim` is False, prediction layer, context encoder) are
  converted with the rest; `decoder_heads` / `context_heads` (default 8, as the reference)
  are their head counts, which shapes cannot tell."""
  log = log or (lambda s: None)
  config, notes, resample = source_config(source, image_size, vision_heads=vision_heads,
                                          text_heads=text_heads, hf_config=hf_config)
  adapter = adapter_from_source(source, config, adapter_taps)
  groups = source_groups(source, tmim)
  model = blip_model_config(config, adapter["taps"] if adapter else None,
                            adapter["reduction"] if adapter else 2)
  fields = stage_fields(source, config, groups, decoder_heads, context_heads)
  try:
    model = model.replace(**fields)
  except ValueError as e:      # e.g. heads that do not divide the width
    raise ConversionError(f"{source.path}: {e}") from e
  model = model.with_layers(scan_layers)
  target = abstract_params(model, groups)
  params, report = map_source(source, target, allow_resample=resample)
  report.notes[:0] = source.notes + notes + _tied_embedding_note(source)
  n_leaves = len(traverse_util.flatten_dict(target))
  log(f"[2/4] map: {n_leaves} target parameters from {len(source.arrays)} source tensors"
      + (f"; adapter taps {list(model.adapter_taps)} reduction {model.adapter_reduction}"
         if model.use_adapter else "") + ("; scanned layers" if scan_layers else "")
      + (f"; {source.layout} checkpoint" if source.layout else "")
      + (f"; stage modules {', '.join(groups)}" if groups else ""))
  report.check()
  log(f"[3/4] check: ok: {report.summary()}")
  for note in report.notes:
    log(f"      note: {note}")
  return Converted(model, params, report)


def source_record(source: SourceState) -> dict[str, Any]:
  """{path, format original|contextblip|hf, sha256 {file name: hex digest}} of `source` (an
  HF directory: each of its .json, .safetensors and .bin files)."""
  path = os.path.abspath(source.path)
  if source.format == "hf":
    fmt = "hf"
    files = sorted(f for f in os.listdir(path) if f.endswith((".json", ".safetensors", ".bin"))
                   and os.path.isfile(os.path.join(path, f)))
    digests = {f: _sha256(os.path.join(path, f)) for f in files}
  else:
    contextblip = bool(source.layout) or any(
        k.startswith("vision_adapter.") for k in source.arrays)
    fmt = "contextblip" if contextblip else "original"
    digests = {os.path.basename(path): _sha256(path)}
  return {"path": path, "format": fmt, "sha256": digests}


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def convert(src: str, out: str, fmt: str = "auto", image_size: int | None = None, *,
            vision_heads: int | None = None, text_heads: int | None = None,
            hf_config: str = "blip", adapter_taps: tuple[int, ...] | None = None,
            scan_layers: bool = False, tmim: bool = True, decoder_heads: int | None = None,
            context_heads: int | None = None, overwrite: bool = False,
            log: Log | None = None) -> str:
  """Converts `src` (original .pth/.safetensors file or HF directory) into the directory `out`.

  Either may be a gs:// URL: a remote source is copied to a local temporary directory first
  (loaders.local_copy; provenance records the URL and the copied files' digests), and the
  output is written as every parameter directory is (storage/param_dir.py).

  Args:
    src: checkpoint file ('original') or HF BlipForImageTextRetrieval directory ('hf').
    out: output parameter directory (contextblip_jax.storage.param_dir); must not exist
      unless overwrite, and overwrite replaces only a parameter directory that neither is nor
      holds `src` (`storage.atomic.check_replaceable`).
    fmt: 'auto' | 'original' | 'hf'.
    image_size: target resolution; position embeddings are resampled if it differs.
    vision_heads, text_heads: head counts for original checkpoints (default width // 64).
    hf_config: 'blip' (vision eps 1e-6, dropout 0.1) or 'config' (config.json literally).
    adapter_taps: 1-based ViT blocks of a ContextBLIP adapter (default evenly spaced).
    scan_layers: write the scanned layout (stacked blocks; recorded in model.json). Every
      command converts a directory to the layout its config asks for on load.
    tmim: convert a pre-training checkpoint's TMIM modules (False: leave them out, an ignored
      group); the stage-1 prediction layer and stage-2 context encoder are always converted.
    decoder_heads, context_heads: TMIM decoder / stage-2 context encoder heads (default 8).
    log: called with one progress line per stage.
  Returns:
    The absolute path of the written directory. Nothing is written if any stage fails.
  """
  log = log or (lambda s: None)
  out = paths.abspath(out)                  # a local directory or a gs:// URL
  if paths.exists(out) and not overwrite:
    raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
  check_replaceable(out, [src], is_parameter_directory, "a parameter directory")
  with local_copy(src, log) as local:       # a gs:// source: read from a local copy
    source = load_source(local, fmt)
    record = source_record(source)
    if local != src:
      source.path = record["path"] = paths.abspath(src)
    log(f"[1/4] load: {source.format} checkpoint {src} ({len(source.arrays)} tensors)")
    conv = to_flax(source, image_size, vision_heads=vision_heads, text_heads=text_heads,
                   hf_config=hf_config, adapter_taps=adapter_taps, scan_layers=scan_layers,
                   tmim=tmim, decoder_heads=decoder_heads, context_heads=context_heads, log=log)
  provenance = {"writer": "weight_convert", "source": record,
                "summary": conv.report.as_dict()}
  path = write_param_dir(out, conv.params, conv.model, provenance, vocab_path=VOCAB_PATH,
                         overwrite=overwrite)
  log(f"[4/4] write: {path}")
  return path
