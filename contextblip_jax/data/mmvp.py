"""MMVP-VLM reader (paper Table 3): pairs of statements, each pair with its two images.

Layout of the benchmark directory (the MMVP authors' `MMVP_VLM` folder):
  Questions.csv                              header, then rows `question id, category, statement`
                                             (quoted fields may hold commas); consecutive rows
                                             form a pair
  MLLM_VLM Images/<category>/<question id>.jpg   one image per question id (note the space in
                                             the folder name)
The rules, as the ContextBLIP authors' `evaluate_vlm_contextblip.py` applies them:
  - a pair's two candidate images are those of its two question ids, in row order, both in the
    folder of the pair's category;
  - the correct image of a statement is the first if its question id is odd, else the second;
  - pairs are grouped by category in file order (the real file: 9 categories x 15 pairs, in the
    order of `CATEGORIES`);
  - the text of a statement is `TEXT_PREFIX + statement`; the IMAGECODE caption cleaning
    (`tokenizer.pre_caption_imagecode`) is applied where every description is tokenised
    (`pipeline.TextEncoder`).
Scoring and the pair accuracy (both statements must pick their own image) are in
`evaluation/mmvp_eval.py`.

Bad input raises `MmvpDataError` naming the file and row (CSV line number): a missing file or
header, a row without exactly 3 fields, a question id that is not an integer or repeats, an
empty statement or category, an odd number of rows (a statement without its pair), a pair whose
rows name different categories or whose ids do not point at different images (one odd, one
even), a category that reappears after another began, a category without the expected number
of pairs (`pairs_per_category`; 0 = any), and a missing image (its path and row). Corrupt
images are found when they are loaded (`preprocess.ImageLoadError` names the file).

`write_standin(root, ...)` writes a stand-in benchmark in exactly this layout (synthetic shape
scenes from `synthetic_scenes`, the 9 category names, file names with spaces): the real images
are not distributed with this project.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from typing import Sequence

import numpy as np

from contextblip_jax.data import synthetic_scenes as sc

QUESTIONS_FILE = "Questions.csv"
IMAGE_DIR = "MLLM_VLM Images"
TEXT_PREFIX = "a photo of "
PAIRS_PER_CATEGORY = 15
CATEGORIES = ("Orientation and Direction", "Presence of Specific Features",
              "State and Condition", "Quantity and Count", "Positional and Relational Context",
              "Color and Appearance", "Structural Characteristics", "Texts",
              "Viewpoint and Perspective")


class MmvpDataError(ValueError):
  """Malformed MMVP-VLM input; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class MmvpPair:
  """Two statements and their two candidate images."""
  index: int                        # position of the pair in file order
  category: str
  question_ids: tuple[int, int]     # in row order
  statements: tuple[str, str]       # as in the CSV
  image_paths: tuple[str, str]      # the images of question_ids[0], question_ids[1]
  rows: tuple[int, int]             # CSV line numbers (header = 1)

  @property
  def gold(self) -> tuple[int, int]:
    """The correct image of each statement: 0 (the first) if its id is odd, else 1."""
    return tuple(gold_image(q) for q in self.question_ids)

  @property
  def texts(self) -> tuple[str, str]:
    """The model's text of each statement (before the caption cleaning)."""
    return tuple(TEXT_PREFIX + s for s in self.statements)


@dataclasses.dataclass(frozen=True)
class MmvpBenchmark:
  source: str                       # the Questions.csv read
  pairs: tuple[MmvpPair, ...]

  @property
  def categories(self) -> tuple[str, ...]:
    """Category names in file order."""
    return tuple(dict.fromkeys(p.category for p in self.pairs))


def gold_image(question_id: int) -> int:
  """0 (the pair's first image) for an odd question id, 1 (the second) for an even one."""
  return 0 if question_id % 2 == 1 else 1


def image_path(root: str, category: str, question_id: int) -> str:
  return os.path.join(root, IMAGE_DIR, category, f"{question_id}.jpg")


