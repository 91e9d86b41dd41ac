r"""Raw downloads -> the data layout the configs read (and, with --tfds, array_record datasets).

  python -m contextblip_jax.data.prepare --out data_ready \
      --imagecode_images image-sets.zip \
      --pairs coco.json --pairs vg.json \
      --pairs_remap /export/share/datasets/vision/coco/images/=/data/coco/ \
      --pairs_remap /export/share/datasets/vision/visual-genome/image/=/data/vg/VG_100K/ \
      --pairs_remap /export/share/datasets/vision/visual-genome/image/=/data/vg/VG_100K_2/ [--tfds]

writes
  OUT/imagecode/   train_data.json, valid_data.json, test_data_unlabeled.json,
                   manual_annotation_valid.yaml, valid_split.json (copied from
                   --imagecode_annotations, default the repository's data/imagecode/) and
                   image-sets/<set>/img<k>.jpg (extracted from the zip, or a symlink to a
                   directory already unzipped); every set of every split is checked to have
                   its 10 images                           -> --config.data.imagecode_dir
  OUT/pairs/<name>.json  each --pairs file with the image paths rewritten (--pairs_remap
                   OLD=NEW prefixes, tried in order, the first rewrite whose file exists
                   wins; relative paths joined to --pairs_image_root or the JSON's
                   directory) and checked to exist           -> --config.data.pairs_json
  OUT/tfds/        (--tfds) the TFDS array_record datasets of tfds_imagecode / tfds_pairs
                   (or --tfds_dir, which may be a gs:// URL: the datasets hold the image
                   bytes, so a bucket copy is complete by itself)
  OUT/prepared.json  counts and the config flags, which are also printed at the end.

OUT is a local folder (image-sets/ is extracted or linked there); a gs:// --out is refused with
what to do instead. The --pairs files and the --pairs_remap NEW prefixes may be gs:// URLs
(the rewritten pair files then name images in the bucket; each is checked to exist, one
request per image).

Progress lines go to stdout (extraction, set checks, pair checks). Problems a user can fix (a
missing file, a zip entry escaping its folder, sets or images that are missing) raise
`PrepareError` naming the file; `main` prints one `error: ...` line and returns 2. Every file is
written through storage/atomic.py, and a rerun reuses an image-sets/ already in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from typing import Callable, Sequence

from contextblip_jax.data import imagecode
from contextblip_jax.data.propositions import SHIPPED_FILE
from contextblip_jax.storage import cli_errors, paths
from contextblip_jax.storage.atomic import atomic_file

Log = Callable[[str], None]
SHIPPED_ANNOTATIONS = os.path.dirname(SHIPPED_FILE)    # <checkout>/data/imagecode
ANNOTATION_FILES = (*imagecode.SPLIT_FILES.values(), imagecode.ANNOTATION_FILE,
                    "valid_split.json")


class PrepareError(ValueError):
  """Input the user has to fix; the message names the file."""


def _progress(log: Log, what: str, i: int, n: int, every: int) -> None:
  if n and (i == n or i % every == 0):
    log(f"{what}: {i:,}/{n:,} ({100 * i // n}%)")


def _step(n: int) -> int:
  return max(1, n // 10)


def extract_image_sets(zip_path: str, dest: str, log: Log) -> int:
  """Extracts the img files of `image-sets.zip` into `dest` (<set>/img<k>.jpg); entries may
  sit under a top-level `image-sets/`. Returns the number of files written."""
  if not zipfile.is_zipfile(zip_path):
    raise PrepareError(f"{zip_path}: not a zip file (expected IMAGECODE's image-sets.zip)")
  tmp = dest + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  with zipfile.ZipFile(zip_path) as z:
    members = [m for m in z.infolist() if not m.is_dir()]
    n = len(members)
    for i, m in enumerate(members, 1):
      parts = [p for p in m.filename.replace("\\", "/").split("/") if p]
      if m.filename.startswith("/") or ".." in parts:
        raise PrepareError(f"{zip_path}: entry {m.filename!r} points outside the archive")
      if parts and parts[0] == imagecode.IMAGE_DIR:
        parts = parts[1:]
      if len(parts) == 2 and not parts[1].startswith("."):
        os.makedirs(os.path.join(tmp, parts[0]), exist_ok=True)
        with z.open(m) as src, open(os.path.join(tmp, *parts), "wb") as out:
          shutil.copyfileobj(src, out)
      _progress(log, "extract image-sets", i, n, _step(n))
  os.replace(tmp, dest)
  return n


def check_sets(imagecode_dir: str, log: Log) -> dict[str, dict[str, int]]:
  """Every set named by each split's JSON has its 10 images; returns per-split counts."""
  root = os.path.join(imagecode_dir, imagecode.IMAGE_DIR)
  counts, bad = {}, []
  for split, name in imagecode.SPLIT_FILES.items():
    path = os.path.join(imagecode_dir, name)
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      sets = list(json.load(f))
    n, complete = len(sets), 0
    for i, s in enumerate(sets, 1):
      d = os.path.join(root, s)
      found = len(imagecode.list_candidates(d)) if os.path.isdir(d) else 0
      if found == imagecode.NUM_CANDIDATES:
        complete += 1
      else:
        bad.append(f"{split}/{s} ({found} images)")
      _progress(log, f"check {split} sets", i, n, _step(n))
    counts[split] = {"sets": n, "complete": complete}
  if bad:
    raise PrepareError(f"{root}: {len(bad)} image sets are missing or do not hold "
                       f"{imagecode.NUM_CANDIDATES} images, e.g. {', '.join(bad[:3])} (is "
                       "image-sets.zip complete?)")
  return counts


