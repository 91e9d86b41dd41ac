"""Position-embedding resampling as BLIP's `interpolate_pos_embed`, in NumPy (no torch).

BLIP (and HF `interpolate_pos_encoding`) keeps the CLS position and resizes the patch grid with
`torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`. That is Keys' cubic
convolution with A = -0.75 (`jax.image.resize` uses A = -0.5, so it is not used here), source
coordinate `(i + 0.5) * in / out - 0.5` without clamping, taps at floor-1 .. floor+2 with
indices clamped to the border (edge replication), separable over rows and columns. This file
reproduces torch's CPU kernel (`compute_indices_weights_cubic` + `guard_index_and_lambda`);
it is computed in float64 and agrees with torch float32 to ~1e-7.
"""

from __future__ import annotations

import numpy as np

TORCH_CUBIC_A = -0.75


def cubic_coefficients(t: np.ndarray, a: float = TORCH_CUBIC_A) -> np.ndarray:
  """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t -> [..., 4]."""
  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix M with `y = M @ x` = torch bicubic (align_corners=False) along one axis."""
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    real = scale * (i + 0.5) - 0.5                   # no clamp to 0 for cubic
    idx = min(int(np.floor(real)), in_size - 1)      # guard_index_and_lambda
    lam = min(max(real - idx, 0.0), 1.0)
    for j, w in enumerate(cubic_coefficients(np.float64(lam))):
      m[i, min(max(idx - 1 + j, 0), in_size - 1)] += w
  return m


def resize_bicubic(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """[H, W, C] -> [out_h, out_w, C], torch bicubic (align_corners=False), float64 math."""
  h, w, _ = grid.shape
  mh, mw = bicubic_matrix(h, out_hw[0]), bicubic_matrix(w, out_hw[1])
  out = np.einsum("ih,jw,hwc->ijc", mh, mw, grid.astype(np.float64))
  return out.astype(grid.dtype)


def resample_pos_embed(pos_embed: np.ndarray, new_grid: int, num_extra_tokens: int = 1
                       ) -> np.ndarray:
  """[1, extra + g0*g0, D] -> [1, extra + new_grid^2, D]; the extra (CLS) rows are kept."""
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
    raise ValueError(f"pos_embed must be [1, N, D], got {pos_embed.shape}")
  n, d = pos_embed.shape[1] - num_extra_tokens, pos_embed.shape[2]
  g0 = int(round(n ** 0.5))
  if g0 * g0 != n:
    raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
  extra, patches = pos_embed[:, :num_extra_tokens], pos_embed[0, num_extra_tokens:]
  if g0 == new_grid:
    return pos_embed
  grid = resize_bicubic(patches.reshape(g0, g0, d), (new_grid, new_grid))   # [g, g, D]
  return np.concatenate([extra, grid.reshape(1, new_grid * new_grid, d)], axis=1)