def _rows(path: str) -> list[tuple[int, int, str, str]]:
  """(line, question id, category, statement) of every non-blank row after the header."""
  try:
    f = open(path, encoding="utf-8-sig", newline="")
  except FileNotFoundError as e:
    raise MmvpDataError(f"{path}: not found (the MMVP-VLM directory must hold {QUESTIONS_FILE}"
                        f" and '{IMAGE_DIR}/')") from e
  out, seen = [], {}
  with f:
    reader = csv.reader(f)
    if next(reader, None) is None:
      raise MmvpDataError(f"{path}: empty file (expected a header row, then "
                          "'question id, category, statement' rows)")
    for row in reader:
      line = reader.line_num
      if not row or not any(c.strip() for c in row):
        continue
      if len(row) != 3:
        raise MmvpDataError(f"{path}: row {line}: expected 3 fields (question id, category, "
                            f"statement), got {len(row)}: {row!r}")
      qid, category, statement = (c.strip() for c in row)
      try:
        q = int(qid)
      except ValueError:
        raise MmvpDataError(f"{path}: row {line}: question id {qid!r} is not an integer"
                            ) from None
      if q in seen:
        raise MmvpDataError(f"{path}: row {line}: question id {q} repeats row {seen[q]}")
      seen[q] = line
      if not category or not statement:
        raise MmvpDataError(f"{path}: row {line}: empty "
                            f"{'category' if not category else 'statement'}")
      out.append((line, q, category, statement))
  if not out:
    raise MmvpDataError(f"{path}: no statements after the header")
  return out


def read_mmvp(root: str, *, pairs_per_category: int = PAIRS_PER_CATEGORY,
              check_images: bool = True) -> MmvpBenchmark:
  """Reads `<root>/Questions.csv` and checks the images under `<root>/MLLM_VLM Images/`.

  Args:
    root: the MMVP-VLM directory.
    pairs_per_category: pairs every category must have (15 in the real benchmark); 0 = any.
    check_images: each pair's two image files must exist.
  """
  path = os.path.join(root, QUESTIONS_FILE)
  rows = _rows(path)
  if len(rows) % 2:
    raise MmvpDataError(f"{path}: row {rows[-1][0]}: {len(rows)} statements, an odd number: "
                        "the last one has no pair (consecutive rows form a pair)")
  pairs: list[MmvpPair] = []
  finished: set[str] = set()
  for i in range(0, len(rows), 2):
    (l1, q1, c1, s1), (l2, q2, c2, s2) = rows[i], rows[i + 1]
    if c1 != c2:
      raise MmvpDataError(f"{path}: rows {l1} and {l2} form a pair but name different "
                          f"categories ({c1!r}, {c2!r})")
    if gold_image(q1) == gold_image(q2):
      raise MmvpDataError(f"{path}: rows {l1} and {l2}: question ids {q1} and {q2} both point "
                          f"at the {'first' if gold_image(q1) == 0 else 'second'} image (a "
                          "pair needs one odd and one even id)")
    if pairs and pairs[-1].category != c1:
      finished.add(pairs[-1].category)
    if c1 in finished:
      raise MmvpDataError(f"{path}: row {l1}: category {c1!r} reappears after other "
                          "categories (pairs are grouped by category in file order)")
    paths = (image_path(root, c1, q1), image_path(root, c1, q2))
    if check_images:
      for p, line in zip(paths, (l1, l2)):
        if not os.path.isfile(p):
          raise MmvpDataError(f"{p}: image not found (row {line} of {path})")
    pairs.append(MmvpPair(len(pairs), c1, (q1, q2), (s1, s2), paths, (l1, l2)))
  bench = MmvpBenchmark(path, tuple(pairs))
  if pairs_per_category:
    for c in bench.categories:
      n = sum(p.category == c for p in pairs)
      if n != pairs_per_category:
        raise MmvpDataError(f"{path}: category {c!r} has {n} pairs, expected "
                            f"{pairs_per_category} (config.eval.mmvp_pairs_per_category=0 accepts "
                            "any)")
  return bench


# --------------------------------------------------------------------------- stand-in

# The scene attribute each stand-in category varies within a pair (cycled over CATEGORIES).
_STANDIN_KINDS = ("position", "presence", "size", "count", "position", "colour", "shape",
                  "colour", "size")


