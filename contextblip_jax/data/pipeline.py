"""Grain input pipelines: pre-training pairs, IMAGECODE training, IMAGECODE evaluation.

All three are `grain.MapDataset` chains

  source -> [seeded global shuffle] -> (random_)map: load + augment -> map: tokenise
         -> this process's rows of every global batch -> batch -> repeat -> IterDataset

and every process walks the same global order: global batch b is records [b*G, (b+1)*G) of
the (per-epoch reshuffled) order, and a process loads only its rows of it (by default the
contiguous block process_index*G/P ... ; or `shard=distributed.process_batch_rows(sharding, G)`), so N
processes see exactly the global batches one process would (assemble them with
`distributed.global_batch`). Augmentation draws from a `np.random.Generator` that Grain seeds
from (seed, global record index), so batches are deterministic given the seed and do not depend
on the number of processes, threads or workers. Each epoch is reshuffled and re-augmented.

Batch formats (per process; L = local batch size, S image size, T max_length):
  pretrain_pipeline:        {"image": f32 [L, S, S, 3], "input_ids": i32 [L, T],
                             "attention_mask": i32 [L, T]}
  imagecode_train_pipeline: {"images": f32 [L, 10, S, S, 3], "input_ids": i32 [L, T],
                             "attention_mask": i32 [L, T], "label": i32 [L], "is_video": bool [L],
                             "example_mask": bool [L]}
    `example_mask` is False on the padding rows of an epoch's last, partial global batch
    (kept by default, as the reference's fine-tuning DataLoader keeps it: ceil(N / G) steps
    per epoch; the padding rows repeat the epoch's first records and the losses leave them
    out); `drop_remainder=True` drops that batch instead (floor(N / G) steps).
  imagecode_eval_pipeline (one row per *set*, D = max descriptions per set, 3 in IMAGECODE):
      {"images": f32 [L, 10, S, S, 3]             each set's candidates once (eval transform)
       "input_ids", "attention_mask": i32 [L, D, T]  its descriptions ("" where padded)
       "label": i32 [L, D]                       gold, -1 for test / padded descriptions
       "desc_mask": bool [L, D]                  real description
       "example_index": i32 [L, D]               index into split.examples, -1 when padded
       "set_index": i32 [L]                      index into split.sets, -1 for padded sets
       "set_mask": bool [L]                      real set (the last global batch is padded)
       "is_video": bool [L]}
    Every process gets the same number of batches (ceil(sets / G)), none dropped.
    `eval_records(split, batch, scores [L, D, 10])` turns a batch's scores into
    eval_metrics prediction records.

Iterators: `it = iter(pipeline)` is a `grain.DatasetIterator`; `it.get_state()` /
`it.set_state(state)` (a small JSON-able dict) save and resume the position exactly. With
Orbax use Grain's handler (grain 0.2.18, `grain/_src/python/checkpoint/handler.py`):
  ocp.CheckpointManager(dir, item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()})
  save:    args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it), ...)
  restore: args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it), ...)
(one JSON file per process, process_<i>-of-<n>.json; `storage/checkpoints.py` wraps this).

Sources are picklable top-level classes, so `worker_count > 0` (spawned processes; scripts
need a `__main__` guard and absl flags parsed) works and gives the same batches; the iterator
state's format depends on worker_count, so resume with the same worker_count. On 2 cores the
default is 0 workers and `num_threads` reader threads. `cache_images=True` decodes every image
once into memory (uint8) when the pipeline is built: for small datasets (the synthetic
default: ~27 MB at 32 px), not for the real benchmark.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from contextblip_jax.data import preprocess
from contextblip_jax.data import augment
from contextblip_jax.data.imagecode import NUM_CANDIDATES, ImagecodeSplit
from contextblip_jax.data.pairs import PairExample, PairsData
from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode


# Training-batch key of the real rows (False on the rows padding an epoch's last batch).
EXAMPLE_MASK = "example_mask"


# --------------------------------------------------------------------------- sources

def open_image(image: str | bytes | np.ndarray, name: str = "<bytes>"):
  """RGB PIL image from a path, encoded bytes (TFDS records) or a cached uint8 [H, W, 3]
  array; raises ImageLoadError."""
  if isinstance(image, np.ndarray):
    return Image.fromarray(image, "RGB")
  if isinstance(image, (bytes, bytearray, np.bytes_)):
    return preprocess.decode_rgb(bytes(image), name)
  return preprocess.open_rgb(image)


def decode_images(paths: Sequence[str]) -> dict[str, np.ndarray]:
  """{path: uint8 [H, W, 3]} for the distinct paths (the in-memory image cache)."""
  return {p: np.asarray(preprocess.open_rgb(p), np.uint8) for p in dict.fromkeys(paths)}


class PairSource:
  """Random access to pairs: {"image": path (or cached pixels), "caption": cleaned caption,
  "id": pair_id}. `cache_images` decodes every image once up front (small datasets)."""

  def __init__(self, examples: PairsData | Sequence[PairExample], cache_images: bool = False):
    examples = examples.examples if isinstance(examples, PairsData) else examples
    self._images = [e.image_path for e in examples]
    if cache_images:
      cache = decode_images(self._images)
      self._images = [cache[p] for p in self._images]
    self._captions = [e.caption for e in examples]
    self._ids = [e.pair_id for e in examples]

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self._images[i], "caption": self._captions[i], "id": self._ids[i]}


class ImagecodeExampleSource:
  """Random access to IMAGECODE examples: {"images": 10 paths, "description", "label",
  "is_video", "id"}. Needs a split read with image checks (paths present)."""

  def __init__(self, split: ImagecodeSplit, cache_images: bool = False):
    missing = [e.example_id for e in split.examples if len(e.image_paths) != NUM_CANDIDATES]
    if missing:
      raise ValueError(f"{split.source}: {len(missing)} examples have no image paths (read "
                       f"with check_images=True), e.g. {missing[0]}")
    cache = (decode_images([p for s in split.sets for p in s.image_paths]) if cache_images
             else None)
    self._records = [(tuple(cache[p] for p in e.image_paths) if cache else e.image_paths,
                      e.description, e.label, e.is_video, e.example_id)
                     for e in split.examples]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict[str, Any]:
    paths, text, label, video, eid = self._records[i]
    return {"images": paths, "description": text, "label": label, "is_video": video, "id": eid}


class ImagecodeSetSource:
  """Sets for evaluation, padded to `length` with empty sets (set_index -1)."""

  def __init__(self, split: ImagecodeSplit, length: int, cache_images: bool = False):
    cache = (decode_images([p for s in split.sets for p in s.image_paths]) if cache_images
             else None)
    self._sets = [(tuple(cache[p] for p in s.image_paths) if cache else s.image_paths,
                   [split.examples[i].description for i in s.example_indices],
                   [split.examples[i].label for i in s.example_indices],
                   list(s.example_indices), s.is_video) for s in split.sets]
    if any(len(s[0]) != NUM_CANDIDATES for s in self._sets):
      raise ValueError(f"{split.source}: sets without 10 image paths (read with check_images)")
    self._length = max(length, len(self._sets))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> dict[str, Any]:
    if i >= len(self._sets):
      return {"set_index": -1}
    paths, texts, labels, ex, video = self._sets[i]
    return {"set_index": i, "images": paths, "descriptions": texts, "labels": labels,
            "example_indices": ex, "is_video": video}


# --------------------------------------------------------------------------- transforms

class TextEncoder:
  """Optional caption cleaning + tokenizer call -> (input_ids [n, T], attention_mask [n, T])."""

  def __init__(self, tokenizer: Callable | None = None, max_length: int = 30,
               clean: Callable[[str], str] | None = None):
    self.tokenizer = tokenizer if tokenizer is not None else BlipTokenizer()
    self.max_length = max_length
    self.clean = clean

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if self.clean is not None:
      texts = [self.clean(t) for t in texts]
    out = self.tokenizer(list(texts), max_length=self.max_length)
    return (np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32))


class LoadPair(grain.transforms.RandomMap):
  """Pair record -> {"image": f32 [S, S, 3], "text": caption}."""

  def __init__(self, transform: Callable):
    self.transform = transform

  def random_map(self, element, rng: np.random.Generator):
    img = open_image(element["image"], str(element.get("id", "<bytes>")))
    return {"image": self.transform(img, rng), "text": element["caption"]}


class LoadCandidates(grain.transforms.RandomMap):
  """IMAGECODE example -> {"images": f32 [10, S, S, 3], "text", "label", "is_video"}; each
  candidate augmented independently (one Generator, consumed in candidate order)."""

  def __init__(self, transform: Callable):
    self.transform = transform

  def random_map(self, element, rng: np.random.Generator):
    name = str(element.get("id", "<bytes>"))
    images = np.stack([self.transform(open_image(x, f"{name}[{k}]"), rng)
                       for k, x in enumerate(element["images"])])
    return {"images": images, "text": element["description"],
            "label": np.int32(element["label"]), "is_video": np.bool_(element["is_video"])}


class Tokenize(grain.transforms.Map):
  """Replaces "text" by "input_ids" / "attention_mask" [T]."""

  def __init__(self, encoder: TextEncoder):
    self.encoder = encoder

  def map(self, element):
    element = dict(element)
    ids, mask = self.encoder([element.pop("text")])
    element["input_ids"], element["attention_mask"] = ids[0], mask[0]
    return element


class LoadSet(grain.transforms.Map):
  """Set record -> the evaluation row (see the module docstring), padded to D descriptions."""

  def __init__(self, image_size: int, max_descriptions: int, encoder: TextEncoder):
    self.image_size, self.d, self.encoder = image_size, max_descriptions, encoder

  def map(self, element):
    d, s = self.d, self.image_size
    valid = element["set_index"] >= 0
    texts = list(element["descriptions"]) if valid else []
    if len(texts) > d:
      raise ValueError(f"set {element['set_index']} has {len(texts)} descriptions > {d}")
    n = len(texts)
    ids, mask = self.encoder(texts + [""] * (d - n))
    pad = [-1] * (d - n)
    images = (np.stack([preprocess.preprocess_pil(open_image(x, f"set {element['set_index']}"),
                                                  s) for x in element["images"]]) if valid
              else np.zeros((NUM_CANDIDATES, s, s, 3), np.float32))
    return {"images": images, "input_ids": ids, "attention_mask": mask,
            "label": np.array((element["labels"] if valid else []) + pad, np.int32),
            "desc_mask": np.arange(d) < n,
            "example_index": np.array((element["example_indices"] if valid else []) + pad,
                                      np.int32),
            "set_index": np.int32(element["set_index"]), "set_mask": np.bool_(valid),
            "is_video": np.bool_(element.get("is_video", False))}


# --------------------------------------------------------------------------- sharding

def shard_rows(global_batch_size: int, shard: Any = None) -> np.ndarray:
  """Rows of each global batch this process loads.

  `shard`: None (contiguous block of jax.process_index() among jax.process_count()) or the
  row indices (`parallel.distributed.process_batch_rows` of the batch sharding)."""
  if shard is None:
    pi, pc = jax.process_index(), jax.process_count()
    if global_batch_size % pc:
      raise ValueError(f"global batch {global_batch_size} does not split over {pc} processes")
    n = global_batch_size // pc
    return np.arange(pi * n, (pi + 1) * n)
  rows = np.asarray(shard, np.int64).reshape(-1)
  if rows.size == 0 or rows.min() < 0 or rows.max() >= global_batch_size:
    raise ValueError(f"shard rows {rows.tolist()} not within a global batch of "
                     f"{global_batch_size}")
  return rows


class BatchRows(grain.MapDataset):
  """Element j = this process's row j % L of global batch j // L of the parent (epoch-aware:
  index e * len(self) + j reads parent index e * len(parent) + ...).

  A trailing partial global batch is dropped, or with `keep_remainder` kept and filled up to
  G rows with the epoch's first records (position p >= N reads position p - N). With
  `mask_key`, every element (a dict) gets `mask_key: bool` = it is a real row (False on the
  filling rows).
  """

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, rows: np.ndarray,
               keep_remainder: bool = False, mask_key: str | None = None):
    super().__init__(parent)
    self._g, self._rows = int(global_batch_size), [int(r) for r in rows]
    self._n_parent = len(parent)
    self._keep, self._mask_key = bool(keep_remainder), mask_key
    batches = (-(-self._n_parent // self._g) if self._keep else self._n_parent // self._g)
    self._length = batches * len(self._rows)

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"BatchRows(global_batch={self._g}, rows={len(self._rows)})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, j = divmod(index, self._length)
    b, r = divmod(j, len(self._rows))
    position = b * self._g + self._rows[r]
    real = position < self._n_parent
    element = self._parent[epoch * self._n_parent + position % self._n_parent]
    if self._mask_key is None:
      return element
    return {**element, self._mask_key: np.bool_(real)}


# --------------------------------------------------------------------------- batch shapes

def batch_shapes(kind: str, batch_size: int, *, image_size: int, max_length: int,
                 num_descriptions: int = 3) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (shape, dtype)} of one global batch of a pipeline (the formats in the module
  docstring), for compiling a step ahead of time without data.

  kind: 'pretrain' (pretrain_pipeline), 'finetune' (imagecode_train_pipeline) or 'eval'
  (imagecode_eval_pipeline with `num_descriptions` descriptions per set). `tests/
  test_data_pipeline.py` checks these against the pipelines' real batches.
  """
  b, s, t, d = batch_size, image_size, max_length, num_descriptions
  if kind == "pretrain":
    return {"image": ((b, s, s, 3), np.float32), "input_ids": ((b, t), np.int32),
            "attention_mask": ((b, t), np.int32)}
  if kind == "finetune":
    return {"images": ((b, NUM_CANDIDATES, s, s, 3), np.float32),
            "input_ids": ((b, t), np.int32), "attention_mask": ((b, t), np.int32),
            "label": ((b,), np.int32), "is_video": ((b,), np.bool_),
            EXAMPLE_MASK: ((b,), np.bool_)}
  if kind == "eval":
    return {"images": ((b, NUM_CANDIDATES, s, s, 3), np.float32),
            "input_ids": ((b, d, t), np.int32), "attention_mask": ((b, d, t), np.int32),
            "label": ((b, d), np.int32), "desc_mask": ((b, d), np.bool_),
            "example_index": ((b, d), np.int32), "set_index": ((b,), np.int32),
            "set_mask": ((b,), np.bool_), "is_video": ((b,), np.bool_)}
  raise ValueError(f"unknown batch kind {kind!r}: 'pretrain', 'finetune' or 'eval'")


