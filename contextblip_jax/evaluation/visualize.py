"""PNG of the text-guided mask and the cross-attention over a few evaluation images.

For each of the first sets of a labelled split, on its first description and gold image:
  panel 1  the image
  panel 2  the text -> image cross-attention (mean over layers, heads and the description's
           word tokens: `masking.patch_scores` with token_choice='valid_mean', no noise) over
           the patch grid, overlaid on the image
  panel 3  the TMIM text-guided mask (docs/method.md#masking): the top pi*P patches by that score, greyed
The description is the row title. Rendering uses matplotlib's Agg backend (no display).

Beside the figure, `<name>_overlays/` holds one small PNG per description of those sets (panels
2 and 3 of its gold image, `save_overlays`) and an index.json naming each (set, description
index), which the error-analysis page shows on the description's row.
"""

from __future__ import annotations

import functools
import json
import textwrap
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.training import masking
from contextblip_jax.data import preprocess
from contextblip_jax.data import imagecode
from contextblip_jax.models.contextblip import ContextBlip
from contextblip_jax.storage import paths
from contextblip_jax.storage.atomic import atomic_file
from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode

OVERLAY_SUFFIX = "_overlays"    # <figure name>_overlays/: per-description overlays + index.json
OVERLAY_SIDE = 128              # px of each overlay panel


@functools.partial(jax.jit, static_argnames=("model", "mask_ratio"))
def _attention_and_mask(params, pixels, input_ids, attention_mask, *, model: ContextBlip,
                        mask_ratio: float):
  """([B, P] attention over patches, [B, P] bool mask) for one text per image.

  Both come from `masking.patch_scores` with the 'valid_mean' token weighting and no noise:
  the heat map is that score (L2-normalised per image) and the mask its top-M patches.
  """
  key = jax.random.PRNGKey(0)                   # unused without noise / a random token
  embeds = model.apply({"params": params}, pixels, method=ContextBlip.image_embeds)
  out = model.apply({"params": params}, input_ids, attention_mask, embeds, True, True,
                    method=ContextBlip.multimodal)
  heat = masking.patch_scores(out.cross_attentions, attention_mask, key,
                              token_choice="valid_mean", noise=0.0)        # [B, P]
  masked_idx, _ = masking.select_masked_patches(
      out.cross_attentions, attention_mask, key, mask_ratio=mask_ratio,
      token_choice="valid_mean", noise=0.0)                                # [B, M]
  p = heat.shape[1]
  mask = jnp.zeros_like(heat, bool).at[jnp.arange(heat.shape[0])[:, None], masked_idx].set(True)
  return heat, mask[:, :p]


def attention_figures(model: ContextBlip, params: Any, split: imagecode.ImagecodeSplit,
                      out_path: str, num_sets: int = 4, max_length: int = 30,
                      tokenizer: BlipTokenizer | None = None,
                      mask_ratio: float = masking.DEFAULT_MASK_RATIO) -> list[str]:
  """Writes `<out_path>.png` for the first `num_sets` labelled sets (mask: the top
  `mask_ratio` of the patches, the objective's pi) and, for every description of those sets,
  an overlay under `<out_path>_overlays/` (`save_overlays`); returns [path of the PNG] ([]
  when nothing to draw). Runs on process 0 only."""
  if jax.process_index() != 0:
    return []
  chosen = [split.examples[i] for s in split.sets[:num_sets] for i in s.example_indices]
  chosen = [e for e in chosen if e.label >= 0]
  if not chosen:
    return []
  cfg = model.config
  size, grid = cfg.blip.vision.image_size, cfg.blip.vision.grid
  tok = tokenizer or BlipTokenizer()
  pixels = np.stack([preprocess.load_image(e.image_paths[e.label], size) for e in chosen])
  enc = tok([pre_caption_imagecode(e.description) for e in chosen], max_length=max_length)
  needed = {k: params[k] for k in ("pretrained_blip", "vision_adapter") if k in params}
  heat, mask = _attention_and_mask(
      jax.device_get(needed), jnp.asarray(pixels), jnp.asarray(enc["input_ids"]),
      jnp.asarray(enc["attention_mask"]), model=model, mask_ratio=mask_ratio)
  heat, mask = np.asarray(heat).reshape(-1, grid, grid), np.asarray(mask).reshape(-1, grid, grid)
  images = preprocess.denormalize(pixels)
  path = out_path if out_path.endswith(".png") else out_path + ".png"
  first = [i for i, e in enumerate(chosen) if i == 0 or chosen[i - 1].set_name != e.set_name]
  _figure([chosen[i] for i in first], images[first], heat[first], mask[first], mask_ratio,
          path)
  save_overlays(path[:-len(".png")] + OVERLAY_SUFFIX, chosen, images, heat, mask)
  return [path]


