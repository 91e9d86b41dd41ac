"""Scenes of simple shapes for the synthetic IMAGECODE stand-in: objects, rendering, facts.

A scene is a tuple of `Obj` (shape, colour, centre, half-size, visibility) on a plain dark
background. `render` draws it with PIL at 2x and box-downsamples (anti-aliased edges, so
sub-pixel positions and sizes survive at 32 px). `candidates` below are the 10 scenes of one set;
the description functions return, for each phrasing, its truth in every candidate, and the set
generator keeps only those true in exactly one candidate (the gold).

Vocabulary (all single bert-base-uncased word pieces except "furthest", "fewest"):
colours red green blue yellow purple white; shapes circle square triangle; positions top bottom
left right middle; sizes large small; numbers one..five.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (225, 30, 30), "green": (30, 190, 50), "blue": (45, 85, 245),
           "yellow": (240, 220, 30), "purple": (165, 50, 215), "white": (245, 245, 245)}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (20, 20, 20)
SMALL_R, LARGE_R = 0.11, 0.16         # half-size of "small" / "large" objects (fraction of side)
SMALL_MAX, LARGE_MIN = 0.12, 0.15     # size words apply only outside (0.12, 0.15)
CELL_CENTRES = (1 / 6, 1 / 2, 5 / 6)  # 3x3 grid of positions
CELL_MARGIN = 0.03                    # centres this close to a cell border have no cell word
REL_TRUE, REL_FALSE = 0.12, 0.04      # "left of": dx <= -0.12 true, dx >= -0.04 false
EXTREME_GAP = 0.06                    # superlative position: best beats second by this much
SIZE_GAP = 0.025                      # superlative size gap across images (half-size units)
FRAME_SIZE_GAP = 0.012                # the same across video frames (smooth growth)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITION_PHRASES = {
    (0, 0): "in the top left", (1, 0): "at the top", (2, 0): "in the top right",
    (0, 1): "on the left", (1, 1): "in the middle", (2, 1): "on the right",
    (0, 2): "in the bottom left", (1, 2): "at the bottom", (2, 2): "in the bottom right"}


@dataclasses.dataclass(frozen=True)
class Obj:
  """One shape. Coordinates are fractions of the image side (x right, y down)."""
  oid: int            # identity of the object across the candidates of one set
  shape: str
  colour: str
  x: float
  y: float
  r: float            # half-size
  visible: bool = True

  def with_(self, **kw) -> "Obj":
    return dataclasses.replace(self, **kw)


Scene = tuple  # tuple[Obj, ...]


@dataclasses.dataclass(frozen=True)
class Description:
  """A phrasing, its phenomenon tags, a kind name, and its truth in each candidate."""
  text: str
  kind: str
  tags: tuple
  truth: tuple        # tuple[bool, ...], one per candidate

  @property
  def gold(self) -> int | None:
    hits = [i for i, t in enumerate(self.truth) if t]
    return hits[0] if len(hits) == 1 else None


# --------------------------------------------------------------------------- rendering

def render(scene: Sequence[Obj], size: int, supersample: int = 2) -> Image.Image:
  """Draws `scene` as an RGB PIL image of `size` x `size` pixels."""
  big = size * supersample
  img = Image.new("RGB", (big, big), BACKGROUND)
  draw = ImageDraw.Draw(img)
  for o in scene:
    if not o.visible:
      continue
    cx, cy, r, fill = o.x * big, o.y * big, o.r * big, COLOURS[o.colour]
    if o.shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
      s = 0.9 * r
      draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif o.shape == "triangle":
      s = 1.15 * r
      draw.polygon([(cx, cy - s), (cx - s, cy + 0.85 * r), (cx + s, cy + 0.85 * r)], fill=fill)
    else:
      raise ValueError(f"unknown shape {o.shape!r}")
  return img.resize((size, size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- facts

def matching(scene: Sequence[Obj], colour: str | None, shape: str) -> list[Obj]:
  return [o for o in scene
          if o.visible and o.shape == shape and (colour is None or o.colour == colour)]


def cell_of(o: Obj) -> tuple[int, int] | None:
  """(column, row) of the 3x3 grid, or None when the centre is within CELL_MARGIN of a border."""
  out = []
  for v in (o.x, o.y):
    if min(abs(v - 1 / 3), abs(v - 2 / 3)) < CELL_MARGIN:
      return None
    out.append(min(2, max(0, int(v * 3))))
  return out[0], out[1]


def size_word(r: float) -> str | None:
  return "small" if r <= SMALL_MAX else "large" if r >= LARGE_MIN else None


def ref(colour: str | None, shape: str) -> str:
  return f"{colour} {shape}" if colour else shape


def noun_phrase(n: int, colour: str | None, shape: str) -> str:
  return f"{NUMBER_WORDS[n]} {ref(colour, shape)}" + ("s" if n != 1 else "")


def _unique(cands, colour, shape) -> list[Obj | None] | None:
  """The single matching object per candidate (None where absent); None if any has two."""
  out = []
  for scene in cands:
    m = matching(scene, colour, shape)
    if len(m) > 1:
      return None
    out.append(m[0] if m else None)
  return out


def _desc(text, kind, tags, truth) -> Description:
  return Description(text, kind, tuple(tags), tuple(bool(t) for t in truth))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------- absolute phrasings

def absolute_descriptions(cands, specs, rng, min_present: int = 2) -> list[Description]:
  """Phrasings decidable from one image: presence, negation, counts, colour, position, size,
  relations between two objects, co-reference. `specs` are (colour | None, shape) referents.

  Attribute phrasings (position, size, relation, co-reference) are made only for referents
  present in at least `min_present` candidates, so that the attribute, not the mere presence
  of the referent, singles out the gold (use 1 for a single image)."""
  out = []
  for colour, shape in specs:
    col = ("col",) if colour else ("n",)
    counts = [len(matching(s, colour, shape)) for s in cands]
    out.append(_desc(_pick(rng, ("there is a {}", "a {} can be seen", "you can see a {}"))
                     .format(ref(colour, shape)), "exists", col, [c > 0 for c in counts]))
    out.append(_desc(_pick(rng, ("there is no {}", "no {} is visible")).format(ref(colour, shape)),
                     "negation", ("neg",) + col[:1] * bool(colour), [c == 0 for c in counts]))
    for n in sorted(set(counts) - {0}) if max(counts) >= 2 else ():   # 0/1: "exists"
      verb = "there is" if n == 1 else "there are"
      out.append(_desc(f"{verb} {noun_phrase(n, colour, shape)}", "count", ("q",),
                       [c == n for c in counts]))
    objs = _unique(cands, colour, shape)
    if objs is None or sum(o is not None for o in objs) < min_present:
      continue
    if colour is None:
      for c in sorted({o.colour for o in objs if o}):
        out.append(_desc(f"the {shape} is {c}", "colour", ("col",),
                         [o is not None and o.colour == c for o in objs]))
      continue
    cells = [cell_of(o) if o else None for o in objs]
    if all(c is not None for o, c in zip(objs, cells) if o):
      for cl in sorted({c for c in cells if c}):
        truth = [c == cl for c in cells]
        out.append(_desc(f"the {ref(colour, shape)} is {POSITION_PHRASES[cl]}", "position",
                         ("s",), truth))
        out.append(_desc(f"there is a {ref(colour, shape)} and it is {POSITION_PHRASES[cl]}",
                         "coref", ("cor", "s"), truth))
    sizes = [size_word(o.r) if o else None for o in objs]
    if all(s is not None for o, s in zip(objs, sizes) if o):
      for w in sorted({s for s in sizes if s}):
        out.append(_desc(_pick(rng, ("the {1} is {0}", "there is a {0} {1}"))
                         .format(w, ref(colour, shape)), "size", ("n",),
                         [s == w for s in sizes]))
  out.extend(_relations(cands, [s for s in specs if s[0]], min_present))
  return out


def _relations(cands, specs, min_present) -> list[Description]:
  out, objs = [], {s: _unique(cands, *s) for s in specs}
  for a in specs:
    oa = objs[a]
    if oa is None or sum(o is not None for o in oa) < min_present:
      continue
    for b in specs:
      ob = objs[b]
      if a == b or ob is None or sum(o is not None for o in ob) < min_present:
        continue
      for word, axis, sign in (("left of", "x", -1), ("right of", "x", 1),
                               ("above", "y", -1), ("below", "y", 1)):
        truth, ok = [], True
        for p, q in zip(oa, ob):
          if p is None or q is None:
            truth.append(False)
            continue
          d = sign * (getattr(p, axis) - getattr(q, axis))
          if REL_FALSE < d < REL_TRUE:
            ok = False
            break
          truth.append(d >= REL_TRUE)
        if ok:
          out.append(_desc(f"the {ref(*a)} is {word} the {ref(*b)}", "relation", ("s",), truth))
  return out


# --------------------------------------------------------------------------- context phrasings

def _one_hot(n, i) -> list[bool]:
  return [j == i for j in range(n)]


def _extreme(values, gap, largest=True) -> int | None:
  """Index of the unique extreme of `values` (None entries ignored) if it leads by `gap`."""
  vals = [(v if largest else -v, i) for i, v in enumerate(values) if v is not None]
  if len(vals) < 2:
    return None
  vals.sort(reverse=True)
  return vals[0][1] if vals[0][0] - vals[1][0] >= gap else None


def context_descriptions(cands, specs, video: bool, rng) -> list[Description]:
  """Phrasings that need the other candidates: superlatives across images, most/fewest,
  odd one out, closest, and (video) first/last/before/after in frame order."""
  n, out = len(cands), []
  where = "the frame where the {}" if video else "the {}"
  for colour, shape in specs:
    counts = [len(matching(s, colour, shape)) for s in cands]
    for word, largest in (("most", True), ("fewest", False)):
      i = _extreme(counts, 1, largest)
      # "most" needs a count of 2+ and "fewest" none absent, else it is (negated) presence
      if i is not None and (max(counts) >= 2 if largest else min(counts) >= 1):
        what = "frame" if video else "image"
        out.append(_desc(f"the {what} with the {word} {ref(colour, shape)}s", "most_count",
                         ("con", "q"), _one_hot(n, i)))
    objs = _unique(cands, colour, shape)
    if objs is not None and colour is None and all(objs):
      cols = [o.colour for o in objs]
      odd = [i for i, c in enumerate(cols) if cols.count(c) == 1]
      if len(odd) == 1 and len(set(cols)) == 2:
        text = _pick(rng, ("the {} has a different colour than in all the other images",
                           "the only image where the {} has another colour"))
        out.append(_desc(text.format(shape), "odd_colour", ("con", "col"), _one_hot(n, odd[0])))
    if objs is not None and colour is not None and sum(o is not None for o in objs) >= 2:
      out.extend(_superlatives(objs, colour, shape, video, where, n))
    if video:
      shape_counts = [len(matching(s, None, shape)) for s in cands]
      out.extend(_temporal(cands, colour, shape, counts, shape_counts, objs, n))
  return out + _closest(cands, [s for s in specs if s[0]], video, n)


def _band(v: float) -> int:
  return min(2, max(0, int(v * 3)))


def _superlatives(objs, colour, shape, video, where, n) -> list[Description]:
  out, name = [], ref(colour, shape)
  for axis, largest, word_v, word_s in (("x", True, "is furthest right", "is further right"),
                                        ("x", False, "is furthest left", "is further left"),
                                        ("y", False, "is highest", "is higher"),
                                        ("y", True, "is lowest", "is lower")):
    i = _extreme([getattr(o, axis) if o else None for o in objs], EXTREME_GAP, largest)
    # keep it contextual: another candidate shares the gold's grid column (row), so the
    # absolute cue ("on the right") is ambiguous and only the comparison singles out the gold
    if i is not None and sum(o is not None and _band(getattr(o, axis)) ==
                             _band(getattr(objs[i], axis)) for o in objs) >= 2:
      text = (where.format(name) + f" {word_v}" if video
              else f"the {name} {word_s} than in any other image")
      out.append(_desc(text, "extreme_position", ("con", "s"), _one_hot(n, i)))
  for largest, word_v, word_s in ((True, "is largest", "is bigger"),
                                  (False, "is smallest", "is smaller")):
    i = _extreme([o.r if o else None for o in objs], FRAME_SIZE_GAP if video else SIZE_GAP,
                 largest)
    if i is not None:
      text = (where.format(name) + f" {word_v}" if video
              else f"the {name} {word_s} than in any other image")
      out.append(_desc(text, "extreme_size", ("con", "n"), _one_hot(n, i)))
  return out


def _temporal(cands, colour, shape, counts, shape_counts, objs, n) -> list[Description]:
  """First / last / just before / right after, in frame order (video sets only).

  Visibility phrasings need the shape itself to come and go (not a colour change), and
  count phrasings a count of 2+ (else they repeat the visibility ones)."""
  out, name = [], ref(colour, shape)
  vis = [c > 0 for c in counts]
  if any(vis) and not all(vis) and vis == [c > 0 for c in shape_counts]:
    first, last = vis.index(True), n - 1 - vis[::-1].index(True)
    tags = ("con", "t", "v")
    if sum(vis) >= 2:
      out.append(_desc(f"the first frame where the {name} is visible", "temporal_visibility",
                       tags, _one_hot(n, first)))
      out.append(_desc(f"the last frame where the {name} can be seen", "temporal_visibility",
                       tags, _one_hot(n, last)))
    if first > 0 and not any(vis[:first]):
      out.append(_desc(f"the frame just before the {name} appears", "temporal_visibility",
                       tags, _one_hot(n, first - 1)))
    if last < n - 1 and not any(vis[last + 1:]):
      out.append(_desc(f"the frame right after the {name} disappears", "temporal_visibility",
                       tags, _one_hot(n, last + 1)))
  if objs is not None and colour is None and all(objs):
    cols = [o.colour for o in objs]
    for c in sorted(set(cols)):
      if cols.count(c) >= 2 and len(set(cols)) > 1:
        idx = [i for i, x in enumerate(cols) if x == c]
        for word, i in (("first", idx[0]), ("last", idx[-1])):
          out.append(_desc(f"the {word} frame where the {shape} is {c}", "temporal_colour",
                           ("con", "t", "col"), _one_hot(n, i)))
  for k in sorted(set(counts) - {0}):
    idx = [i for i, c in enumerate(counts) if c == k]
    if len(idx) >= 2 and len(set(counts)) > 1 and max(counts) >= 2:
      out.append(_desc(f"the first frame with {noun_phrase(k, colour, shape)}",
                       "temporal_count", ("con", "t", "q"), _one_hot(n, idx[0])))
  return out


def _closest(cands, specs, video, n) -> list[Description]:
  out, objs = [], {s: _unique(cands, *s) for s in specs}
  for a in specs:
    oa = objs[a]
    for b in specs:
      ob = objs[b]
      if a >= b or oa is None or ob is None:
        continue
      dist = [float(np.hypot(p.x - q.x, p.y - q.y)) if p and q else None for p, q in zip(oa, ob)]
      i = _extreme(dist, EXTREME_GAP, largest=False)
      if i is not None:
        text = (f"the frame where the {ref(*a)} is closest to the {ref(*b)}" if video
                else f"the {ref(*a)} is closer to the {ref(*b)} than in any other image")
        out.append(_desc(text, "closest", ("con", "s"), _one_hot(n, i)))
  return out


def scene_caption(scene: Sequence[Obj]) -> str:
  """A caption naming every visible object with size, colour, shape and position."""
  parts = []
  for o in scene:
    if o.visible:
      cl = cell_of(o)
      where = f" {POSITION_PHRASES[cl]}" if cl else ""
      size = size_word(o.r)
      parts.append(f"a {size + ' ' if size else ''}{o.colour} {o.shape}{where}")
  return " and ".join(parts) if parts else "an empty dark image"
