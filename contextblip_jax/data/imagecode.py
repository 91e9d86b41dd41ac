"""IMAGECODE reader (docs/method.md#imagecode): annotation JSON (+ phenomenon tags) + image tree -> examples.

Inputs (the real benchmark's formats):
  train/valid JSON  {set_name: {"<gold 0-9>": description, ...}}
  test JSON         {set_name: [description, ...]}                     (no labels)
  tags YAML         {set_name: {"<gold>": {description, annotation, visualization_id}}}
                    `annotation` = comma-separated phenomenon tags (con, t, q, s, neg, v, n,
                    cor, img, col), possibly empty.
  images            <image_root>/<set_name>/img<k>.jpg, 10 per set; candidate order = numeric
                    order of k (img2 before img10); the label is the position in that order.
A set is static iff 'open-images' is in its name; every other set is video.

Output: an `ImagecodeSplit` with a flat list of `ImagecodeExample` (one per description, in
file order) and a list of `ImagecodeSet` (each set's 10 image paths once, with the indices of
its examples), so an evaluation loop encodes each set's images once.

Splits from config (`config.data`): `split_paths` (annotation JSON, image root, tags YAML of
'train' | 'valid' | 'test'), `load_split` (read with the configured bad-input policy),
`first_sets` (the first n sets, renumbered) and `skipped_records` (one prediction record per
description the reader left out, so an evaluation's predictions file accounts for all).

Bad input raises `ImagecodeDataError` naming the file and entry, or, with `on_error="skip"`,
is recorded in `split.skipped` (and logged) and left out: a JSON not matching the schema (top
level: always raises), an empty or non-string description, a label out of 0-9, a missing
image-set directory, a set with other than 10 images, an annotation naming an unknown set or
an unknown tag. Corrupt / non-decodable images are found at load time (`preprocess` raises
`ImageLoadError` naming the file), or up front with `check_images="decode"`.
Always raised, whatever the policy (the file as a whole is unusable): a duplicate key in the
JSON or YAML (JSON would silently keep the later one) and an empty split ({}). (A split
all of whose descriptions were skipped is read, every one counted; training refuses it,
evaluation reports it with accuracies null.) A gold key must be one ASCII digit 0-9 ("³" or
"03" are bad entries).
One exception to the policy: an annotation entry whose gold index is not a description of a
known set is reported in `split.unmatched_annotations` (and logged) but never raises, because
the real manual_annotation_valid.yaml has two such entries (MSR-VTT-videoTestVideo_video9053-
shot1_8, golds 3 and 4).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Sequence

import yaml

from contextblip_jax.data import preprocess, unique_keys
from contextblip_jax.storage import paths as fs_paths

log = logging.getLogger(__name__)

NUM_CANDIDATES = 10
PHENOMENON_TAGS = ("con", "t", "q", "s", "neg", "v", "n", "cor", "img", "col")
SPLIT_FILES = {"train": "train_data.json", "valid": "valid_data.json",
               "test": "test_data_unlabeled.json"}
ANNOTATION_FILE = "manual_annotation_valid.yaml"
IMAGE_DIR = "image-sets"
_IMAGE_NAME = re.compile(r"^img(\d+)\.(jpe?g|png)$", re.IGNORECASE)


class ImagecodeDataError(ValueError):
  """Malformed IMAGECODE input; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """One item left out under on_error='skip'."""
  file: str
  entry: str          # "set_name" or "set_name/<key>"
  reason: str
  descriptions: int   # how many descriptions this removed


@dataclasses.dataclass(frozen=True)
class ImagecodeExample:
  """One description with its set's 10 candidates."""
  example_id: str                 # "<set_name>#<position>"
  set_name: str
  position: int                   # index among the set's descriptions, in file order
  description: str                # as in the JSON (caption cleaning happens in the pipeline)
  label: int                      # gold candidate 0-9; -1 for the unlabelled test split
  is_video: bool
  tags: tuple[str, ...]           # phenomenon tags; () when not annotated
  image_paths: tuple[str, ...]    # 10 paths in candidate order; () when images not checked
  set_index: int                  # index into ImagecodeSplit.sets


