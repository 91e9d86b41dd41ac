"""Training augmentations (docs/method.md#augmentation) in numpy / PIL, deterministic given a Generator.

BLIP's pre-training and ContextBLIP's IMAGECODE train transform:

  RandomResizedCrop(S, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)
  RandomHorizontalFlip(p=0.5)
  RandomAugment(N=2, M=5, isPIL=True, augs=[Identity, AutoContrast, Brightness, Sharpness,
                Equalize, ShearX, ShearY, TranslateX, TranslateY, Rotate])
  ToTensor, Normalize(CLIP mean/std)          -> here float32 [S, S, 3] (channels last)

Every random draw comes from the `np.random.Generator` passed in (the pipelines derive it from
the seed and the record index), never from global state.

RandomResizedCrop follows torchvision's `get_params`: 10 attempts of (area fraction ~ U(scale),
log aspect ~ U(log ratio)), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)),
accepted when it fits, top-left uniform; else the central crop clamped to the ratio range.
Then crop and PIL bicubic resize, as torchvision does on PIL images.

RandomAugment reconstructs BLIP `transform/randaugment.py`: N ops drawn uniformly with
replacement; each applied with probability 0.5 at level M of MAX_LEVEL = 10:
  Identity, AutoContrast (per-channel min/max stretch), Equalize (PIL's histogram algorithm)
  Brightness, Sharpness: factor = M / 10 * 1.8 + 0.1  (so exactly 1.0, a no-op, at M = 5)
  ShearX/Y: shear = M / 10 * 0.3, random sign, fill 128, bilinear
  TranslateX/Y: offset = M / 10 * 10 pixels (absolute, whatever the image size), random sign
  Rotate: angle = M / 10 * 30 degrees, random sign, about (W/2, H/2), fill 128, bilinear
Departures from BLIP (which uses OpenCV, unavailable here):
  * The affine ops go through PIL `Image.transform` with OpenCV's matrices converted to PIL's
    pixel-centre convention, so the geometry matches `cv2.warpAffine`; bilinear weights are
    float in PIL vs 5-bit fixed point in OpenCV (differences of about one grey level), and
    PIL fills an output pixel whose source centre falls outside the image instead of blending
    the border value in OpenCV's way (a one-pixel fringe may differ).
  * Sharpness clips to [0, 255] before the uint8 cast; BLIP's cast wraps around when the
    blend overshoots (only for factors > 1, i.e. M > 5).
  * Brightness is BLIP's lookup table (multiply, clip, truncate), not PIL's ImageEnhance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from contextblip_jax.data import preprocess

MAX_LEVEL = 10
FILL = (128, 128, 128)
TRANSLATE_CONST = 10
BLIP_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
            "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


# --------------------------------------------------------------------------- crop and flip

def crop_params(width: int, height: int, rng: np.random.Generator,
                scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (top, left, h, w)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height                     # fallback: central crop
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
  top, left, h, w = crop_params(img.width, img.height, rng, scale, ratio)
  return img.crop((left, top, left + w, top + h)).resize((size, size),
                                                         Image.Resampling.BICUBIC)


def random_horizontal_flip(img: Image.Image, rng: np.random.Generator,
                           p: float = 0.5) -> Image.Image:
  return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


# --------------------------------------------------------------------------- RandAugment ops

def _lut(img: Image.Image, tables: list[np.ndarray]) -> Image.Image:
  """Applies one 256-entry uint8 table per channel."""
  x = np.asarray(img)
  out = np.stack([tables[c][x[..., c]] for c in range(3)], axis=-1)
  return Image.fromarray(out.astype(np.uint8), "RGB")


def autocontrast(img: Image.Image) -> Image.Image:
  """Per-channel stretch of [min, max] to [0, 255] (BLIP autocontrast_func, cutoff 0)."""
  x = np.asarray(img)
  tables = []
  for c in range(3):
    lo, hi = int(x[..., c].min()), int(x[..., c].max())
    if hi <= lo:
      tables.append(np.arange(256, dtype=np.uint8))
      continue
    s = 255.0 / (hi - lo)
    tables.append(np.clip(np.arange(256) * s - lo * s, 0, 255).astype(np.uint8))
  return _lut(img, tables)


def equalize(img: Image.Image) -> Image.Image:
  """PIL ImageOps.equalize (BLIP equalize_func reproduces it)."""
  return ImageOps.equalize(img)


def brightness(img: Image.Image, factor: float) -> Image.Image:
  table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
  return _lut(img, [table] * 3)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
  """Blend with a 3x3 smoothing ([1 1 1; 1 5 1; 1 1 1] / 13) on interior pixels only."""
  if factor == 1.0:
    return img
  x = np.asarray(img).astype(np.float32)
  h, w = x.shape[:2]
  if h < 3 or w < 3:
    return img
  acc = sum(x[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  smooth = np.rint((acc + 4.0 * x[1:-1, 1:-1]) / 13.0)
  out = x.copy()
  out[1:-1, 1:-1] = smooth + factor * (x[1:-1, 1:-1] - smooth)
  return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def warp_affine(img: Image.Image, matrix: np.ndarray, fill=FILL) -> Image.Image:
  """cv2.warpAffine(img, matrix, (W, H), INTER_LINEAR, borderValue=fill) through PIL.

  `matrix` [2, 3] maps source to destination pixel indices (OpenCV convention). PIL wants the
  destination -> source map in continuous coordinates (pixel centres at +0.5)."""
  a = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
  inv = np.linalg.inv(a)
  shift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
  pil = np.linalg.inv(shift) @ inv @ shift          # continuous -> index, map, index -> continuous
  return img.transform(img.size, Image.Transform.AFFINE, tuple(pil[:2].reshape(-1)),
                       resample=Image.Resampling.BILINEAR, fillcolor=tuple(fill))


def shear_x(img, factor, fill=FILL):
  return warp_affine(img, [[1, factor, 0], [0, 1, 0]], fill)


def shear_y(img, factor, fill=FILL):
  return warp_affine(img, [[1, 0, 0], [factor, 1, 0]], fill)


def translate_x(img, offset, fill=FILL):
  return warp_affine(img, [[1, 0, -offset], [0, 1, 0]], fill)


def translate_y(img, offset, fill=FILL):
  return warp_affine(img, [[1, 0, 0], [0, 1, -offset]], fill)


def rotate(img, degrees, fill=FILL):
  """Counter-clockwise by `degrees` about (W/2, H/2) (cv2.getRotationMatrix2D, scale 1)."""
  cx, cy = img.width / 2, img.height / 2
  a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
  return warp_affine(img, [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]], fill)


def _signed(rng, value, negate_if_above=True):
  """BLIP's random sign: shear/translate negate when U > 0.5, rotate when U < 0.5."""
  u = rng.random()
  return -value if (u > 0.5 if negate_if_above else u < 0.5) else value


