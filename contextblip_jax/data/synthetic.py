"""Embedded default dataset: seeded synthetic contrastive sets in the exact IMAGECODE layout,
plus pre-training pairs, small enough for the whole method to run on 2 CPU cores in minutes.

Layout written under `out_dir` (same file names and JSON/YAML schemas as the real benchmark):

  image-sets/<set_name>/img<k>.jpg   10 candidates per set
  train_data.json                    {set_name: {"<gold 0-9>": description}}
  valid_data.json                    same
  test_data_unlabeled.json           {set_name: [description, ...]}
  manual_annotation_valid.yaml       {set_name: {"<gold>": {description, annotation,
                                                          visualization_id}}}
  pairs.json + pair-images/*.jpg     [{"image": "pair-images/pair_000000.jpg", "caption": str}]
  synthetic_meta.json                parameters, counts, each description's kind, test labels

Sets. Static sets ('open-images-synth_000123', files img0..img9) change one attribute of one
object across the 10 candidates: colour (sometimes an odd one out), count, position, size or
presence; the other objects only jitter. Video-like sets ('synthvideo-000123', files img<k> with
k = start + 3j, so numeric order differs from string order: img2 < img5 < ... < img29) show one
object moving (line or arc), appearing/disappearing, changing colour, growing, or copies
entering one by one. Every description is true in exactly one candidate (its gold), and each
set's descriptions have distinct golds. Kinds and tags (real IMAGECODE tag vocabulary):
  decidable from one image: exists (col|n), negation (neg), count (q), colour (col),
    position (s), relation (s), size (n), coref (cor, s)
  context, need the other candidates (con): extreme_position (s) "the red circle is further
    right than in any other image", extreme_size (n) "the frame where the blue square is
    largest", most_count (q), odd_colour (col), closest (s), and, in frame order,
    temporal_visibility (t, v) "the first frame where the yellow triangle is visible",
    temporal_colour (t, col), temporal_count (t, q).
Pairs show one to four objects with captions built from the same single-image phrasings plus
a full-scene caption, so pre-training teaches every object, colour, number, size and position
word of the descriptions (the comparison words, e.g. "first", "furthest", are learnt only in
fine-tuning).

Determinism: every set / pair image draws from its own `np.random.default_rng([seed, split, i])`,
so the same seed gives byte-identical files (and changing one split's size leaves the other
splits' images and descriptions unchanged; set names are numbered across the splits). Output is written to a temporary sibling directory and renamed into place.

  python -m contextblip_jax.data.synthetic --out DIR --seed 0 [--n_train_sets 500 ...]
In process: `generate(out_dir, seed, **sizes)`, or `ensure(...)` to reuse an identical one.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from typing import Any, Sequence

import numpy as np
import yaml

from contextblip_jax.storage.atomic import atomic_directory
from contextblip_jax.data import synthetic_scenes as sc

DEFAULTS = dict(
    n_train_sets=500,        # training sets (~2.2 descriptions each)
    n_valid_sets=200,        # validation sets (tagged in manual_annotation_valid.yaml)
    n_test_sets=100,         # unlabelled test sets (labels in synthetic_meta.json)
    n_pairs=2000,            # pre-training (image, caption) pairs
    image_size=32,           # side of every JPEG, pixels
    video_fraction=0.5,      # fraction of sets that are video-like
    context_fraction=0.4,    # P(a description slot prefers a 'con' phrasing); many set types
                             # only admit 'con' ones, so ~2/3 of descriptions are 'con'
                             # at the defaults (the real valid split: 474 of 783 tagged)
    captions_per_image=2,    # pairs per pre-training image
    frame_step=3,            # video frame numbers k = start + frame_step * j
)
STATIC_TYPES = {"colour": .25, "count": .2, "position": .25, "size": .15, "presence": .15}
VIDEO_TYPES = {"move": .3, "appear": .25, "recolour": .15, "grow": .15, "count": .15}
SPLITS = (("train", "train_data.json"), ("valid", "valid_data.json"),
          ("test", "test_data_unlabeled.json"))
CELLS = [(c, r) for r in range(3) for c in range(3)]
JPEG_OPTIONS = dict(format="JPEG", quality=95, subsampling=0)


# --------------------------------------------------------------------------- objects

def _obj(rng, oid, cell, shape=None, colour=None, r=None, jitter=0.04) -> sc.Obj:
  shape = shape or sc.SHAPES[int(rng.integers(len(sc.SHAPES)))]
  colour = colour or sc.COLOUR_NAMES[int(rng.integers(len(sc.COLOUR_NAMES)))]
  r = r if r is not None else (sc.SMALL_R if rng.random() < 0.5 else sc.LARGE_R)
  x, y = (sc.CELL_CENTRES[cell[0]] + rng.uniform(-jitter, jitter),
          sc.CELL_CENTRES[cell[1]] + rng.uniform(-jitter, jitter))
  return sc.Obj(oid, shape, colour, float(x), float(y), float(r))


def _cells(rng, n, exclude=()) -> list[tuple[int, int]]:
  free = [c for c in CELLS if c not in exclude]
  return [free[i] for i in rng.choice(len(free), n, replace=False)]


def _cell(o: sc.Obj) -> tuple[int, int]:
  return min(2, int(o.x * 3)), min(2, int(o.y * 3))


def _base_scene(rng, n) -> list[sc.Obj]:
  """`n` objects with distinct shapes (so "the square" is a referent) in distinct cells."""
  shapes = [sc.SHAPES[i] for i in rng.choice(len(sc.SHAPES), n, replace=False)]
  return [_obj(rng, i, cell, shape=s) for i, (cell, s) in enumerate(zip(_cells(rng, n), shapes))]


def _jitter(rng, o: sc.Obj, amount: float) -> sc.Obj:
  return o.with_(x=float(o.x + rng.uniform(-amount, amount)),
                 y=float(o.y + rng.uniform(-amount, amount)))


def _draw_type(rng, table: dict[str, float]) -> str:
  names = list(table)
  return names[int(rng.choice(len(names), p=np.array(list(table.values())) / sum(table.values())))]


# --------------------------------------------------------------------------- static sets

def _static_variants(rng, kind, target, others) -> list[list[sc.Obj]]:
  """Ten versions of `target` (each a list of objects) differing in one attribute."""
  if kind == "colour":
    if rng.random() < 0.4:                       # odd one out: 9 x colour a, 1 x colour b
      a, b = (sc.COLOUR_NAMES[i] for i in rng.choice(len(sc.COLOUR_NAMES), 2, replace=False))
      cols = [a] * 10
      cols[int(rng.integers(10))] = b
    else:
      while True:
        cols = [sc.COLOUR_NAMES[i] for i in rng.integers(len(sc.COLOUR_NAMES), size=10)]
        if any(cols.count(c) == 1 for c in cols):
          break
    return [[target.with_(colour=c)] for c in cols]
  if kind == "count":
    taken = [_cell(o) for o in others]
    return [[_obj(rng, 100 + j, cell, target.shape, target.colour, target.r)
             for j, cell in enumerate(_cells(rng, int(n), taken))]
            for n in rng.integers(1, 6, size=10)]
  if kind == "position":
    taken = [_cell(o) for o in others]
    return [[_obj(rng, target.oid, _cells(rng, 1, taken)[0], target.shape, target.colour,
                  target.r, jitter=0.09)] for _ in range(10)]
  if kind == "size":                             # 8 middling sizes, a clear largest, smallest
    mid = rng.uniform(0.095, 0.145, size=8)
    sizes = np.concatenate([mid, [mid.max() + rng.uniform(0.03, 0.045),
                                  mid.min() - rng.uniform(0.025, 0.035)]])
    return [[target.with_(r=float(r))] for r in rng.permutation(sizes)]
  if kind == "presence":
    if rng.random() < 0.5:
      present = np.ones(10, bool)
      present[int(rng.integers(10))] = False
    else:
      present = np.zeros(10, bool)
      present[rng.choice(10, int(rng.integers(1, 4)), replace=False)] = True
    return [[target.with_(visible=bool(p))] for p in present]
  raise ValueError(f"unknown static set type {kind!r}")


def static_candidates(rng, kind: str) -> list[tuple]:
  base = _base_scene(rng, int(rng.integers(2, 4)))
  target, others = base[0], base[1:]
  return [tuple(v) + tuple(_jitter(rng, o, 0.02) for o in others)
          for v in _static_variants(rng, kind, target, others)]


# --------------------------------------------------------------------------- video sets

def _trajectory(rng) -> tuple[np.ndarray, np.ndarray]:
  t = np.linspace(0.0, 1.0, 10)
  while True:
    x0, x1 = rng.uniform(0.12, 0.88, size=2)
    if abs(x1 - x0) >= 0.4:
      break
  x = x0 + (x1 - x0) * t
  if rng.random() < 0.5:                          # straight line
    y0, y1 = rng.uniform(0.12, 0.88, size=2)
    y = y0 + (y1 - y0) * t
  else:                                           # arc with its apex at a random frame
    tp = rng.uniform(0.15, 0.85)
    y = rng.uniform(0.12, 0.3) + rng.uniform(0.35, 0.58) * ((t - tp) / max(tp, 1 - tp)) ** 2
    if rng.random() < 0.3:
      y = 1.0 - y
  return x, y


def _actor_frames(rng, kind, actor, statics) -> list[list[sc.Obj]]:
  """The changing object(s) in each of the 10 frames."""
  if kind == "move":
    x, y = _trajectory(rng)
    return [[actor.with_(x=float(a), y=float(b))] for a, b in zip(x, y)]
  if kind == "appear":
    a = int(rng.integers(1, 7))
    b = 9 if rng.random() < 0.4 else int(rng.integers(a + 1, 10))
    dx = rng.uniform(-0.02, 0.02)
    return [[actor.with_(x=float(actor.x + dx * j), visible=a <= j <= b)] for j in range(10)]
  if kind == "recolour":
    c0, c1 = (sc.COLOUR_NAMES[i] for i in rng.choice(len(sc.COLOUR_NAMES), 2, replace=False))
    change = int(rng.integers(2, 9))
    return [[actor.with_(colour=c0 if j < change else c1)] for j in range(10)]
  if kind == "grow":
    while True:
      r0, r1 = rng.uniform(0.06, 0.2, size=2)
      if abs(r1 - r0) >= 0.11:
        break
    t = np.linspace(0.0, 1.0, 10)
    if rng.random() < 0.3:                        # grows then shrinks (or the reverse)
      tp = rng.uniform(0.2, 0.8)
      r = r1 + (r0 - r1) * np.abs((t - tp) / max(tp, 1 - tp))
    else:
      r = r0 + (r1 - r0) * t
    return [[actor.with_(r=float(v))] for v in r]
  if kind == "count":
    final = int(rng.integers(2, 6))
    start = int(rng.integers(1, final))
    enter = sorted(int(f) for f in rng.choice(np.arange(1, 10), final - start, replace=False))
    cells = _cells(rng, final, [_cell(o) for o in statics])
    copies = [_obj(rng, 100 + j, c, actor.shape, actor.colour, actor.r)
              for j, c in enumerate(cells)]
    times = [0] * start + enter
    return [[o for o, t0 in zip(copies, times) if t0 <= j] for j in range(10)]
  raise ValueError(f"unknown video set type {kind!r}")


def video_candidates(rng, kind: str) -> list[tuple]:
  base = _base_scene(rng, int(rng.integers(2, 4)))
  actor, statics = base[0], base[1:]
  return [tuple(_jitter(rng, o, 0.008) for o in statics) + tuple(moving)
          for moving in _actor_frames(rng, kind, actor, statics)]


# --------------------------------------------------------------------------- descriptions

def referents(cands: Sequence[tuple]) -> list[tuple[str | None, str]]:
  """(colour, shape) of every visible object in the set, then each shape alone."""
  specs = sorted({(o.colour, o.shape) for s in cands for o in s if o.visible})
  return specs + sorted({(None, shape) for _, shape in specs}, key=lambda s: s[1])


def choose_descriptions(rng, descs, n_desc: int, context_fraction: float) -> list:
  """Up to `n_desc` uniquely-true descriptions with distinct golds; each slot prefers a 'con'
  phrasing with probability `context_fraction`, then draws a kind uniformly, then a phrasing."""
  unique: dict[str, sc.Description] = {}
  for d in descs:
    if d.gold is not None and d.text not in unique:
      unique[d.text] = d
  chosen, golds = [], set()
  for _ in range(n_desc):
    want = bool(rng.random() < context_fraction)
    for con in (want, not want):
      pool = [d for d in unique.values() if ("con" in d.tags) == con and d.gold not in golds]
      if pool:
        kinds = sorted({d.kind for d in pool})
        kind = kinds[int(rng.integers(len(kinds)))]
        options = [d for d in pool if d.kind == kind]
        pick = options[int(rng.integers(len(options)))]
        chosen.append(pick)
        golds.add(pick.gold)
        break
  return chosen


def make_set(rng, video: bool, context_fraction: float) -> tuple[str, list, list]:
  """(set type, 10 candidate scenes, chosen descriptions) of one set."""
  for _ in range(50):
    kind = _draw_type(rng, VIDEO_TYPES if video else STATIC_TYPES)
    cands = video_candidates(rng, kind) if video else static_candidates(rng, kind)
    if not video:
      cands = [cands[i] for i in rng.permutation(10)]
    specs = referents(cands)
    descs = (sc.absolute_descriptions(cands, specs, rng)
             + sc.context_descriptions(cands, specs, video, rng))
    n_desc = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
    chosen = choose_descriptions(rng, descs, n_desc, context_fraction)
    if chosen:
      return kind, cands, chosen
  raise RuntimeError("could not generate a set with a uniquely true description")


# --------------------------------------------------------------------------- pairs

def pair_scene(rng) -> tuple:
  n = int(rng.integers(1, 5))
  objs = [_obj(rng, i, cell) for i, cell in enumerate(_cells(rng, n))]
  if n >= 2 and rng.random() < 0.35:               # repeated objects teach counting
    k = int(rng.integers(2, n + 1))
    objs = [o.with_(shape=objs[0].shape, colour=objs[0].colour, r=objs[0].r) if i < k else o
            for i, o in enumerate(objs)]
  return tuple(objs)


def pair_captions(rng, scene, k: int) -> list[str]:
  present = sorted({(o.colour, o.shape) for o in scene})
  absent = [(c, s) for c in sc.COLOUR_NAMES for s in sc.SHAPES if (c, s) not in present]
  extra = [absent[i] for i in rng.choice(len(absent), 2, replace=False)]
  specs = present + extra + sorted({(None, s) for _, s in present})
  true = [d for d in sc.absolute_descriptions([scene], specs, rng, min_present=1)
          if d.truth[0]]
  by_kind = collections.defaultdict(list)
  for d in true:
    by_kind[d.kind].append(d.text)
  by_kind["scene"].append(sc.scene_caption(scene))
  out: list[str] = []
  while len(out) < k and by_kind:
    kinds = sorted(by_kind)
    kind = kinds[int(rng.integers(len(kinds)))]
    texts = by_kind[kind]
    text = texts.pop(int(rng.integers(len(texts))))
    if not texts:
      del by_kind[kind]
    if text not in out:
      out.append(text)
  return out


# --------------------------------------------------------------------------- writing

def _save(img, path):
  img.save(path, **JPEG_OPTIONS)


def _write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False)


def _write_split(tmp, split_id, split, n_sets, first_index, p) -> tuple[dict, list]:
  """Renders one split's sets; returns (JSON object, per-description records)."""
  data, records = {}, []
  for i in range(n_sets):
    rng = np.random.default_rng([p["seed"], split_id, i])
    video = bool(rng.random() < p["video_fraction"])
    kind, cands, descs = make_set(rng, video, p["context_fraction"])
    index = first_index + i
    if video:
      name, start = f"synthvideo-{index:06d}", int(rng.integers(0, p["frame_step"]))
      frames = [start + p["frame_step"] * j for j in range(10)]
    else:
      name, frames = f"open-images-synth_{index:06d}", list(range(10))
    os.makedirs(os.path.join(tmp, "image-sets", name))
    for k, scene in zip(frames, cands):
      _save(sc.render(scene, p["image_size"]), os.path.join(tmp, "image-sets", name, f"img{k}.jpg"))
    if split == "test":
      data[name] = [d.text for d in descs]
    else:
      data[name] = {str(d.gold): d.text for d in descs}
    records += [dict(set=name, gold=d.gold, text=d.text, kind=d.kind, tags=list(d.tags),
                     video=video, set_type=kind) for d in descs]
  return data, records