# --------------------------------------------------------------------------- pipelines

@dataclasses.dataclass
class Pipeline:
  """An IterDataset plus its sizes; `iter(pipeline)` -> grain.DatasetIterator."""
  dataset: grain.IterDataset
  steps_per_epoch: int        # global batches per epoch (ceil(N / G) when the last, partial
                              # batch is kept, floor(N / G) when it is dropped)
  global_batch_size: int
  local_batch_size: int
  num_records: int            # examples (or sets) per epoch before dropping

  def __iter__(self):
    return iter(self.dataset)


def _finish(ds: grain.MapDataset, n: int, global_batch_size: int, shard, num_epochs,
            num_threads, prefetch_buffer_size, worker_count, drop_remainder: bool = True,
            mask_key: str | None = None) -> Pipeline:
  rows = shard_rows(global_batch_size, shard)
  if n < (global_batch_size if drop_remainder else 1):
    raise ValueError(f"{n} records cannot fill one global batch of {global_batch_size}")
  ds = BatchRows(ds, global_batch_size, rows, keep_remainder=not drop_remainder,
                 mask_key=mask_key).batch(len(rows), drop_remainder=True)
  steps = len(ds)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return Pipeline(it_ds, steps, global_batch_size, len(rows), n)


def pretrain_pipeline(pairs: PairsData | Sequence[PairExample] | Any, *, image_size: int,
                      global_batch_size: int, seed: int, tokenizer: Callable | None = None,
                      max_length: int = 30, augmentation: int | str = 0,
                      min_scale: float = 0.2, num_epochs: int | None = None, shard: Any = None,
                      cache_images: bool = False, num_threads: int = 2,
                      prefetch_buffer_size: int = 2, worker_count: int = 0) -> Pipeline:
  """Pre-training batches {"image", "input_ids", "attention_mask"} (docs/method.md#augmentation).

  `pairs`: reader output or any source of {"image": path | bytes, "caption"} records
  (e.g. tfds_pairs.TfdsPairSource). Captions are used as given (the reader cleaned them).
  `augmentation` as augment.make_train_transform (0 = BLIP's; "none" = resize only).
  """
  source = (PairSource(pairs, cache_images) if isinstance(pairs, (PairsData, list, tuple))
            else pairs)
  transform = augment.make_train_transform(image_size, augmentation, min_scale=min_scale)
  ds = (grain.MapDataset.source(source).shuffle(seed=seed)
        .random_map(LoadPair(transform), seed=seed + 1)
        .map(Tokenize(TextEncoder(tokenizer, max_length))))
  return _finish(ds, len(source), global_batch_size, shard, num_epochs, num_threads,
                 prefetch_buffer_size, worker_count)