def prepare_imagecode(out: str, images: str, annotations: str, log: Log) -> dict:
  """OUT/imagecode: annotation copies + image-sets (extracted or linked), checked."""
  dest = os.path.join(out, "imagecode")
  os.makedirs(dest, exist_ok=True)
  for name in ANNOTATION_FILES:
    src = os.path.join(annotations, name)
    if os.path.exists(src):
      with open(src, "rb") as f, atomic_file(os.path.join(dest, name), "wb") as g:
        shutil.copyfileobj(f, g)
  if not os.path.exists(os.path.join(dest, imagecode.SPLIT_FILES["valid"])):
    raise PrepareError(f"{annotations}: no {imagecode.SPLIT_FILES['valid']} (pass "
                       "--imagecode_annotations, the folder holding IMAGECODE's JSON files)")
  sets_dir = os.path.join(dest, imagecode.IMAGE_DIR)
  if os.path.exists(sets_dir):
    log(f"image-sets: reusing {sets_dir}")
  elif not os.path.exists(images):
    raise PrepareError(f"{images}: no such file or directory (IMAGECODE's image-sets.zip)")
  elif os.path.isdir(images):
    os.symlink(os.path.abspath(images), sets_dir)
    log(f"image-sets: linked {sets_dir} -> {os.path.abspath(images)}")
  else:
    log(f"image-sets: extracting {images}")
    extract_image_sets(images, sets_dir, log)
  return check_sets(dest, log)


def _remap(path: str, remaps: Sequence[tuple[str, str]], root: str) -> str:
  """The first rewrite (in order) whose file exists; several NEW prefixes may share one OLD
  prefix (VG's images are split over VG_100K/ and VG_100K_2/). Else the first rewrite. A
  rewritten relative path is taken from the working directory; a path no prefix matches, from
  `root`."""
  tried = [paths.abspath(new + path[len(old):]) for old, new in remaps if path.startswith(old)]
  tried = tried or [path if os.path.isabs(path) or paths.is_remote(path)
                    else paths.join(root, path)]
  return next((p for p in tried if paths.exists(p)), tried[0])


def prepare_pairs(out: str, json_paths: Sequence[str], remaps: Sequence[tuple[str, str]],
                  image_root: str, skip_missing: bool, log: Log) -> dict[str, dict[str, int]]:
  """OUT/pairs/<name>.json with absolute, existing image paths; counts per file."""
  counts = {}
  for path in json_paths:
    try:
      with paths.open(path, encoding="utf-8") as f:
        entries = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise PrepareError(f"{path}: cannot read the pair list ({e})") from None
    if not isinstance(entries, list):
      raise PrepareError(f"{path}: expected a list of {{\"image\", \"caption\"}} objects")
    root = image_root or paths.dirname(paths.abspath(path))
    kept, missing = [], []
    for i, e in enumerate(entries, 1):
      if not isinstance(e, dict) or not isinstance(e.get("image"), str):
        raise PrepareError(f"{path}: entry {i - 1} has no \"image\" path")
      image = _remap(e["image"], remaps, root)
      if paths.exists(image):
        kept.append({**e, "image": image})
      else:
        missing.append(image)
      _progress(log, f"check {paths.basename(path)} images", i, len(entries),
                _step(len(entries)))
    if missing and not skip_missing:
      raise PrepareError(f"{path}: {len(missing):,} of {len(entries):,} images not found, e.g. "
                         f"{missing[0]} (add --pairs_remap OLD=NEW for the JSON's path prefix, "
                         "or --skip_missing_images to leave them out)")
    name = paths.basename(path)
    with atomic_file(os.path.join(out, "pairs", name)) as f:
      json.dump(kept, f)
    counts[name] = {"pairs": len(entries), "kept": len(kept), "missing_images": len(missing)}
  return counts