def _write_pairs(tmp, p) -> int:
  pairs, i = [], 0
  os.makedirs(os.path.join(tmp, "pair-images"))
  while len(pairs) < p["n_pairs"]:
    rng = np.random.default_rng([p["seed"], 3, i])
    scene = pair_scene(rng)
    rel = f"pair-images/pair_{i:06d}.jpg"
    _save(sc.render(scene, p["image_size"]), os.path.join(tmp, rel))
    k = min(p["captions_per_image"], p["n_pairs"] - len(pairs))
    pairs += [{"image": rel, "caption": c} for c in pair_captions(rng, scene, k)]
    i += 1
  _write_json(os.path.join(tmp, "pairs.json"), pairs)
  return i


def _split_summary(records) -> dict[str, Any]:
  sets = {r["set"]: r["video"] for r in records}
  return {"sets": len(sets), "descriptions": len(records),
          "video_sets": sum(sets.values()), "static_sets": len(sets) - sum(sets.values()),
          "video_descriptions": sum(r["video"] for r in records),
          "static_descriptions": sum(not r["video"] for r in records),
          "context_descriptions": sum("con" in r["tags"] for r in records),
          "kinds": dict(sorted(collections.Counter(r["kind"] for r in records).items())),
          "tags": dict(sorted(collections.Counter(t for r in records for t in r["tags"]).items()))}


