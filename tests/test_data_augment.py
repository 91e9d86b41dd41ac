"""Augmentations: torchvision crop algorithm, BLIP RandAugment op semantics, determinism."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from contextblip_jax.data import preprocess
from contextblip_jax.data import augment as A


def _image(h=24, w=32, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_crop_params_bounds_and_fallback():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = A.crop_params(64, 48, rng)
    assert 0 <= top <= 48 - h and 0 <= left <= 64 - w and h > 0 and w > 0
    assert 0.2 * 64 * 48 * 0.8 <= h * w <= 64 * 48
    assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
  assert A.crop_params(40, 40, rng, scale=(1, 1), ratio=(1, 1)) == (0, 0, 40, 40)
  # no crop of area >= 0.9 fits a 100 x 10 strip at ratio <= 4/3: central fallback
  assert A.crop_params(100, 10, rng, scale=(0.9, 1.0)) == (0, 43, 10, 13)
  assert A.crop_params(10, 100, rng, scale=(0.9, 1.0)) == (43, 0, 13, 10)


def test_random_resized_crop_is_crop_then_bicubic():
  img = _image()
  top, left, h, w = A.crop_params(32, 24, np.random.default_rng(3))
  out = A.random_resized_crop(img, 16, np.random.default_rng(3))
  ref = img.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BICUBIC)
  assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_colour_ops():
  img = _image()
  x = np.asarray(img)
  # factor = M / 10 * 1.8 + 0.1 = 1.0 at M = 5: BLIP's Brightness and Sharpness are no-ops
  rng = np.random.default_rng(0)
  for name in ("Brightness", "Sharpness", "Identity"):
    assert np.array_equal(np.asarray(A.apply_op(name, img, 5, rng)), x)
  bright = np.asarray(A.apply_op("Brightness", img, 10, rng))
  assert np.array_equal(bright, np.clip(x.astype(np.float32) * 1.9, 0, 255).astype(np.uint8))
  sharp = np.asarray(A.sharpness(img, 1.9)).astype(int)
  assert np.array_equal(sharp[0], x[0]) and not np.array_equal(sharp[1:-1, 1:-1],
                                                               x[1:-1, 1:-1])
  low = Image.fromarray((50 + x // 5).astype(np.uint8))
  stretched = np.asarray(A.autocontrast(low))
  assert stretched.min() == 0 and stretched.max() == 255
  assert np.array_equal(np.asarray(A.equalize(img)), np.asarray(ImageOps.equalize(img)))


def test_geometric_ops_follow_opencv_geometry():
  img = _image()
  x = np.asarray(img)
  moved = np.asarray(A.translate_x(img, 5))         # dst(x) = src(x + 5), fill 128
  assert np.array_equal(moved[:, :-5], x[:, 5:]) and (moved[:, -5:] == 128).all()
  moved = np.asarray(A.translate_y(img, -3))
  assert np.array_equal(moved[3:], x[:-3]) and (moved[:3] == 128).all()
  assert np.array_equal(np.asarray(A.rotate(img, 0)), x)
  assert np.array_equal(np.asarray(A.shear_x(img, 0.0)), x)
  # 90 degrees counter-clockwise about (W/2, H/2) = (4, 4) in OpenCV's index convention:
  # dst(x', y') = src(x = 8 - y', y = x'), so output row 1 is input column 7, row 0 is fill
  sq = _image(8, 8)
  rot = np.asarray(A.rotate(sq, 90))
  assert np.array_equal(rot[1], np.asarray(sq)[:, 7])
  assert (rot[0] == 128).all()


def test_randaugment_semantics_and_determinism():
  img = _image()
  x = np.asarray(img)
  shift = A.RandAugment(n=1, m=5, ops=("TranslateX",), prob=1.0)
  seen = set()
  for seed in range(20):
    out = np.asarray(shift(img, np.random.default_rng(seed)))
    if np.array_equal(out[:, :-5], x[:, 5:]):
      seen.add("left")
    elif np.array_equal(out[:, 5:], x[:, :-5]):
      seen.add("right")
  assert seen == {"left", "right"}                   # level 5 -> 5 px, random sign
  assert np.array_equal(np.asarray(A.RandAugment(ops=("TranslateX",), prob=0.0)(
      img, np.random.default_rng(0))), x)
  ra = A.RandAugment()
  a = np.asarray(ra(img, np.random.default_rng(11)))
  assert np.array_equal(a, np.asarray(ra(img, np.random.default_rng(11))))
  outs = {np.asarray(ra(img, np.random.default_rng(s))).tobytes() for s in range(30)}
  assert len(outs) > 5
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    A.apply_op("Solarise", img, 5, np.random.default_rng(0))


def test_train_transforms_and_options():
  img = _image(40, 50)
  t0 = A.make_train_transform(16, 0)
  a = t0(img, np.random.default_rng(5))
  assert a.shape == (16, 16, 3) and a.dtype == np.float32
  assert np.array_equal(a, t0(img, np.random.default_rng(5)))
  assert not np.array_equal(a, t0(img, np.random.default_rng(6)))
  assert (t0.flip, t0.scale, t0.randaugment.m) == (True, (0.2, 1.0), 5)
  t1, t2, t3 = (A.make_train_transform(16, k) for k in (1, 2, 3))
  assert not t1.flip and t2.scale == (0.5, 1.0) and t3.randaugment.m == 10
  assert A.make_train_transform(16, 0, min_scale=0.5).scale == (0.5, 1.0)
  ev = A.make_train_transform(16, "none")
  assert np.array_equal(ev(img, None), preprocess.preprocess_pil(img, 16))
  with pytest.raises(ValueError, match="augmentation"):
    A.make_train_transform(16, 7)
  flipped = A.random_horizontal_flip(img, np.random.default_rng(0), p=1.0)
  assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