def build_tfds(out: str, pair_files: Sequence[str], log: Log, data_dir: str = ""
               ) -> dict[str, str]:
  """TFDS array_record datasets of the prepared directories in `data_dir` (default OUT/tfds;
  a gs:// URL: built locally and uploaded, data/tfds_storage.py). Imports TFDS only here."""
  from contextblip_jax.data import tfds_imagecode, tfds_pairs
  built, data_dir = {}, data_dir or os.path.join(out, "tfds")
  if os.path.isdir(os.path.join(out, "imagecode")):
    log("tfds: building contextblip_imagecode (array_record)")
    built["imagecode"] = os.fspath(
        tfds_imagecode.build(os.path.join(out, "imagecode"), data_dir).data_dir)
  if pair_files:
    log("tfds: building contextblip_pairs (array_record)")
    config = tfds_pairs.PairsConfig(name="prepared", files=tuple(pair_files),
                                    description="pairs prepared by data/prepare.py")
    built["pairs"] = os.fspath(tfds_pairs.build(os.path.join(out, "pairs"), data_dir,
                                                config).data_dir)
  return built


def prepare(out: str, *, imagecode_images: str = "", imagecode_annotations: str = "",
            pairs: Sequence[str] = (), pairs_remap: Sequence[str] = (), pairs_image_root: str = "",
            skip_missing_images: bool = False, tfds: bool = False, tfds_dir: str = "",
            log: Log = print) -> dict:
  """Runs every requested part; returns the summary written to OUT/prepared.json."""
  if paths.is_remote(out):
    raise PrepareError(
        f"--out {out}: must be a local folder (image-sets.zip is extracted, or a folder "
        "linked, there); prepare locally and copy the folder with `gcloud storage cp -r`, "
        "or keep --out local and write the TFDS datasets to the bucket with --tfds "
        "--tfds_dir gs://...")
  if tfds_dir and not tfds:
    raise PrepareError(f"--tfds_dir {tfds_dir}: only used with --tfds")
  remaps = []
  for r in pairs_remap:
    old, sep, new = r.partition("=")
    if not sep or not old:
      raise PrepareError(f"--pairs_remap {r!r}: expected OLD_PREFIX=NEW_PREFIX")
    remaps.append((old, new))
  if not imagecode_images and not pairs:
    raise PrepareError("nothing to prepare: pass --imagecode_images and/or --pairs")
  out = os.path.abspath(out)
  summary: dict = {"out": out, "flags": []}
  if imagecode_images:
    summary["imagecode"] = prepare_imagecode(out, imagecode_images,
                                             imagecode_annotations or SHIPPED_ANNOTATIONS, log)
    summary["flags"].append(f"--config.data.imagecode_dir={os.path.join(out, 'imagecode')}")
  if pairs:
    summary["pairs"] = prepare_pairs(out, pairs, remaps, pairs_image_root,
                                     skip_missing_images, log)
    files = ",".join(os.path.join(out, "pairs", n) for n in summary["pairs"])
    summary["flags"].append(f"--config.data.pairs_json={files}")
  if tfds:
    summary["tfds"] = build_tfds(out, list(summary.get("pairs", {})), log, tfds_dir)
  with atomic_file(os.path.join(out, "prepared.json")) as f:
    json.dump(summary, f, indent=1)
  log("done; run the configs with " + " ".join(summary["flags"]))
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m contextblip_jax.data.prepare",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--imagecode_images", default="",
                 help="IMAGECODE's image-sets.zip, or the folder it unzips to")
  p.add_argument("--imagecode_annotations", default="",
                 help="folder with the IMAGECODE JSON / YAML files (default: data/imagecode/)")
  p.add_argument("--pairs", action="append", default=[],
                 help="BLIP/ALBEF pair JSON [{image, caption}] (repeat: coco.json, vg.json)")
  p.add_argument("--pairs_remap", action="append", default=[],
                 help="OLD=NEW image path prefix rewrite (repeatable; the first rewrite whose "
                      "file exists wins, so one OLD may map to several folders)")
  p.add_argument("--pairs_image_root", default="",
                 help="root of relative image paths (default: each JSON's folder)")
  p.add_argument("--skip_missing_images", action="store_true",
                 help="leave out pairs whose image is missing (counted) instead of stopping")
  p.add_argument("--tfds", action="store_true",
                 help="also build the TFDS array_record datasets under OUT/tfds")
  p.add_argument("--tfds_dir", default="",
                 help="where --tfds writes the datasets (default OUT/tfds); may be gs://...")
  args = p.parse_args(argv)
  log = lambda s: print(s, flush=True)  # noqa: E731
  try:
    prepare(args.out, imagecode_images=args.imagecode_images,
            imagecode_annotations=args.imagecode_annotations, pairs=args.pairs,
            pairs_remap=args.pairs_remap, pairs_image_root=args.pairs_image_root,
            skip_missing_images=args.skip_missing_images, tfds=args.tfds,
            tfds_dir=args.tfds_dir, log=log)
  except (PrepareError, imagecode.ImagecodeDataError, OSError) as e:
    return cli_errors.report(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