@dataclasses.dataclass(frozen=True)
class ImagecodeSet:
  """One set: its 10 candidate images once and the examples that use them."""
  set_name: str
  is_video: bool
  image_paths: tuple[str, ...]
  example_indices: tuple[int, ...]  # indices into ImagecodeSplit.examples


@dataclasses.dataclass
class ImagecodeSplit:
  """The examples of one annotation file, grouped by set, plus what was skipped."""
  source: str
  labelled: bool
  examples: list[ImagecodeExample]
  sets: list[ImagecodeSet]
  skipped: list[Skipped] = dataclasses.field(default_factory=list)
  unmatched_annotations: list[Skipped] = dataclasses.field(default_factory=list)

  @property
  def num_skipped_descriptions(self) -> int:
    return sum(s.descriptions for s in self.skipped)

  def tags_by_gold(self) -> dict[tuple[str, int], tuple[str, ...]]:
    """{(set_name, gold): tags} for the tagged examples (eval_metrics' `tags` argument)."""
    return {(e.set_name, e.label): e.tags for e in self.examples if e.tags}

  def summary(self) -> dict[str, int]:
    video = sum(e.is_video for e in self.examples)
    return {"sets": len(self.sets), "descriptions": len(self.examples),
            "video_descriptions": video, "static_descriptions": len(self.examples) - video,
            "tagged": sum(bool(e.tags) for e in self.examples),
            "skipped_descriptions": self.num_skipped_descriptions}


def is_video_set(set_name: str) -> bool:
  """Static iff 'open-images' is in the set name (docs/method.md#imagecode)."""
  return "open-images" not in set_name


class _Policy:
  """Raises or records bad items, per on_error."""

  def __init__(self, on_error: str):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    self.on_error = on_error
    self.skipped: list[Skipped] = []

  def bad(self, file: str, entry: str, reason: str, descriptions: int = 1) -> None:
    if self.on_error == "raise":
      raise ImagecodeDataError(f"{file}: entry {entry!r}: {reason}")
    log.warning("skipping %s entry %r: %s", file, entry, reason)
    self.skipped.append(Skipped(file, entry, reason, descriptions))


def gold_index(key: Any) -> int | None:
  """The label of a gold key: one ASCII digit '0'-'9' (or an int 0-9 from YAML); else None."""
  if isinstance(key, int) and not isinstance(key, bool):
    return key if 0 <= key < NUM_CANDIDATES else None
  if isinstance(key, str) and re.fullmatch(r"[0-9]", key):
    return int(key)
  return None


def _load_json(path: str) -> Any:
  return unique_keys.load_json(path, ImagecodeDataError, "annotation file")


def _detect_labelled(path: str, data: dict) -> bool:
  kinds = {dict if isinstance(v, dict) else type(v) for v in data.values()}
  if kinds <= {dict}:
    return True
  if kinds <= {list}:
    return False
  raise ImagecodeDataError(
      f"{path}: set entries must all be objects {{gold: description}} (train/valid) or all "
      f"lists [description, ...] (test); found {sorted(k.__name__ for k in kinds)}")


def _descriptions(path, set_name, entry, labelled, policy) -> list[tuple[int, str]]:
  """[(label, description)] of one set entry, bad ones raised or skipped."""
  if labelled:
    if not isinstance(entry, dict):
      policy.bad(path, set_name, f"expected an object {{gold: description}}, got "
                 f"{type(entry).__name__}", 1)
      return []
    items = list(entry.items())
  else:
    if not isinstance(entry, list):
      policy.bad(path, set_name, f"expected a list of descriptions, got {type(entry).__name__}")
      return []
    items = [(None, d) for d in entry]
  if not items:
    policy.bad(path, set_name, "no descriptions", 0)
  out = []
  for j, (key, text) in enumerate(items):
    where = f"{set_name}/{key if labelled else j}"
    label = -1
    if labelled:
      label = gold_index(key)
      if label is None:
        policy.bad(path, where, f"label must be one digit 0-{NUM_CANDIDATES - 1}, got {key!r}")
        continue
    if not isinstance(text, str) or not text.strip():
      policy.bad(path, where, f"description must be a non-empty string, got {text!r}")
      continue
    out.append((label, text))
  return out