def _figure(chosen, images, heat, mask, mask_ratio: float, path: str) -> None:
  """The three-panel PNG (module docstring), one row per example."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  size = images.shape[1]
  fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.9 * len(chosen)), squeeze=False)
  for i, e in enumerate(chosen):
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(f"{e.set_name[:28]} img {e.label}", fontsize=7)
    axes[i, 1].imshow(images[i])
    axes[i, 1].imshow(heat[i], cmap="inferno", alpha=0.6,
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                      interpolation="nearest")
    axes[i, 1].set_title("cross-attention", fontsize=7)
    axes[i, 2].imshow(masked_image(images[i], mask[i]))
    axes[i, 2].set_title(f"text-guided mask ({int(mask_ratio * 100)}%)", fontsize=7)
    for ax in axes[i]:
      ax.set_xticks([])
      ax.set_yticks([])
    axes[i, 1].set_xlabel("\n".join(textwrap.wrap(e.description, 60)[:3]), fontsize=7)
  fig.tight_layout()
  with atomic_file(path, "wb") as f:      # a local temp file; gs:// paths are uploaded
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 [S, S, 3]: `image` with the patches of the [g, g] bool `mask` greyed."""
  cell = image.shape[0] // mask.shape[0]
  up = np.kron(mask, np.ones((cell, cell)))[..., None]
  return np.where(up > 0, 128, image).astype(np.uint8)


def overlay_panels(image: np.ndarray, heat: np.ndarray, mask: np.ndarray,
                   side: int = OVERLAY_SIDE) -> np.ndarray:
  """uint8 [side, 2 * side + 4, 3]: the image under its attention heat map (inferno, 60%)
  | the image with the text-guided mask greyed, each scaled to `side` px (nearest)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  s = image.shape[0]
  h = heat.astype(np.float64)
  h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else np.zeros_like(h)
  colours = colormaps["inferno"](np.kron(h, np.ones((s // h.shape[0],) * 2)))[..., :3] * 255
  left = (0.4 * image + 0.6 * colours).astype(np.uint8)
  right = masked_image(image, mask)
  def scale(a):
    idx = np.arange(side) * a.shape[0] // side
    return a[idx][:, idx]
  gap = np.full((side, 4, 3), 255, np.uint8)
  return np.concatenate([scale(left), gap, scale(right)], axis=1)


def save_overlays(out_dir: str, examples: Sequence[imagecode.ImagecodeExample],
                  images: np.ndarray, heat: np.ndarray, mask: np.ndarray) -> str:
  """One PNG per example (`overlay_panels` of its gold image: images [B, S, S, 3] uint8,
  heat [B, g, g], mask [B, g, g] bool) and `index.json` {"overlays": [{set, index, gold,
  description, file}]} under `out_dir`, the index written last; returns the index path.
  The error-analysis page (`evaluation/error_page.py --overlays`) shows them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  entries = []
  for i, e in enumerate(examples):
    name = f"overlay_{i:04d}.png"
    with atomic_file(paths.join(out_dir, name), "wb") as f:
      Image.fromarray(overlay_panels(images[i], heat[i], mask[i])).save(f, format="PNG")
    entries.append({"set": e.set_name, "index": e.position, "gold": e.label,
                    "description": e.description, "file": name})
  index = paths.join(out_dir, "index.json")
  with atomic_file(index) as f:
    json.dump({"overlays": entries}, f, indent=1)
  return index
