"""Image preprocessing: torchvision's Resize(bicubic) + ToTensor + Normalize(CLIP), channels-last."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from contextblip_jax.data import preprocess as pp


def _photo(h=45, w=70, seed=0):
  """A smooth-ish RGB test picture (gradients plus noise), uint8 [h, w, 3]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
  return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def _torchvision_like(img: Image.Image, size: int) -> np.ndarray:
  """torchvision's eval transform written with torch ops: PIL bicubic resize, ToTensor, Normalize."""
  img = img.convert("RGB").resize((size, size), Image.BICUBIC)
  t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
  t = t.to(torch.float32).div(255)
  mean = torch.as_tensor(pp.CLIP_MEAN.tolist(), dtype=torch.float32)[:, None, None]
  std = torch.as_tensor(pp.CLIP_STD.tolist(), dtype=torch.float32)[:, None, None]
  return t.sub(mean).div(std).permute(1, 2, 0).numpy()


def _cubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resample_matrix(n_in, n_out):
  """Antialiased bicubic weights [n_out, n_in] (the filter widens by the scale when shrinking)."""
  scale = n_in / n_out
  fscale = max(scale, 1.0)
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = (i + 0.5) * scale
    lo = max(int(center - 2 * fscale + 0.5), 0)
    hi = min(int(center + 2 * fscale + 0.5), n_in)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) / fscale)
    m[i, lo:hi] = w / w.sum()
  return m


def test_constants():
  np.testing.assert_array_equal(pp.CLIP_MEAN, np.float32([0.48145466, 0.4578275, 0.40821073]))
  np.testing.assert_array_equal(pp.CLIP_STD, np.float32([0.26862954, 0.26130258, 0.27577711]))


@pytest.mark.parametrize("size", [32, 96])
def test_load_image_matches_torchvision_formula(tmp_path, size):
  path = tmp_path / "img.png"
  Image.fromarray(_photo()).save(path)
  ours = pp.load_image(str(path), size)
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, _torchvision_like(Image.open(path), size))


def _bicubic_reference(src, size, horizontal_first):
  """Separable float bicubic, rounded + clipped to 8 bits between the passes as PIL does.

  PIL chooses the pass order itself (recent versions run the shrinking axis first), so the
  caller tries both.
  """
  h, w, _ = src.shape
  x = src.astype(np.float64)
  passes = [lambda a: np.einsum("hwc,pw->hpc", a, _resample_matrix(w, size)),
            lambda a: np.einsum("oh,hwc->owc", _resample_matrix(h, size), a)]
  first, second = passes if horizontal_first else passes[::-1]
  return np.clip(second(np.clip(np.round(first(x)), 0, 255)), 0, 255)


@pytest.mark.parametrize("shape", [(45, 70), (10, 12), (40, 20)], ids=["shrink", "enlarge", "mixed"])
def test_resize_is_bicubic_per_axis_without_aspect_preservation(shape):
  src = _photo(*shape)
  out = pp.resize(Image.fromarray(src), 32)
  assert out.size == (32, 32)
  out = np.asarray(out, np.float64)
  # PIL works in fixed point: at most a level away from the float computation.
  err = min(np.abs(out - _bicubic_reference(src, 32, hfirst)).max() for hfirst in (True, False))
  assert err <= 1.0
  bilinear = np.asarray(Image.fromarray(src).resize((32, 32), Image.BILINEAR), np.float64)
  assert np.abs(bilinear - out).max() > 4.0    # the check above can tell the filters apart