def _standin_pair(rng: np.random.Generator, kind: str) -> tuple[tuple, tuple, str, str]:
  """(scene 1, scene 2, statement true in 1, statement true in 2) that differ in `kind`."""
  colour, other = (sc.COLOUR_NAMES[i] for i in rng.choice(len(sc.COLOUR_NAMES), 2, False))
  shape, shape2 = (sc.SHAPES[i] for i in rng.choice(len(sc.SHAPES), 2, False))
  cells = [(c, r) for r in range(3) for c in range(3)]
  a, b = (cells[i] for i in rng.choice(len(cells), 2, False))
  r = sc.LARGE_R if rng.random() < 0.5 else sc.SMALL_R
  obj = lambda cell, **kw: sc.Obj(0, kw.get("shape", shape), kw.get("colour", colour),
                                  sc.CELL_CENTRES[cell[0]], sc.CELL_CENTRES[cell[1]],
                                  kw.get("r", r))
  what = sc.ref(colour, shape)
  if kind == "position":
    return ((obj(a),), (obj(b),), f"the {what} is {sc.POSITION_PHRASES[a]}",
            f"the {what} is {sc.POSITION_PHRASES[b]}")
  if kind == "presence":
    extra = sc.Obj(1, shape2, other, sc.CELL_CENTRES[b[0]], sc.CELL_CENTRES[b[1]], r)
    return ((obj(a), extra), (obj(a),), f"there is a {sc.ref(other, shape2)}",
            f"there is no {sc.ref(other, shape2)}")
  if kind == "size":
    return ((obj(a, r=sc.LARGE_R),), (obj(a, r=sc.SMALL_R),), f"there is a large {what}",
            f"there is a small {what}")
  if kind == "count":
    n1, n2 = (int(n) for n in rng.choice(np.arange(1, 5), 2, False))
    picks = [cells[i] for i in rng.choice(len(cells), max(n1, n2), False)]
    scenes = [tuple(obj(c, r=sc.SMALL_R) for c in picks[:n]) for n in (n1, n2)]
    says = [("there is " if n == 1 else "there are ") + sc.noun_phrase(n, colour, shape)
            for n in (n1, n2)]
    return scenes[0], scenes[1], says[0], says[1]
  if kind == "colour":
    return ((obj(a),), (obj(a, colour=other),), f"there is a {what}",
            f"there is a {sc.ref(other, shape)}")
  return ((obj(a),), (obj(a, shape=shape2),), f"there is a {what}",
          f"there is a {sc.ref(colour, shape2)}")


def write_standin(root: str, *, seed: int = 0, pairs_per_category: int = PAIRS_PER_CATEGORY,
                  categories: Sequence[str] = CATEGORIES, image_size: int = 32) -> str:
  """Writes a stand-in MMVP-VLM directory at `root` (exact layout, synthetic scenes): for each
  category `pairs_per_category` pairs of scenes differing in one attribute (position,
  presence, size, count, colour or shape), ids 1, 2, 3, ... in file order, each pair's odd id
  first. Returns the Questions.csv path."""
  rng = np.random.default_rng(seed)
  rows, qid = [], 1
  for ci, category in enumerate(categories):
    os.makedirs(os.path.join(root, IMAGE_DIR, category), exist_ok=True)
    for _ in range(pairs_per_category):
      s1, s2, t1, t2 = _standin_pair(rng, _STANDIN_KINDS[ci % len(_STANDIN_KINDS)])
      for q, scene, text in ((qid, s1, t1), (qid + 1, s2, t2)):
        sc.render(scene, image_size).save(image_path(root, category, q), quality=95)
        rows.append((q, category, text))
      qid += 2
  path = os.path.join(root, QUESTIONS_FILE)
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(("Question ID", "Type", "Statement"))
    w.writerows(rows)
  return path


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(description="Write a stand-in MMVP-VLM directory (synthetic "
                              "scenes in the benchmark's exact layout).")
  p.add_argument("--out", required=True, help="directory to write")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--pairs_per_category", type=int, default=PAIRS_PER_CATEGORY)
  p.add_argument("--image_size", type=int, default=32)
  a = p.parse_args(argv)
  path = write_standin(a.out, seed=a.seed, pairs_per_category=a.pairs_per_category,
                       image_size=a.image_size)
  print(path)
  return path


if __name__ == "__main__":
  main()