def apply_op(name: str, img: Image.Image, level: float, rng: np.random.Generator,
             translate_const: float = TRANSLATE_CONST, fill=FILL) -> Image.Image:
  """One RandAugment op at `level` (of MAX_LEVEL), drawing its sign from `rng` like BLIP."""
  frac = level / MAX_LEVEL
  if name == "Identity":
    return img
  if name == "AutoContrast":
    return autocontrast(img)
  if name == "Equalize":
    return equalize(img)
  if name == "Brightness":
    return brightness(img, frac * 1.8 + 0.1)
  if name == "Sharpness":
    return sharpness(img, frac * 1.8 + 0.1)
  if name in ("ShearX", "ShearY"):
    f = _signed(rng, frac * 0.3)
    return (shear_x if name == "ShearX" else shear_y)(img, f, fill)
  if name in ("TranslateX", "TranslateY"):
    off = _signed(rng, frac * float(translate_const))
    return (translate_x if name == "TranslateX" else translate_y)(img, off, fill)
  if name == "Rotate":
    return rotate(img, _signed(rng, frac * 30.0, negate_if_above=False), fill)
  raise ValueError(f"unknown RandAugment op {name!r}; known: {BLIP_OPS}")


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """BLIP RandomAugment(N, M, isPIL=True, augs=ops): N ops, each applied with p = prob."""
  n: int = 2
  m: float = 5
  ops: tuple[str, ...] = BLIP_OPS
  prob: float = 0.5
  translate_const: float = TRANSLATE_CONST
  fill: tuple[int, int, int] = FILL

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    names = [self.ops[i] for i in rng.choice(len(self.ops), self.n)]
    for name in names:
      if rng.random() > self.prob:
        continue
      img = apply_op(name, img, self.m, rng, self.translate_const, self.fill)
    return img


# --------------------------------------------------------------------------- full transforms

@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """RandomResizedCrop -> [flip] -> [RandAugment] -> CLIP-normalised float32 [S, S, 3]."""
  image_size: int
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  randaugment: RandAugment | None = RandAugment()

  def pil(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = random_resized_crop(preprocess.to_rgb(img), self.image_size, rng, self.scale,
                              self.ratio)
    if self.flip:
      img = random_horizontal_flip(img, rng)
    if self.randaugment is not None:
      img = self.randaugment(img, rng)
    return img

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    return preprocess.normalize(np.asarray(self.pil(img, rng), dtype=np.uint8))


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Bicubic resize to (S, S) + CLIP normalisation (preprocess.py); ignores `rng`."""
  image_size: int

  def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
    return preprocess.preprocess_pil(img, self.image_size)


AUGMENTATIONS = {
    0: "RandomResizedCrop(0.2-1) + flip + RandAugment(2, 5)  (ContextBLIP default)",
    1: "as 0 without the horizontal flip",
    2: "as 0 with crop scale (0.5, 1)",
    3: "as 0 with RandAugment magnitude M = 10",
    "none": "evaluation transform (bicubic resize only)",
}


def make_train_transform(image_size: int, augmentation: int | str = 0,
                         min_scale: float | None = None) -> Callable:
  """ContextBLIP's `--augmentation` choices (docs/method.md#augmentation), or 'none' for the eval transform.

  `min_scale` overrides the crop's lower scale bound (BLIP pre-training uses 0.2)."""
  if augmentation == "none" or augmentation is None:
    return EvalTransform(image_size)
  if augmentation not in (0, 1, 2, 3):
    raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {augmentation!r}")
  scale = (0.5, 1.0) if augmentation == 2 else (0.2, 1.0)
  if min_scale is not None:
    scale = (float(min_scale), 1.0)
  return TrainTransform(image_size, scale=scale, flip=augmentation != 1,
                        randaugment=RandAugment(m=10 if augmentation == 3 else 5))