def test_normalize_denormalize():
  x = _photo(8, 9)
  y = pp.normalize(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, (x / 255.0 - pp.CLIP_MEAN) / pp.CLIP_STD, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(pp.denormalize(y), x)
  np.testing.assert_array_equal(pp.denormalize(np.full((1, 1, 3), 100.0)), [[[255] * 3]])
  with pytest.raises(TypeError, match="uint8"):
    pp.normalize(x.astype(np.float32))
  with pytest.raises(ValueError, match="shape"):
    pp.normalize(x[..., :2])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
  rgb = Image.fromarray(_photo(20, 24))
  if mode == "I;16":
    img = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 3))
  elif mode == "P":
    img = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
  else:
    img = rgb.convert(mode)
  ext = "jpg" if mode == "CMYK" else "png"
  path = tmp_path / f"img_{mode.replace(';', '')}.{ext}"
  img.save(path)
  with Image.open(path) as check:
    assert check.mode == img.mode
  px = pp.load_image(str(path), 16)
  assert px.shape == (16, 16, 3) and np.isfinite(px).all()
  reference = Image.open(path)
  if mode == "I;16":
    # The reference's `.convert('RGB')` clips 16-bit values at 255 (a white image); we scale
    # 0-65535 to 0-255 first (a deliberate departure, see preprocess.to_rgb).
    wide = np.asarray(reference, np.float64)
    reference = Image.fromarray(np.round(wide * 255.0 / 65535.0).astype(np.uint8), "L")
  np.testing.assert_array_equal(px, _torchvision_like(reference, 16))
  if mode in ("L", "LA", "I;16"):
    u8 = pp.denormalize(px)
    assert (u8[..., 0] == u8[..., 1]).all() and (u8[..., 1] == u8[..., 2]).all()


def test_rgba_drops_alpha_like_convert(tmp_path):
  arr = np.concatenate([_photo(10, 10), np.full((10, 10, 1), 7, np.uint8)], -1)
  path = tmp_path / "a.png"
  Image.fromarray(arr, "RGBA").save(path)
  np.testing.assert_array_equal(pp.denormalize(pp.load_image(str(path), 10)), arr[..., :3])


def _jpeg_bytes():
  buf = io.BytesIO()
  Image.fromarray(_photo(64, 64)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


@pytest.mark.parametrize("kind,reason", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "empty file"),
    ("text", "not a recognised image format"),
    ("truncated_jpeg", "corrupt or truncated"),
    ("garbled_png", "corrupt or truncated"),
])
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, kind, reason):
  path = tmp_path / f"bad_{kind}.jpg"
  if kind == "directory":
    path.mkdir()
  elif kind == "empty":
    path.write_bytes(b"")
  elif kind == "text":
    path.write_text("this is not an image\n" * 10)
  elif kind == "truncated_jpeg":
    path.write_bytes(_jpeg_bytes()[:600])
  elif kind == "garbled_png":
    png = tmp_path / "ok.png"
    Image.fromarray(_photo(32, 32)).save(png)
    data = bytearray(png.read_bytes())
    data[60:200] = bytes(140)          # zero out part of the compressed IDAT stream
    path.write_bytes(bytes(data))
  with pytest.raises(pp.ImageLoadError) as err:
    pp.load_image(str(path), 16)
  assert err.value.path == str(path)
  assert str(path) in str(err.value) and reason in str(err.value)


def test_load_images_stacks_and_reports_the_bad_one(tmp_path):
  paths = []
  for i in range(3):
    p = tmp_path / f"img{i}.jpg"
    Image.fromarray(_photo(30 + i, 40, seed=i)).save(p)
    paths.append(str(p))
  batch = pp.load_images(paths, 24)
  assert batch.shape == (3, 24, 24, 3)
  np.testing.assert_array_equal(batch[1], pp.load_image(paths[1], 24))
  assert pp.load_images([], 24).shape == (0, 24, 24, 3)
  bad = tmp_path / "img_bad.jpg"
  bad.write_bytes(b"\xff\xd8\xff garbage")
  with pytest.raises(pp.ImageLoadError, match="img_bad.jpg"):
    pp.load_images(paths + [str(bad)], 24)


def test_decode_rgb_from_bytes():
  img = pp.decode_rgb(_jpeg_bytes(), name="frame.jpg")
  assert img.mode == "RGB" and img.size == (64, 64)
  with pytest.raises(pp.ImageLoadError, match="frame.jpg"):
    pp.decode_rgb(_jpeg_bytes()[:300], name="frame.jpg")