def imagecode_train_pipeline(split: ImagecodeSplit | Any, *, image_size: int,
                             global_batch_size: int, seed: int,
                             tokenizer: Callable | None = None, max_length: int = 30,
                             augmentation: int | str = 0, num_epochs: int | None = None,
                             shard: Any = None, clean: Callable[[str], str] | None
                             = pre_caption_imagecode, cache_images: bool = False,
                             num_threads: int = 2, prefetch_buffer_size: int = 2,
                             worker_count: int = 0, drop_remainder: bool = False) -> Pipeline:
  """IMAGECODE fine-tuning batches {"images", "input_ids", "attention_mask", "label",
  "is_video", "example_mask"}; the 10 candidates are augmented independently (docs/method.md#augmentation);
  descriptions are cleaned with pre_caption_imagecode. `split`: reader output or a source of
  example records (e.g. tfds_imagecode.TfdsImagecodeSource). The last partial global batch
  of an epoch is kept, padded to the batch size with `example_mask` False on the padding
  rows (the reference's DataLoader without drop_last: ceil(N / G) steps per epoch,
  docs/decisions.md item 24), or dropped with `drop_remainder=True`."""
  source = (ImagecodeExampleSource(split, cache_images) if isinstance(split, ImagecodeSplit)
            else split)
  transform = augment.make_train_transform(image_size, augmentation)
  ds = (grain.MapDataset.source(source).shuffle(seed=seed)
        .random_map(LoadCandidates(transform), seed=seed + 1)
        .map(Tokenize(TextEncoder(tokenizer, max_length, clean))))
  return _finish(ds, len(source), global_batch_size, shard, num_epochs, num_threads,
                 prefetch_buffer_size, worker_count, drop_remainder=drop_remainder,
                 mask_key=EXAMPLE_MASK)


