"""PNG of the text-guided mask and the cross-attention over a few evaluation images.

For each of the first sets of a labelled split, on its first description and gold image:
  panel 1  the image
  panel 2  the text -> image cross-attention (mean over layers, heads and the description's
           word tokens: `masking.patch_scores` with token_choice='valid_mean', no noise) over
           the patch grid, overlaid on the image
  panel 3  the TMIM text-guided mask (docs/method.md#masking): the top pi*P patches by that score, greyed
The description is the row title. Rendering uses matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import functools
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.training import masking
from contextblip_jax.data import preprocess
from contextblip_jax.data import imagecode
from contextblip_jax.models.contextblip import ContextBlip
from contextblip_jax.storage.atomic import atomic_file
from contextblip_jax.data.tokenizer import BlipTokenizer, pre_caption_imagecode


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
  `mask_ratio` of the patches, the objective's pi); returns [path] ([] when
  nothing to draw). Runs on process 0 only."""
  if jax.process_index() != 0:
    return []
  chosen = [e for e in (split.examples[s.example_indices[0]] for s in split.sets[:num_sets])
            if e.label >= 0]
  if not chosen:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

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

  fig, axes = plt.subplots(len(chosen), 3, figsize=(7.5, 2.9 * len(chosen)), squeeze=False)
  cell = size // grid
  for i, e in enumerate(chosen):
    up = np.kron(mask[i], np.ones((cell, cell)))[..., None]
    masked = np.where(up > 0, 128, images[i]).astype(np.uint8)
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title(f"{e.set_name[:28]} img {e.label}", fontsize=7)
    axes[i, 1].imshow(images[i])
    axes[i, 1].imshow(heat[i], cmap="inferno", alpha=0.6,
                      extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                      interpolation="nearest")
    axes[i, 1].set_title("cross-attention", fontsize=7)
    axes[i, 2].imshow(masked)
    axes[i, 2].set_title(f"text-guided mask ({int(mask_ratio * 100)}%)", fontsize=7)
    for ax in axes[i]:
      ax.set_xticks([])
      ax.set_yticks([])
    axes[i, 1].set_xlabel("\n".join(textwrap.wrap(e.description, 60)[:3]), fontsize=7)
  fig.tight_layout()
  path = out_path if out_path.endswith(".png") else out_path + ".png"
  with atomic_file(path, "wb") as f:      # a local temp file; gs:// paths are uploaded
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)
  return [path]
