"""The Python API: load any parameter directory in one call, then score, rank and encode.

  >>> import contextblip_jax
  >>> model = contextblip_jax.load("ckpt/blip_tiny")   # converted BLIP, a stage's export/ or workdir
  >>> model.heads
  ('zero_shot',)
  >>> s = model.score("a red circle on the left", ["img0.png", "img1.png", "img2.png"])
  >>> s.itm_prob.shape, s.itc_sim.shape              # one value per image
  ((3,), (3,))
  >>> bool(((s.itm_prob > 0) & (s.itm_prob < 1)).all()), s.best in (0, 1, 2)
  (True, True)

  >>> ft = contextblip_jax.load("runs/finetune2")    # a fine-tuning stage-2 workdir
  >>> ft.heads
  ('zero_shot', 'stage1', 'stage2')
  >>> sets = [["img0.png", "img1.png", "img2.png"], ["img3.png", "img4.png", "img5.png"]]
  >>> r = ft.rank(["the red circle", ["a blue square", "two green circles"]], sets)
  >>> r[0].head, r[0].scores.shape, r[1].scores.shape   # [descriptions, images] per set
  ('stage2', (1, 3), (2, 3))
  >>> sorted(r[1].order[0].tolist())                    # image indices, best first
  [0, 1, 2]
  >>> f = model.encode_images(np.zeros((2, 48, 64, 3), np.uint8))
  >>> f.embeds.shape, f.itc.shape                        # [N, 1 + P, D], [N, E]
  ((2, 17, 32), (2, 16))

What each call computes, all through the code the evaluation runs:
  score(text, images)         one description against N images: the ITM match probability
                              (softmax index 1 of the ITM head on the [ENC] state; through
                              the vision adapter when the directory has one) and the ITC cosine
                              similarity of every image, from `evaluation/scorer.Scorer`
                              (the `python -m contextblip_jax.score` command's scorer), plus the
                              scores of `head` (below) with the N images as one candidate set.
  rank(texts, image_sets)     one or several descriptions per set against the set's K images,
                              scores [D, K] of a head per set, from the evaluation loop's jitted
                              step (`evaluation/scoring.make_score_step` / `score_batch`): each
                              set's vision features and image-side cross-attention keys/values
                              are computed once and shared by its descriptions; sets go in
                              batches of `sets_per_batch`, one compiled step per (head, K, D).
  encode_images(images)       the adapted image tokens the ITM cross-attention reads
                              [N, 1 + P, D] and the L2-normalised ITC image features [N, E].
Heads (`ContextBlip.SCORE_HEADS`; `model.heads` lists those the directory holds, and
`model.default_head`, the last of them, is used when `head` is not given):
  'zero_shot'  ITM match probability in (0, 1) (every directory: a converted BLIP, ContextBLIP
               pre-training);
  'stage1'     the fine-tuned per-candidate logit (a stage-1 or stage-2 export: the
               `prediction_layer` group), any real number, higher = better;
  'stage2'     the logit after the inter-context encoder over the set's candidates (a stage-2
               export: `context_encoder`); at most `num_candidates` (10) images per set, and
               `is_video` adds the encoder's position embeddings (IMAGECODE's video sets).
Images: file paths, PIL images, or arrays [H, W, 3] / [N, H, W, 3] of uint8 (0-255) or float
RGB in [0, 1] (quantised to 8 bits, as a saved image is); each is resized to the model's
image size exactly as an image file is (`data/preprocess.py`: bicubic, CLIP normalisation).
Text is cleaned as IMAGECODE's (`pre_caption_imagecode`, unless `pre_caption=False`) and
tokenised with the directory's vocabulary at `max_length` tokens.
Bad input raises an error naming the argument, the entry or the file: FileNotFoundError /
ValueError for a path that is not a parameter directory, ValueError for an empty description,
a wrong image shape or value range, mismatched numbers of texts and image sets or a head the
directory does not hold, `preprocess.ImageLoadError` for an image file that cannot be read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from contextblip_jax.data import preprocess
from contextblip_jax.data.tokenizer import DEFAULT_MAX_LENGTH
from contextblip_jax.evaluation import scoring
from contextblip_jax.evaluation.scorer import Scorer
from contextblip_jax.models.contextblip import ContextBlip, make_model
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.storage.metric_writers import Progress
from contextblip_jax.storage.param_dir import load_param_dir

HEADS = scoring.HEADS          # ('zero_shot', 'stage1', 'stage2')


@dataclasses.dataclass(frozen=True)
class Scores:
  """`Model.score` of one description against N images (NumPy, float32)."""
  text: str                # the description as given
  caption: str             # as tokenised (after the IMAGECODE cleaning)
  itm_prob: np.ndarray     # [N] ITM match probability (zero-shot head)
  itm_logits: np.ndarray   # [N, 2] ITM logits (index 1 = match)
  itc_sim: np.ndarray      # [N] ITC cosine similarity
  head: str                # the head of `scores`
  scores: np.ndarray       # [N] scores of `head` ('zero_shot': equal to itm_prob)

  @property
  def best(self) -> int:
    """Index of the image with the highest `scores` (the first on a tie)."""
    return int(np.argmax(self.scores))


@dataclasses.dataclass(frozen=True)
class Ranking:
  """`Model.rank` result of one image set: D descriptions against its K images."""
  texts: tuple[str, ...]   # the set's descriptions as given
  head: str
  scores: np.ndarray       # float32 [D, K], higher = better

  @property
  def best(self) -> np.ndarray:
    """int [D]: the best image of each description (the first on a tie)."""
    return np.argmax(self.scores, axis=-1)

  @property
  def order(self) -> np.ndarray:
    """int [D, K]: image indices from best to worst (stable on ties)."""
    return np.argsort(-self.scores, axis=-1, kind="stable")


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
  """`Model.encode_images` of N images (NumPy, float32)."""
  embeds: np.ndarray       # [N, 1 + P, D] adapted image tokens (the ITM cross-attention input)
  itc: np.ndarray          # [N, E] L2-normalised ITC image features (vision_proj of [CLS])


def load(path: str | os.PathLike, *, dtype: str = "float32",
         attention_impl: str = "explicit", max_length: int = DEFAULT_MAX_LENGTH,
         pre_caption: bool = True, batch_size: int = 10, sets_per_batch: int = 8,
         devices: Sequence[jax.Device] | None = None) -> "Model":
  """Loads a parameter directory for scoring: `model = contextblip_jax.load("ckpt/blip")`.

  Args:
    path: a parameter directory (`python -m weight_convert` output, a stage's `export/`) or a
      stage workdir (`storage/param_dir.load_param_dir`, which reads every layout).
    dtype: compute dtype 'float32' | 'bfloat16' (parameters stay float32).
    attention_impl: 'explicit' | 'xla' | 'cudnn' (`models/contextblip.make_model`).
    max_length: tokens per description, [CLS] and [SEP] included.
    pre_caption: clean descriptions as IMAGECODE's evaluation does.
    batch_size: images per forward pass in `score` and `encode_images`.
    sets_per_batch: image sets per step in `rank`.
    devices: the devices `rank` splits its sets over (default: the first device); `score`
      and `encode_images` run on the first device, as the scoring command does.

  >>> model = load("ckpt/blip_tiny")
  >>> model.default_head, model.image_size
  ('zero_shot', 32)
  """
  path = os.fspath(path)
  if not isinstance(path, str) or not path:
    raise ValueError(f"load: path must name a parameter directory, got {path!r}")
  if max_length < 3:
    raise ValueError(f"load: max_length must be >= 3, got {max_length}")
  if sets_per_batch < 1:
    raise ValueError(f"load: sets_per_batch must be >= 1, got {sets_per_batch}")
  return Model(load_param_dir(path), checkpoint_dir=os.path.abspath(path), dtype=dtype,
               attention_impl=attention_impl, max_length=max_length, pre_caption=pre_caption,
               batch_size=batch_size, sets_per_batch=sets_per_batch, devices=devices)


def available_heads(params: dict[str, Any], provenance: dict[str, Any]) -> tuple[str, ...]:
  """The heads a parameter tree can score with: 'zero_shot', then 'stage1' with a
  `prediction_layer`, then 'stage2' with a `context_encoder` too, unless the directory is a
  stage-1 export (its context encoder was never trained)."""
  heads = ["zero_shot"]
  if "prediction_layer" in params:
    heads.append("stage1")
    stage1_export = provenance.get("writer") == "train" and provenance.get("stage") == "finetune1"
    if "context_encoder" in params and not stage1_export:
      heads.append("stage2")
  return tuple(heads)


class Model:
  """A loaded parameter directory: `score`, `rank`, `encode_images` (see the module doc).

  Attributes: path (the parameter directory read), checkpoint_dir (as given), config
  (`ContextBlipConfig`), heads, default_head, image_size, provenance, scorer (the
  `evaluation/scorer.Scorer` behind `score`)."""

  def __init__(self, loaded, *, checkpoint_dir: str = "", dtype: str = "float32",
               attention_impl: str = "explicit", max_length: int = DEFAULT_MAX_LENGTH,
               pre_caption: bool = True, batch_size: int = 10, sets_per_batch: int = 8,
               devices: Sequence[jax.Device] | None = None):
    self.path = loaded.path
    self.checkpoint_dir = checkpoint_dir or loaded.path
    self.config = loaded.model
    self.provenance = loaded.provenance
    self.heads = available_heads(loaded.params, loaded.provenance)
    self.default_head = self.heads[-1]
    self.image_size = self.config.blip.vision.image_size
    self.sets_per_batch = int(sets_per_batch)
    self._model: ContextBlip = make_model(self.config, dtype, attention_impl)
    self.mesh = shd.make_mesh({"data": -1}, list(devices) if devices else jax.devices()[:1])
    params = scoring.head_params(loaded.params, self._model, self.default_head)
    shardings = scoring.param_shardings_for(self._model, params, self.mesh)
    loaded.params = params            # other groups (TMIM) are dropped; the host copy of
    self.params = shd.device_put_in_place(params, shardings)   # each leaf freed as placed
    # The Scorer places its groups on the first device: the same buffers when the mesh is that
    # device (no second copy).
    self.scorer = Scorer(loaded, max_length=max_length, pre_caption=pre_caption,
                         batch_size=batch_size, checkpoint_dir=self.checkpoint_dir, dtype=dtype,
                         attention_impl=attention_impl)

  def __repr__(self) -> str:
    return (f"Model({self.checkpoint_dir!r}, heads={self.heads}, "
            f"image_size={self.image_size})")

  # ------------------------------------------------------------------ inputs
  def load_images(self, images: Any, where: str = "images") -> np.ndarray:
    """Images (paths, PIL images, arrays [H, W, 3] or [N, H, W, 3], uint8 or float in
    [0, 1]) -> the model's pixels float32 [N, S, S, 3]; errors name `where` and the entry."""
    return np.stack([_pixels(x, self.image_size, w) for x, w in _image_items(images, where)])

  def _texts(self, texts: Sequence[str], names: Sequence[str]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Descriptions -> (input_ids, attention_mask) int32 [D, T]; errors name each entry by
    `names` (the argument it came from)."""
    for t, w in zip(texts, names):
      if not isinstance(t, str):
        raise TypeError(f"{w}: a description must be a str, got {type(t).__name__}")
      try:
        self.scorer.encode_text(t)
      except ValueError as e:
        raise ValueError(f"{w}: {e}") from None
    _, ids, mask = self.scorer.encode_texts(list(texts))
    return ids, mask

  def _head(self, head: str | None) -> str:
    head = self.default_head if head is None else head
    if head not in HEADS:
      raise ValueError(f"head {head!r} is not one of {HEADS}")
    if head not in self.heads:
      raise ValueError(f"head {head!r}: {self.path} does not hold its parameters (heads "
                       f"available: {self.heads})")
    return head

  def _check_set_size(self, k: int, head: str, where: str) -> None:
    if k == 0:
      raise ValueError(f"{where}: no images")
    if head == "stage2" and k > self.config.num_candidates:
      raise ValueError(f"{where}: {k} images, but head 'stage2' ranks at most "
                       f"{self.config.num_candidates} candidates per set (its context "
                       f"encoder's positions); use head='stage1' or 'zero_shot'")

  # ------------------------------------------------------------------ score
  def score(self, text: str, images: Any, head: str | None = None,
            is_video: bool = False) -> Scores:
    """One description against N images -> `Scores` (itm_prob, itc_sim [N]; scores [N] of
    `head`, default `default_head`; `is_video` for 'stage2').

    >>> s = load("ckpt/blip_tiny").score("two green squares", np.zeros((3, 32, 32, 3)))
    >>> s.head, s.scores.shape, bool((s.scores == s.itm_prob).all())
    ('zero_shot', (3,), True)
    """
    head = self._head(head)
    if not isinstance(text, str):
      raise TypeError(f"text: a description must be a str, got {type(text).__name__} (use "
                      f"rank() for several)")
    encoded = self._texts([text], ["text"])
    pixels = self.load_images(images, "images")
    if head != "zero_shot":
      self._check_set_size(len(pixels), head, "images")
    out = self.scorer.score_pixels(pixels, text)
    caption = self.scorer.encode_text(text)[0]
    scores = out["itm_prob"]
    if head != "zero_shot":
      scores = self._rank_pixels([(encoded, pixels, bool(is_video))], head)[0][0]
    return Scores(text=text, caption=caption, itm_prob=out["itm_prob"],
                  itm_logits=out["itm_logits"], itc_sim=out["itc_sim"], head=head,
                  scores=np.asarray(scores, np.float32))

  # ------------------------------------------------------------------ rank
  def rank(self, texts: Sequence[str | Sequence[str]], image_sets: Sequence[Any],
           head: str | None = None, is_video: bool | Sequence[bool] = False,
           progress: bool | None = None) -> list[Ranking]:
    """Descriptions against their image sets -> one `Ranking` per set (scores [D, K]).

    Args:
      texts: one entry per set: a description, or a list of descriptions of that set.
      image_sets: one entry per set: its K images (paths, or an array [K, H, W, 3], ...).
      head: 'zero_shot' | 'stage1' | 'stage2' (default `default_head`).
      is_video: per set (or one value for all): the set is a video's frames ('stage2').
      progress: print a progress line per batch (default: when there are 5 batches or more).

    >>> images = np.zeros((3, 32, 32, 3), np.uint8)      # three identical images
    >>> r = load("runs/finetune2").rank([["the left one", "a red circle"], "no circle"],
    ...                                 [images, ["img0.png", "img1.png", "img2.png"]])
    >>> r[0].scores.shape, r[0].best.tolist(), r[1].scores.shape
    ((2, 3), [0, 0], (1, 3))
    """
    head = self._head(head)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
      raise TypeError("texts: expected a list with one entry per image set (a description, "
                      f"or a list of descriptions), got {type(texts).__name__}")
    if isinstance(image_sets, (str, np.ndarray)) or not isinstance(image_sets, Sequence):
      raise TypeError("image_sets: expected a list with one entry per set (its images), got "
                      f"{type(image_sets).__name__}")
    if len(texts) != len(image_sets):
      raise ValueError(f"rank: texts has {len(texts)} entries but image_sets has "
                       f"{len(image_sets)}; give one entry of each per image set")
    videos = ([bool(is_video)] * len(texts) if isinstance(is_video, (bool, np.bool_))
              else [bool(v) for v in is_video])
    if len(videos) != len(texts):
      raise ValueError(f"rank: is_video has {len(videos)} entries for {len(texts)} sets")
    sets = []
    for i, (t, imgs) in enumerate(zip(texts, image_sets)):
      descs = [t] if isinstance(t, str) else list(t)
      names = ([f"texts[{i}]"] if isinstance(t, str)
               else [f"texts[{i}][{j}]" for j in range(len(descs))])
      if not descs:
        raise ValueError(f"texts[{i}]: no description")
      items = _image_items(imgs, f"image_sets[{i}]")      # checked, not decoded yet
      self._check_set_size(len(items), head, f"image_sets[{i}]")
      sets.append((tuple(descs), self._texts(descs, names), items, videos[i]))
    by_k: dict[int, list[int]] = {}
    for i, s in enumerate(sets):
      by_k.setdefault(len(s[2]), []).append(i)
    n_batches = sum(-(-len(v) // self._batch_sets(len(v))) for v in by_k.values())
    bar = Progress(n_batches, "rank", every=1, unit="batch",
                   enabled=(n_batches >= 5) if progress is None else progress)
    out: list[Ranking | None] = [None] * len(sets)
    for idx in by_k.values():
      step = self._batch_sets(len(idx))
      for start in range(0, len(idx), step):
        chunk = idx[start:start + step]
        rows = [(sets[i][1], np.stack([_pixels(x, self.image_size, w) for x, w in sets[i][2]]),
                 sets[i][3]) for i in chunk]
        for i, scores in zip(chunk, self._rank_pixels(rows, head, step)):
          out[i] = Ranking(texts=sets[i][0], head=head, scores=scores)
        bar.update(1)
    return out  # type: ignore[return-value]

  def _batch_sets(self, n: int) -> int:
    """Sets per step: at most `sets_per_batch`, a multiple of the mesh's batch devices."""
    dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    return -(-min(n, self.sets_per_batch) // dp) * dp

  def _rank_pixels(self, rows, head: str, num_sets: int | None = None) -> list[np.ndarray]:
    """rows [((ids [D, T], mask [D, T]), pixels [K, S, S, 3], is_video)] of one K ->
    scores [D_i, K] per row, through the evaluation's score step (padded to `num_sets`)."""
    num_sets = num_sets or self._batch_sets(len(rows))
    k = rows[0][1].shape[0]
    d = max(r[0][0].shape[0] for r in rows)
    t = rows[0][0][0].shape[1]
    s = self.image_size
    batch = {"images": np.zeros((num_sets, k, s, s, 3), np.float32),
             "input_ids": np.zeros((num_sets, d, t), np.int32),
             "attention_mask": np.zeros((num_sets, d, t), np.int32),
             "is_video": np.zeros((num_sets,), bool),
             "desc_mask": np.zeros((num_sets, d), bool),
             "example_index": np.full((num_sets, d), -1, np.int32),
             "set_mask": np.zeros((num_sets,), bool)}
    for j, ((ids, mask), pixels, video) in enumerate(rows):
      n = ids.shape[0]
      batch["images"][j] = pixels
      batch["input_ids"][j] = ids[np.minimum(np.arange(d), n - 1)]   # padding: repeats
      batch["attention_mask"][j] = mask[np.minimum(np.arange(d), n - 1)]
      batch["is_video"][j] = video
      batch["desc_mask"][j, :n] = True
      batch["example_index"][j, :n] = np.arange(n)
      batch["set_mask"][j] = True
    scores, _ = self._step(head, batch)(self.params_for(head), batch)
    scores = np.asarray(jax.device_get(scores))                        # [L, D, K]
    return [scores[j, :r[0][0].shape[0]] for j, r in enumerate(rows)]

  def params_for(self, head: str) -> dict[str, Any]:
    """The parameter groups (on the devices) that `head` reads."""
    return scoring.head_params(self.params, self._model, head)

  def _step(self, head: str, batch: dict[str, np.ndarray]):
    shapes = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
    return _score_step(self._model, head, self.mesh, tuple(self.params_for(head)), shapes)

  # ------------------------------------------------------------------ encode
  def encode_images(self, images: Any) -> ImageFeatures:
    """Images -> `ImageFeatures`: embeds [N, 1 + P, D] (adapted image tokens), itc [N, E].

    >>> f = load("ckpt/blip_tiny").encode_images(["img0.png", "img1.png"])
    >>> f.embeds.shape, np.allclose(np.linalg.norm(f.itc, axis=-1), 1, atol=1e-5)
    ((2, 17, 32), True)
    """
    pixels = self.load_images(images, "images")
    fn = _encode_fn(self._model)
    params = self.scorer.params
    bs = min(self.scorer.batch_size, len(pixels))
    outs = []
    for start in range(0, len(pixels), bs):
      batch = pixels[start:start + bs]
      real = batch.shape[0]
      if real < bs:                    # one compiled shape: the last batch padded
        batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, axis=0)])
      outs.append(jax.tree.map(lambda x: np.asarray(x)[:real], fn(params, batch)))
    return ImageFeatures(embeds=np.concatenate([o["embeds"] for o in outs]),
                         itc=np.concatenate([o["itc"] for o in outs]))