def list_candidates(set_dir: str) -> list[str]:
  """The img<k> files of `set_dir` sorted by the integer k (no count check)."""
  found: dict[int, str] = {}
  for name in fs_paths.listdir(set_dir):
    m = _IMAGE_NAME.match(name)
    if m:
      k = int(m.group(1))
      if k in found:
        raise ImagecodeDataError(f"{set_dir}: two files for frame {k}: {found[k]}, {name}")
      found[k] = name
  return [fs_paths.join(set_dir, found[k]) for k in sorted(found)]


def _set_images(image_root, set_name, decode, policy, n_desc) -> tuple[str, ...] | None:
  set_dir = fs_paths.join(image_root, set_name)
  if not fs_paths.isdir(set_dir):
    policy.bad(set_dir, set_name, "image-set directory not found", n_desc)
    return None
  try:
    paths = list_candidates(set_dir)
  except ImagecodeDataError as e:
    policy.bad(set_dir, set_name, str(e), n_desc)
    return None
  if len(paths) != NUM_CANDIDATES:
    policy.bad(set_dir, set_name, f"expected {NUM_CANDIDATES} img<k> images, found {len(paths)}",
               n_desc)
    return None
  if decode:
    for p in paths:
      try:
        preprocess.open_rgb(p)
      except preprocess.ImageLoadError as e:
        policy.bad(p, set_name, str(e), n_desc)
        return None
  return tuple(paths)


def load_phenomenon_tags(path: str, on_error: str = "raise"
                         ) -> tuple[dict[tuple[str, int], tuple[str, ...]], list[Skipped]]:
  """Reads manual_annotation_valid.yaml -> ({(set_name, gold): tags}, skipped)."""
  policy = _Policy(on_error)
  try:
    with fs_paths.open(path, encoding="utf-8") as f:
      data = yaml.load(f, Loader=unique_keys.yaml_loader())
  except FileNotFoundError as e:
    raise ImagecodeDataError(f"{path}: annotation file not found") from e
  except yaml.YAMLError as e:
    raise ImagecodeDataError(f"{path}: not valid YAML ({e})") from e
  if not isinstance(data, dict):
    raise ImagecodeDataError(f"{path}: expected a mapping {{set_name: {{gold: {{...}}}}}}, "
                             f"got {type(data).__name__}")
  tags: dict[tuple[str, int], tuple[str, ...]] = {}
  for set_name, entries in data.items():
    if not isinstance(entries, dict):
      policy.bad(path, str(set_name), f"expected a mapping of gold -> entry, got "
                 f"{type(entries).__name__}", 0)
      continue
    for gold, entry in entries.items():
      where = f"{set_name}/{gold}"
      if gold_index(gold) is None:
        policy.bad(path, where, f"gold index must be 0-{NUM_CANDIDATES - 1}, got {gold!r}", 0)
        continue
      ann = entry.get("annotation") if isinstance(entry, dict) else None
      if not isinstance(entry, dict) or not isinstance(ann, (str, type(None))):
        policy.bad(path, where, f"expected {{description, annotation: str, ...}}, got {entry!r}", 0)
        continue
      parts = tuple(t.strip() for t in (ann or "").split(",") if t.strip())
      unknown = [t for t in parts if t not in PHENOMENON_TAGS]
      if unknown:
        policy.bad(path, where, f"unknown tags {unknown}; known: {list(PHENOMENON_TAGS)}", 0)
        continue
      tags[(str(set_name), gold_index(gold))] = parts
  return tags, policy.skipped