def _write_all(tmp, p) -> dict[str, Any]:
  summary: dict[str, Any] = {"params": dict(p), "splits": {}}
  meta_kinds, first = {}, 0
  for split_id, (split, fname) in enumerate(SPLITS):
    n = p[f"n_{split}_sets"]
    data, records = _write_split(tmp, split_id, split, n, first, p)
    first += n
    _write_json(os.path.join(tmp, fname), data)
    summary["splits"][split] = _split_summary(records)
    meta_kinds[split] = [{k: r[k] for k in ("set", "gold", "kind", "set_type")} for r in records]
    if split == "valid":
      annotation, vid = {}, 0
      for r in records:
        annotation.setdefault(r["set"], {})[str(r["gold"])] = {
            "description": r["text"], "annotation": ",".join(r["tags"]),
            "visualization_id": str(vid)}
        vid += 1
      with open(os.path.join(tmp, "manual_annotation_valid.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(annotation, f, sort_keys=False, allow_unicode=True, width=1000)
  summary["pair_images"] = _write_pairs(tmp, p)
  summary["pairs"] = p["n_pairs"]
  _write_json(os.path.join(tmp, "synthetic_meta.json"),
              {"generator": "contextblip_jax.data.synthetic", "summary": summary,
               "descriptions": meta_kinds})
  return summary


def generate(out_dir: str, seed: int = 0, overwrite: bool = False, **sizes) -> dict[str, Any]:
  """Writes the synthetic dataset to `out_dir` atomically; returns a summary dict.

  `sizes` override DEFAULTS (n_train_sets, n_valid_sets, n_test_sets, n_pairs, image_size,
  video_fraction, context_fraction, captions_per_image, frame_step). An existing `out_dir`
  raises FileExistsError unless `overwrite`.
  """
  unknown = set(sizes) - set(DEFAULTS)
  if unknown:
    raise TypeError(f"unknown generator parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  p = dict(DEFAULTS, **sizes, seed=int(seed))
  if p["image_size"] < 16:
    raise ValueError(f"image_size must be >= 16, got {p['image_size']}")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
  t0 = time.perf_counter()
  with atomic_directory(out_dir) as tmp:
    summary = _write_all(tmp, p)
  summary.update(out_dir=out_dir, seconds=round(time.perf_counter() - t0, 3))
  return summary


def ensure(out_dir: str, seed: int = 0, **sizes) -> dict[str, Any]:
  """Generates `out_dir` unless it already holds this generator's output for the same seed
  and parameters; returns the summary. A different synthetic dataset there is regenerated;
  a directory that is not one raises FileExistsError."""
  p = dict(DEFAULTS, **sizes, seed=int(seed))
  meta_path = os.path.join(out_dir, "synthetic_meta.json")
  if os.path.exists(out_dir):
    try:
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise FileExistsError(f"{out_dir} exists and is not a synthetic dataset ({e})") from e
    if meta.get("generator") != "contextblip_jax.data.synthetic":
      raise FileExistsError(f"{out_dir} exists and is not a synthetic dataset")
    if meta["summary"]["params"] == p:
      return dict(meta["summary"], out_dir=os.path.abspath(out_dir), seconds=0.0)
  return generate(out_dir, seed, overwrite=True, **sizes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog="python -m contextblip_jax.data.synthetic",
      description="Write the synthetic IMAGECODE-layout dataset and pre-training pairs.")
  parser.add_argument("--out", required=True, help="output directory (created atomically)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  for name, value in DEFAULTS.items():
    parser.add_argument(f"--{name}", type=type(value), default=value)
  args = vars(parser.parse_args(argv))
  out, seed, overwrite = args.pop("out"), args.pop("seed"), args.pop("overwrite")
  summary = generate(out, seed, overwrite=overwrite, **args)
  print(json.dumps(summary, indent=1))
  return summary


if __name__ == "__main__":
  main()
