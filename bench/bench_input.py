"""Input-pipeline benchmark: how many images per second one host core feeds (not a test).

  .venv/bin/python bench/bench_input.py                       # the default sweep (~3 min)
  .venv/bin/python bench/bench_input.py --kinds pairs --sizes 224 --workers 0 --seconds 4
  .venv/bin/python bench/bench_input.py --json /tmp/bench_input.json

What runs is the product's own Grain pipelines (`contextblip_jax/data/pipeline.py`):
`pretrain_pipeline` for pre-training pairs (JPEG decode, RandomResizedCrop(0.2-1) + flip +
RandAugment(2, 5), CLIP normalisation to float32, tokenising, batching) and
`imagecode_train_pipeline` for fine-tuning's ten-candidate groups (the same per image, ten
images per example), with `worker_count` 0 (reader threads in the main process), 1 and 2
(Grain worker processes), on generated photo-like JPEGs of a realistic size (default 640x480,
quality 90, ~115 KB, cached in --cache_dir). Extra rows at worker_count 0: the resize-only
transform (`augmentation='none'`: what the augmentation ops cost) and images pre-resized to a
short side of 8/7 x S before encoding (what pre-resized TFDS records would save).

Each row gives images per second of wall time and, the figure to plan with, images per
CPU-second: images divided by the CPU time (user + system) that the main process and its
worker processes spent while the timed batches were produced. A host that must deliver R
images per second to its chips needs about R / (images per CPU-second) cores; on a busy
machine the wall-clock rate drops but the CPU-second rate changes less. The run prints the
machine line (CPU model, cores, load average) first and last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py)

CAPTIONS = ("a man riding a wave on top of a surfboard", "two dogs playing with a frisbee in "
            "the park", "a plate of food with broccoli and rice", "a red bus driving down a "
            "city street", "a woman holding an umbrella in the rain")
DESCRIPTION = ("the woman on the left is looking down at her phone and the car behind her "
               "has its lights on")


# --------------------------------------------------------------------------------------------
# Generated photos
# --------------------------------------------------------------------------------------------

def photo(rng: np.random.Generator, width: int, height: int):
  """A photo-like RGB PIL image: smooth colour regions (a coarse random field, bicubic up),
  a few edges, and sensor-like noise, so that JPEG sizes and decode times are realistic."""
  from PIL import Image, ImageDraw
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  img = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
  draw = ImageDraw.Draw(img)
  for _ in range(12):
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    x1, y1 = x0 + int(rng.integers(20, width // 3)), y0 + int(rng.integers(20, height // 3))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
  x = np.asarray(img, np.float32) + rng.normal(0.0, 12.0, (height, width, 3))
  return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")


def make_photos(cache_dir: str, n: int, width: int, height: int, short_side: int = 0,
                quality: int = 90, seed: int = 0) -> list[str]:
  """`n` JPEG paths under cache_dir (made once, reused): width x height photos, or the same
  photos pre-resized (bicubic) to `short_side` when it is > 0."""
  from PIL import Image
  tag = f"{width}x{height}" + (f"_short{short_side}" if short_side else "") + f"_q{quality}"
  out = os.path.join(cache_dir, tag)
  paths = [os.path.join(out, f"{i:04d}.jpg") for i in range(n)]
  if all(os.path.isfile(p) for p in paths):
    return paths
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  for p in paths:
    img = photo(rng, width, height)
    if short_side:
      s = short_side / min(width, height)
      img = img.resize((round(width * s), round(height * s)), Image.Resampling.BICUBIC)
    tmp = p + ".tmp"
    img.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, p)
  return paths


# --------------------------------------------------------------------------------------------
# Sources (top-level classes: Grain workers unpickle them)
# --------------------------------------------------------------------------------------------

class GroupSource:
  """Ten-candidate training groups in the record format of `ImagecodeExampleSource`."""

  def __init__(self, paths: list[str], n: int):
    self._paths, self._n = list(paths), n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int):
    images = tuple(self._paths[(10 * i + k) % len(self._paths)] for k in range(10))
    return {"images": images, "description": DESCRIPTION, "label": i % 10,
            "is_video": bool(i % 2), "id": f"group{i}"}


def pair_examples(paths: list[str], n: int):
  from contextblip_jax.data.pairs import PairExample
  return [PairExample(f"bench:{i}", paths[i % len(paths)], CAPTIONS[i % len(CAPTIONS)],
                      CAPTIONS[i % len(CAPTIONS)]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# CPU time of this process and its worker processes
# --------------------------------------------------------------------------------------------

def _proc_cpu_seconds(pid: int) -> float:
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def _descendants(root: int) -> list[int]:
  children: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    children.setdefault(ppid, []).append(int(name))
  out, todo = [], [root]
  while todo:
    for c in children.get(todo.pop(), []):
      out.append(c)
      todo.append(c)
  return out


def cpu_seconds() -> dict[int, float]:
  """{pid: CPU seconds} of this process (all threads) and every live descendant."""
  ru = resource.getrusage(resource.RUSAGE_SELF)
  out = {os.getpid(): ru.ru_utime + ru.ru_stime}
  for pid in _descendants(os.getpid()):
    try:
      out[pid] = _proc_cpu_seconds(pid)
    except OSError:
      pass
  return out


# --------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
  kind: str            # 'pairs' | 'groups'
  size: int            # image side S
  workers: int         # Grain worker processes (0 = threads in the main process)
  augmentation: str    # '0' (the paper's) | 'none' (resize only)
  source: str          # 'photo WxH' | 'pre-resized'
  paths: list = dataclasses.field(repr=False, default_factory=list)


def build(case: Case, batch: int, threads: int, tokenizer):
  from contextblip_jax.data import pipeline
  aug = "none" if case.augmentation == "none" else int(case.augmentation)
  common_kw = dict(image_size=case.size, global_batch_size=batch, seed=0, tokenizer=tokenizer,
                   augmentation=aug, num_threads=threads, worker_count=case.workers)
  if case.kind == "pairs":
    return pipeline.pretrain_pipeline(pair_examples(case.paths, 4096), min_scale=0.2,
                                      **common_kw), batch
  return pipeline.imagecode_train_pipeline(GroupSource(case.paths, 1024), **common_kw), 10 * batch


def measure(case: Case, batch: int, threads: int, tokenizer, seconds: float,
            min_batches: int) -> dict:
  t_build = time.perf_counter()
  pipe, images_per_batch = build(case, batch, threads, tokenizer)
  it = iter(pipe)
  first = next(it)                       # starts threads / worker processes, fills buffers
  start_s = time.perf_counter() - t_build
  key = "image" if case.kind == "pairs" else "images"
  shape = tuple(first[key].shape)
  cpu0, t0 = cpu_seconds(), time.perf_counter()
  n = 0
  while n < min_batches or time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  wall = time.perf_counter() - t0
  cpu1 = cpu_seconds()
  cpu = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
  del it                                 # stops the worker processes
  images = n * images_per_batch
  return dict(kind=case.kind, size=case.size, workers=case.workers,
              augmentation=case.augmentation, source=case.source, batch_shape=shape,
              batches=n, images=images, wall_s=wall, cpu_s=cpu,
              images_per_s=images / wall, images_per_cpu_s=images / cpu if cpu else float("nan"),
              cores_busy=cpu / wall, first_batch_s=start_s, load=common.load_average())


# --------------------------------------------------------------------------------------------
# Where the time of one image goes (single thread)
# --------------------------------------------------------------------------------------------

def breakdown(paths: list[str], size: int, n: int = 60) -> dict[str, float]:
  """Milliseconds of CPU per image for each step of the paper's training transform, one
  thread (`time.process_time`), over `n` images: JPEG decode (`preprocess.decode_rgb`),
  RandomResizedCrop + bicubic resize, flip, RandAugment(2, 5), normalisation to float32
  (`preprocess.normalize`); and, for comparison, a JPEG decode at reduced DCT scale (PIL
  `draft`, the largest 1/2^k scale that keeps the short side >= S) and a uint8 copy of the
  image (what normalising on the device instead would leave on the host)."""
  from PIL import Image
  from contextblip_jax.data import augment, preprocess
  rng = np.random.default_rng(0)
  ra = augment.RandAugment()
  blobs = [open(p, "rb").read() for p in paths[:n]]
  steps = dict(decode=0.0, crop_resize=0.0, flip=0.0, randaugment=0.0, normalize=0.0,
               decode_draft=0.0, uint8_copy=0.0)

  def timed(key, fn, *a):
    t = time.process_time()
    out = fn(*a)
    steps[key] += time.process_time() - t
    return out

  def draft_decode(blob):
    import io
    with Image.open(io.BytesIO(blob)) as im:
      im.draft("RGB", (size, size))      # PIL keeps both sides >= the requested size
      im.load()
      return im.convert("RGB")

  for blob in blobs:
    img = timed("decode", preprocess.decode_rgb, blob)
    img = timed("crop_resize", augment.random_resized_crop, img, size, rng)
    img = timed("flip", augment.random_horizontal_flip, img, rng)
    img = timed("randaugment", ra, img, rng)
    pixels = np.asarray(img, np.uint8)
    timed("normalize", preprocess.normalize, pixels)
    timed("uint8_copy", np.array, pixels)
    timed("decode_draft", draft_decode, blob)
  return {k: 1000.0 * v / len(blobs) for k, v in steps.items()}


# --------------------------------------------------------------------------------------------

def machine_line() -> str:
  from PIL import __version__ as pil_version, features
  turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
  return (f"# machine: {common.cpu_model()}, {common.cpu_cores()} cores; Pillow {pil_version} "
          f"({turbo}); load {common.load_average()}; peak RSS {common.peak_rss_mb():.0f} MiB")


def cases(args, photos: dict) -> list[Case]:
  out = []
  for kind in args.kinds:
    for size in args.sizes:
      for w in args.workers:
        out.append(Case(kind, size, w, "0", args.photo_label, photos[("photo", size)]))
      if args.extras:
        out.append(Case(kind, size, 0, "none", args.photo_label, photos[("photo", size)]))
        out.append(Case(kind, size, 0, "0", f"pre-resized (short {round(size * 8 / 7)})",
                        photos[("short", size)]))
  return out


def print_rows(rows, log=print) -> None:
  hdr = (f"{'kind':<7s} {'S':>4s} {'workers':>7s} {'transform':<14s} {'source':<24s} "
         f"{'images':>6s} {'img/s':>7s} {'img/CPU-s':>9s} {'cores':>5s} {'start s':>7s} "
         f"{'load':>16s}")
  log(hdr)
  log("-" * len(hdr))
  for r in rows:
    tr = "paper (aug 0)" if r["augmentation"] == "0" else "resize only"
    log(f"{r['kind']:<7s} {r['size']:>4d} {r['workers']:>7d} {tr:<14s} {r['source']:<24s} "
        f"{r['images']:>6d} {r['images_per_s']:>7.1f} {r['images_per_cpu_s']:>9.1f} "
        f"{r['cores_busy']:>5.2f} {r['first_batch_s']:>7.1f} {r['load']:>16s}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="bench/bench_input.py", description=__doc__.split(
      "\n")[0])
  parser.add_argument("--kinds", default="pairs,groups", help="pairs,groups")
  parser.add_argument("--sizes", default="224,384", help="image sides S")
  parser.add_argument("--workers", default="0,1,2", help="Grain worker_count values")
  parser.add_argument("--threads", type=int, default=2,
                      help="Grain reader threads per process (config data.num_threads)")
  parser.add_argument("--pairs_batch", type=int, default=32, help="pairs per batch")
  parser.add_argument("--groups_batch", type=int, default=4, help="groups per batch (x10 images)")
  parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
  parser.add_argument("--min_batches", type=int, default=3)
  parser.add_argument("--photo_size", default="640x480", help="WxH of the generated JPEGs")
  parser.add_argument("--num_photos", type=int, default=200)
  parser.add_argument("--no_extras", dest="extras", action="store_false",
                      help="leave out the resize-only and pre-resized rows")
  parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(),
                                                          "contextblip_bench_input"))
  parser.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = parser.parse_args(argv)
  args.kinds = [k for k in args.kinds.split(",") if k]
  for k in args.kinds:
    if k not in ("pairs", "groups"):
      parser.error(f"--kinds: unknown kind {k!r} (pairs, groups)")
  args.sizes = [int(s) for s in args.sizes.split(",") if s]
  args.workers = [int(w) for w in args.workers.split(",") if w]
  width, height = (int(v) for v in args.photo_size.lower().split("x"))
  args.photo_label = f"photo {width}x{height}"

  from absl import flags
  flags.FLAGS.mark_as_parsed()           # Grain worker processes read absl flags
  from contextblip_jax.data.tokenizer import BlipTokenizer

  print(machine_line(), flush=True)
  t0 = time.perf_counter()
  photos = {}
  for size in args.sizes:
    photos[("photo", size)] = make_photos(args.cache_dir, args.num_photos, width, height)
    if args.extras:
      photos[("short", size)] = make_photos(args.cache_dir, args.num_photos, width, height,
                                            short_side=round(size * 8 / 7))
  sizes_kb = [os.path.getsize(p) / 1024 for p in photos[("photo", args.sizes[0])]]
  print(f"# {args.num_photos} generated JPEGs {width}x{height}, quality 90, mean "
        f"{np.mean(sizes_kb):.0f} KB (min {min(sizes_kb):.0f}, max {max(sizes_kb):.0f}) in "
        f"{args.cache_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
  for size in args.sizes:
    ms = breakdown(photos[("photo", size)], size)
    paper = sum(ms[k] for k in ("decode", "crop_resize", "flip", "randaugment", "normalize"))
    print(f"# one image, S={size}, one thread, ms of CPU: " + ", ".join(
        f"{k} {v:.2f}" for k, v in ms.items()) + f"; paper transform {paper:.2f} ms = "
        f"{1000 / paper:.0f} images/CPU-s", flush=True)
  tok = BlipTokenizer()
  rows = []
  for case in cases(args, photos):
    batch = args.pairs_batch if case.kind == "pairs" else args.groups_batch
    row = measure(case, batch, args.threads, tok, args.seconds, args.min_batches)
    rows.append(row)
    print(f"  {case.kind} S={case.size} workers={case.workers} aug={case.augmentation} "
          f"{case.source}: {row['images_per_s']:.1f} img/s, {row['images_per_cpu_s']:.1f} "
          f"img/CPU-s, {row['cores_busy']:.2f} cores busy, load {row['load']}", flush=True)
  print()
  print_rows(rows)
  print(machine_line())
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine_line(), "rows": rows}, f, indent=1, default=str)
  return rows


if __name__ == "__main__":
  main()