def read_imagecode(json_path: str, image_root: str | None = None, *,
                   annotation_path: str | None = None, check_images: bool | str = True,
                   on_error: str = "raise") -> ImagecodeSplit:
  """Reads one IMAGECODE annotation file.

  Args:
    json_path: train/valid ({set: {gold: text}}) or test ({set: [text]}) JSON.
    image_root: the `image-sets` directory; required unless check_images is False.
    annotation_path: optional tags YAML (labelled splits only).
    check_images: True: each set directory exists and holds exactly 10 img<k> files;
      "decode": also decode every image (slow); False: do not touch images (image_paths=()).
    on_error: "raise" (ImagecodeDataError) or "skip" (record in `skipped`, log, leave out).
  """
  if check_images not in (True, False, "decode"):
    raise ValueError(f"check_images must be True, False or 'decode', got {check_images!r}")
  if check_images and image_root is None:
    raise ValueError("image_root is required when check_images is set")
  policy = _Policy(on_error)
  data = _load_json(json_path)
  if not isinstance(data, dict):
    raise ImagecodeDataError(f"{json_path}: expected an object {{set_name: ...}} at top level, "
                             f"got {type(data).__name__}")
  if not data:
    raise ImagecodeDataError(f"{json_path}: no image sets (an empty split)")
  labelled = _detect_labelled(json_path, data)
  examples: list[ImagecodeExample] = []
  sets: list[ImagecodeSet] = []
  for set_name, entry in data.items():
    if not set_name.strip() or "/" in set_name or "\\" in set_name or set_name in (".", ".."):
      policy.bad(json_path, set_name, "set name must be a non-empty directory name",
                 len(entry) if isinstance(entry, (dict, list)) else 0)
      continue
    descs = _descriptions(json_path, set_name, entry, labelled, policy)
    if not descs:
      continue
    paths: tuple[str, ...] = ()
    if check_images:
      found = _set_images(image_root, set_name, check_images == "decode", policy, len(descs))
      if found is None:
        continue
      paths = found
    video, first = is_video_set(set_name), len(examples)
    for pos, (label, text) in enumerate(descs):
      examples.append(ImagecodeExample(f"{set_name}#{pos}", set_name, pos, text, label, video,
                                       (), paths, len(sets)))
    sets.append(ImagecodeSet(set_name, video, paths, tuple(range(first, len(examples)))))
  split = ImagecodeSplit(json_path, labelled, examples, sets, policy.skipped)
  if annotation_path:
    _attach_tags(split, data, annotation_path, on_error)
  if split.skipped:
    log.warning("%s: skipped %d entries (%d descriptions)", json_path, len(split.skipped),
                split.num_skipped_descriptions)
  return split


def _attach_tags(split: ImagecodeSplit, data: dict, annotation_path: str, on_error: str):
  if not split.labelled:
    raise ImagecodeDataError(f"{annotation_path}: tags are keyed by gold index, but "
                             f"{split.source} is unlabelled")
  tags, skipped = load_phenomenon_tags(annotation_path, on_error)
  split.skipped.extend(skipped)
  policy = _Policy(on_error)
  index = {(e.set_name, e.label): i for i, e in enumerate(split.examples)}
  unknown_sets = sorted({s for s, _ in tags if s not in data})
  for s in unknown_sets:
    policy.bad(annotation_path, s, f"set not in {split.source}", 0)
  split.skipped.extend(policy.skipped)
  for (set_name, gold), t in tags.items():
    if set_name not in data:
      continue
    i = index.get((set_name, gold))
    if i is None:
      if str(gold) not in data[set_name]:
        item = Skipped(annotation_path, f"{set_name}/{gold}",
                       f"gold {gold} is not a description of this set in {split.source}", 0)
        log.warning("unmatched annotation %s", item.entry)
        split.unmatched_annotations.append(item)
      continue                       # else its description was skipped: nothing to tag
    split.examples[i] = dataclasses.replace(split.examples[i], tags=t)