@functools.lru_cache(maxsize=32)
def _score_step(model: ContextBlip, head: str, mesh: jax.sharding.Mesh, groups: tuple[str, ...],
                shapes: tuple[tuple[str, tuple[int, ...], str], ...]):
  """The evaluation's jitted score step for one batch shape, shared by every Model of the
  same architecture and mesh (one compilation)."""
  shardings = scoring.param_shardings_for(model, dict.fromkeys(groups), mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for k, shape, dtype in shapes}
  return scoring.make_score_step(model, head, shardings, shd.batch_shardings(batch, mesh), mesh)


def _encode_images(model: ContextBlip, pixels):
  """`model.apply(..., method=_encode_images)`: ViT with taps -> adapter; ITC features."""
  vision = model.encode_image(pixels)
  return {"embeds": model.adapt(vision).astype(np.float32),
          "itc": model.itc_image_features(vision.last_hidden_state)}


@functools.lru_cache(maxsize=8)
def _encode_fn(model: ContextBlip):
  return jax.jit(lambda params, pixels: model.apply({"params": params}, pixels,
                                                    method=_encode_images))


# ------------------------------------------------------------------ image inputs

def _image_items(images: Any, where: str) -> list[tuple[Any, str]]:
  """(image, its name for errors) of each image, checked but not decoded: paths must be
  files, arrays [H, W, 3] or [N, H, W, 3] of uint8 or float in [0, 1]."""
  if isinstance(images, (str, os.PathLike, Image.Image)):
    images = [images]
  elif isinstance(images, (np.ndarray, jax.Array)):
    a = np.asarray(images)
    if a.ndim == 3:
      images = [a]
    elif a.ndim == 4:
      images = list(a)
    else:
      raise ValueError(f"{where}: an image array must be [H, W, 3] or [N, H, W, 3], got shape "
                       f"{list(a.shape)}")
  elif not isinstance(images, Sequence):
    raise TypeError(f"{where}: expected image paths, PIL images or arrays, got "
                    f"{type(images).__name__}")
  items = []
  for i, x in enumerate(images):
    w = f"{where}[{i}]"
    if isinstance(x, (str, os.PathLike)):
      path = os.fspath(x)
      if not os.path.isfile(path):
        raise preprocess.ImageLoadError(path, f"{w}: " + (
            "no such file" if not os.path.exists(path) else "not a regular file"))
      items.append((path, path))
    elif isinstance(x, Image.Image):
      items.append((x, w))
    elif isinstance(x, (np.ndarray, jax.Array)):
      a = np.asarray(x)
      if a.ndim != 3 or a.shape[-1] != 3 or min(a.shape[:2]) < 1:
        raise ValueError(f"{w}: an image array must be [H, W, 3] (RGB), got shape "
                         f"{list(a.shape)}")
      if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
          raise ValueError(f"{w}: image arrays must be uint8 (0-255) or float in [0, 1], got "
                           f"{a.dtype}")
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
          raise ValueError(f"{w}: float images must be RGB in [0, 1] (not normalised pixels), "
                           f"got values in [{lo:g}, {hi:g}]")
      items.append((a, w))
    else:
      raise TypeError(f"{w}: expected an image path, a PIL image or an array, got "
                      f"{type(x).__name__}")
  if not items:
    raise ValueError(f"{where}: no images")
  return items


def _pixels(x: Any, size: int, where: str) -> np.ndarray:
  """One checked image (`_image_items`) -> float32 [size, size, 3] normalised pixels."""
  if isinstance(x, str):
    return preprocess.load_image(x, size)
  if isinstance(x, Image.Image):
    img = x
  else:
    a = x if x.dtype == np.uint8 else np.round(np.asarray(x, np.float64) * 255.0).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(a), "RGB")
  try:
    return preprocess.preprocess_pil(img, size)
  except (OSError, ValueError) as e:
    raise ValueError(f"{where}: cannot convert the image ({e})") from e