def imagecode_eval_pipeline(split: ImagecodeSplit, *, image_size: int, sets_per_batch: int,
                            tokenizer: Callable | None = None, max_length: int = 30,
                            max_descriptions: int | None = None, shard: Any = None,
                            clean: Callable[[str], str] | None = pre_caption_imagecode,
                            cache_images: bool = False, num_threads: int = 2,
                            prefetch_buffer_size: int = 2, worker_count: int = 0) -> Pipeline:
  """One pass over the sets, `sets_per_batch` (global) sets per batch, in file order, each
  set's images loaded once with the evaluation transform; the last batch is padded."""
  d = max_descriptions or max((len(s.example_indices) for s in split.sets), default=1)
  n_batches = max(1, math.ceil(len(split.sets) / sets_per_batch))
  source = ImagecodeSetSource(split, n_batches * sets_per_batch, cache_images)
  ds = grain.MapDataset.source(source).map(
      LoadSet(image_size, d, TextEncoder(tokenizer, max_length, clean)))
  pipe = _finish(ds, len(source), sets_per_batch, shard, 1, num_threads,
                 prefetch_buffer_size, worker_count)
  pipe.num_records = len(split.sets)
  return pipe


def eval_records(split: ImagecodeSplit, batch: dict[str, np.ndarray], scores: np.ndarray
                 ) -> list[dict[str, Any]]:
  """eval_metrics prediction records of one evaluation batch (this process's rows).

  `scores` [L, D, 10]: each description's scores for the 10 candidates (higher = better).
  Padded sets and descriptions are skipped; `gold` is None for an unlabelled split."""
  scores = np.asarray(scores, np.float32)
  out = []
  for row in np.nonzero(np.asarray(batch["set_mask"]))[0]:
    for j in np.nonzero(np.asarray(batch["desc_mask"][row]))[0]:
      e = split.examples[int(batch["example_index"][row, j])]
      out.append({"set": e.set_name, "index": e.position, "description": e.description,
                  "static": not e.is_video, "gold": e.label if split.labelled else None,
                  "pred": int(np.argmax(scores[row, j])),
                  "scores": [float(v) for v in scores[row, j]]})
  return out
