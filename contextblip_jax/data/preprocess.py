"""Image front-end (docs/method.md#vision-encoder): file -> RGB -> bicubic resize -> CLIP-normalised pixels.

The evaluation transform of every ContextBLIP / BLIP script is

  Resize((S, S), interpolation=BICUBIC)   # on a PIL image: PIL's antialiased bicubic,
                                          # no aspect-ratio preservation
  ToTensor()                              # uint8 -> float32 / 255, CHW
  Normalize(CLIP_MEAN, CLIP_STD)          # (x - mean) / std per channel

Here the result stays channels-last (HWC, float32), the layout every model in this package uses.
Files that are missing, unreadable, truncated or not images raise `ImageLoadError`, which names
the file.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from contextblip_jax.storage import paths

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class ImageLoadError(Exception):
  """An image file could not be read or decoded; `path` names it, `reason` says why."""

  def __init__(self, path: str, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"cannot load image {self.path}: {reason}")


class _WideImageError(ValueError):
  """A 16-bit, 32-bit or float image whose values cannot be scaled to 8 bits."""


def to_rgb(img: Image.Image) -> Image.Image:
  """`.convert('RGB')` as the reference does, for the 8-bit PIL modes (L, LA, P, RGBA,
  CMYK, ...). Wider grey modes are scaled first (PIL's own conversion clips them, which turns
  a 16-bit or float image white or black): 16-bit and 32-bit integer images (I;16*, I) with
  values in 0-65535 by 255/65535, float images (F) with values in [0, 1] by 255; other
  values raise (ImageLoadError in `decode_rgb`)."""
  if img.mode == "RGB":
    return img
  if img.mode in ("I", "F") or img.mode.startswith("I;16"):
    a = np.asarray(img, dtype=np.float64)
    if not np.all(np.isfinite(a)):
      raise _WideImageError(f"{img.mode} image with non-finite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    top = 1.0 if img.mode == "F" else 65535.0
    if lo < 0 or hi > top:
      raise _WideImageError(f"{img.mode} image with values in [{lo:g}, {hi:g}], outside "
                            f"[0, {top:g}]: convert it to an 8-bit image first")
    img = Image.fromarray(np.round(a * (255.0 / top)).astype(np.uint8), "L")
  return img.convert("RGB")


def open_rgb(path: str) -> Image.Image:
  """Opens and fully decodes `path` as an RGB PIL image; raises ImageLoadError on failure."""
  path = os.fspath(path)
  try:                        # a local path or a gs:// URL; opened first: one request remotely
    with paths.open(path, "rb") as f:
      data = f.read()
  except IsADirectoryError as e:
    raise ImageLoadError(path, "is a directory") from e
  except FileNotFoundError as e:              # an object store: a "directory" is not a file
    raise ImageLoadError(path, "is a directory" if paths.isdir(path) else "no such file") from e
  except OSError as e:
    raise ImageLoadError(path, f"unreadable ({e.strerror or e})") from e
  if not data and paths.is_remote(path) and paths.isdir(path):   # gcsfs reads a prefix as b""
    raise ImageLoadError(path, "is a directory")
  return decode_rgb(data, name=path)


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
  """Decodes encoded image bytes (JPEG, PNG, ...) to RGB; errors name `name`."""
  if not data:
    raise ImageLoadError(name, "empty file")
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()                    # decode now so truncated files fail here
      return to_rgb(img)
  except UnidentifiedImageError as e:
    raise ImageLoadError(name, "not a recognised image format") from e
  except _WideImageError as e:
    raise ImageLoadError(name, str(e)) from e
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageLoadError(name, f"corrupt or truncated image ({e})") from e


def resize(img: Image.Image, size: int) -> Image.Image:
  """Bicubic resize to (size, size), as torchvision `Resize((size, size), BICUBIC)` on PIL."""
  if img.size == (size, size):
    return img   # PIL's resize is the identity then too; skip the copy
  return img.resize((size, size), Image.Resampling.BICUBIC)


def normalize(pixels_uint8: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 (x / 255 - CLIP_MEAN) / CLIP_STD (ToTensor + Normalize)."""
  x = np.asarray(pixels_uint8)
  if x.dtype != np.uint8:
    raise TypeError(f"normalize expects uint8 pixels, got {x.dtype}")
  if x.shape[-1] != 3:
    raise ValueError(f"normalize expects [..., H, W, 3] pixels, got shape {x.shape}")
  x = x.astype(np.float32) / np.float32(255.0)
  return (x - CLIP_MEAN) / CLIP_STD


def denormalize(pixels: np.ndarray) -> np.ndarray:
  """Inverse of `normalize` for visualisation: float [..., H, W, 3] -> uint8 (rounded, clipped)."""
  x = np.asarray(pixels, np.float32) * CLIP_STD + CLIP_MEAN
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def preprocess_pil(img: Image.Image, size: int = 224) -> np.ndarray:
  """PIL image (any mode) -> float32 [size, size, 3] normalised pixels."""
  return normalize(np.asarray(resize(to_rgb(img), size), dtype=np.uint8))


def load_image(path: str, size: int = 224) -> np.ndarray:
  """Image file -> float32 [size, size, 3] CLIP-normalised pixels (raises ImageLoadError)."""
  img = open_rgb(path)
  try:
    return preprocess_pil(img, size)
  except (OSError, ValueError) as e:
    raise ImageLoadError(path, f"cannot resize or convert ({e})") from e


def load_images(paths: Sequence[str], size: int = 224) -> np.ndarray:
  """Image files -> float32 [N, size, size, 3]; the first bad file raises ImageLoadError."""
  if not paths:
    return np.zeros((0, size, size, 3), np.float32)
  return np.stack([load_image(p, size) for p in paths])