def read_imagecode_dir(data_dir: str, split: str, *, image_root: str | None = None,
                       annotation_path: str | None = None, check_images: bool | str = True,
                       on_error: str = "raise") -> ImagecodeSplit:
  """Reads split 'train' | 'valid' | 'test' from a directory in the benchmark's layout.

  `image_root` defaults to <data_dir>/image-sets; for 'valid', `annotation_path` defaults to
  <data_dir>/manual_annotation_valid.yaml when that file exists.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
  if annotation_path is None and split == "valid":
    candidate = fs_paths.join(data_dir, ANNOTATION_FILE)
    annotation_path = candidate if fs_paths.exists(candidate) else None
  return read_imagecode(fs_paths.join(data_dir, SPLIT_FILES[split]),
                        image_root or fs_paths.join(data_dir, IMAGE_DIR),
                        annotation_path=annotation_path, check_images=check_images,
                        on_error=on_error)


def load_candidates(paths: Sequence[str], image_size: int) -> Any:
  """Evaluation transform of one set: float32 [10, S, S, 3] (raises ImageLoadError)."""
  if len(paths) != NUM_CANDIDATES:
    raise ImagecodeDataError(f"expected {NUM_CANDIDATES} candidate paths, got {len(paths)}")
  return preprocess.load_images(list(paths), image_size)


# --------------------------------------------------------------------------- splits from config

def split_paths(cfg: Any, split: str) -> tuple[str, str, str | None]:
  """(annotation JSON, image root, tags YAML or None) of `split` from `cfg.data`.

  Fields read: imagecode_dir (required), image_root (default <imagecode_dir>/image-sets),
  annotation_yaml (valid only; default <imagecode_dir>/manual_annotation_valid.yaml when it
  exists, an explicitly given one must exist).
  """
  d = cfg.data
  if not d.imagecode_dir:
    raise ValueError("config.data.imagecode_dir is required (directory with the IMAGECODE "
                     "JSON files)")
  if split not in SPLIT_FILES:
    raise ValueError(f"unknown split {split!r}; known: {sorted(SPLIT_FILES)}")
  json_path = fs_paths.join(d.imagecode_dir, SPLIT_FILES[split])
  image_root = d.image_root or fs_paths.join(d.imagecode_dir, IMAGE_DIR)
  tags = None
  if split == "valid":
    tags = d.annotation_yaml or fs_paths.join(d.imagecode_dir, ANNOTATION_FILE)
    if not fs_paths.isfile(tags):
      if d.annotation_yaml:
        raise FileNotFoundError(f"config.data.annotation_yaml: {tags} not found")
      tags = None
  return json_path, image_root, tags


def load_split(cfg: Any, split: str) -> ImagecodeSplit:
  """Reads one IMAGECODE split with the configured bad-input policy (`cfg.data.on_error`).

  With on_error='skip' every image is decoded up front so a corrupt one skips its set (and is
  counted) instead of failing mid-run; with 'raise' a corrupt image raises at load time,
  naming the file.
  """
  json_path, image_root, tags = split_paths(cfg, split)
  skip = cfg.data.on_error == "skip"
  return read_imagecode(json_path, image_root, annotation_path=tags,
                        check_images="decode" if skip else True, on_error=cfg.data.on_error)


def first_sets(split: ImagecodeSplit, n: int) -> ImagecodeSplit:
  """The split restricted to its first `n` sets (set and example indices renumbered)."""
  sets: list[ImagecodeSet] = []
  examples: list[ImagecodeExample] = []
  for s in split.sets[:n]:
    first = len(examples)
    for i in s.example_indices:
      examples.append(dataclasses.replace(split.examples[i], set_index=len(sets)))
    sets.append(dataclasses.replace(s, example_indices=tuple(range(first, len(examples)))))
  log.info("using the first %d of %d sets of %s", len(sets), len(split.sets), split.source)
  return ImagecodeSplit(split.source, split.labelled, examples, sets, list(split.skipped),
                        list(split.unmatched_annotations))


def skipped_records(split: ImagecodeSplit) -> list[dict[str, Any]]:
  """One record per description the reader left out: {set, index, description, static, gold,
  pred: None, scores: None, skipped: reason}, in the annotation file's order within a set.

  Tag-file problems drop no description and give no record.
  """
  if not split.skipped:
    return []
  data = _load_json(split.source)
  out: list[dict[str, Any]] = []
  seen: set[tuple[str, int]] = set()
  for s in split.skipped:
    if s.file.endswith((".yaml", ".yml")):
      continue
    if s.entry in data:                  # a whole set (its name may hold '/': a bad name)
      set_name, key = s.entry, ""
    else:
      set_name, _, key = s.entry.partition("/")
    entry = data.get(set_name)
    if isinstance(entry, dict):
      items = [(i, k, v) for i, (k, v) in enumerate(entry.items())]
    elif isinstance(entry, list):
      items = [(i, str(i), v) for i, v in enumerate(entry)]
    else:
      items = [(0, "", entry)] if s.descriptions else []
    for i, k, text in items:
      if (key and k != key) or (set_name, i) in seen:
        continue
      seen.add((set_name, i))
      gold = gold_index(k) if split.labelled else None
      out.append({"set": set_name, "index": i,
                  "description": text if isinstance(text, str) else repr(text),
                  "static": not is_video_set(set_name), "gold": gold, "pred": None,
                  "scores": None, "skipped": s.reason})
  return out
