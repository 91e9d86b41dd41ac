"""Score one description against a few images with any parameter directory.

  python -m contextblip_jax.score --checkpoint DIR --text "a dog on a beach" img0.jpg img1.jpg

prints JSON: per image the ITM match probability (softmax index 1, [ENC] at position 0,
SPEC §2.3) and the ITC cosine similarity (SPEC §2.4: [CLS]-first ids, unimodal text encoder,
no temperature), the index of the best image by ITM probability, and the checkpoint used.

DIR is read by `contextblip_jax.storage.param_dir.load_param_dir`: a converted BLIP directory,
any training stage's workdir or its export/. The model is `ContextBlip(model.json)` and the
scores come from its methods (`encode_image`, `adapt`, `multimodal`, `itm_logits`,
`itc_image_features`, `itc_text_features`), so with a vision adapter ITM runs on the adapted
image tokens (as ContextBLIP's zero-shot evaluation does, SPEC §7.2) while ITC keeps the plain
BLIP image tokens; other groups of a stage's export (TMIM, fine-tuning heads) are not used.
Text goes through `pre_caption_imagecode` (disable with --no-pre-caption) and the directory's
vocabulary at T = 30 (--max-length). Images are resized to the model's image size.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contextblip_jax.data import preprocess
from contextblip_jax.data.tokenizer import DEFAULT_MAX_LENGTH, BlipTokenizer, pre_caption_imagecode
from contextblip_jax.models.contextblip import ContextBlip, ContextBlipConfig, stage_param_names
from contextblip_jax.storage.param_dir import ParamDir, describe, load_param_dir


def _scores(model: ContextBlip, pixels, input_ids, attention_mask) -> dict[str, jax.Array]:
  """`model.apply(..., method=_scores)`: pixels [N,S,S,3], one text ids/mask [1,T] -> scores."""
  vision = model.encode_image(pixels)                                  # [N, 1+P, D] + taps
  itm_embeds = model.adapt(vision)                                     # adapter (or identity)
  n, t = pixels.shape[0], input_ids.shape[1]
  ids = jnp.broadcast_to(input_ids, (n, t))
  mask = jnp.broadcast_to(attention_mask, (n, t))
  states = model.multimodal(ids, mask, itm_embeds).last_hidden_state  # [ENC] first
  logits = model.itm_logits(states)                                    # [N, 2]
  image_feat = model.itc_image_features(vision.last_hidden_state)      # [N, E]
  text_feat = model.itc_text_features(input_ids, attention_mask)       # [1, E]
  return {"itm_logits": logits, "itm_prob": jax.nn.softmax(logits, axis=-1)[:, 1],
          "itc_sim": image_feat @ text_feat[0]}


@functools.lru_cache(maxsize=8)
def make_score_fn(config: ContextBlipConfig):
  """Returns jitted `score(params, pixels [N,S,S,3], ids [1,T], mask [1,T]) -> dict`.

  params = {"pretrained_blip": ..., ["vision_adapter": ...]}. The one text is tiled over the N
  images (SPEC §10 item 22). Outputs: itm_logits [N, 2], itm_prob [N], itc_sim [N] (float32).
  Cached, so every Scorer of the same architecture in a process shares one compilation.
  """
  model = ContextBlip(config)

  def score(params, pixels, input_ids, attention_mask):
    return model.apply({"params": params}, pixels, input_ids, attention_mask, method=_scores)

  return jax.jit(score)


class Scorer:
  """A loaded parameter directory plus its tokenizer and compiled scoring function."""

  def __init__(self, loaded: ParamDir, max_length: int = DEFAULT_MAX_LENGTH,
               pre_caption: bool = True, batch_size: int = 10, checkpoint_dir: str = ""):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.loaded = loaded
    self.checkpoint_dir = checkpoint_dir or loaded.path
    self.model = loaded.model
    self.config = loaded.model.blip
    self.image_size = self.config.vision.image_size
    self.max_length = max_length
    self.pre_caption = pre_caption
    self.batch_size = batch_size
    names = stage_param_names(self.model, "zero_shot")   # pretrained_blip [, vision_adapter]
    missing = [k for k in names if k not in loaded.params]
    if missing:
      raise ValueError(f"{loaded.path}: no {', '.join(missing)} parameters to score with")
    self.tokenizer = BlipTokenizer(loaded.vocab_path)
    self.params = jax.device_put({k: loaded.params[k] for k in names})
    self._score = make_score_fn(self.model)

  def encode_text(self, text: str) -> tuple[str, np.ndarray, np.ndarray]:
    """-> (cleaned caption, input_ids int32 [1, T], attention_mask int32 [1, T])."""
    caption = pre_caption_imagecode(text) if self.pre_caption else text
    enc = self.tokenizer([caption], max_length=self.max_length)
    return caption, enc["input_ids"], enc["attention_mask"]

  def score_pixels(self, pixels: np.ndarray, text: str) -> dict[str, np.ndarray]:
    """pixels float32 [N, S, S, 3] (normalised) -> itm_logits [N,2], itm_prob [N], itc_sim [N].

    Images run in batches of `batch_size`; the last batch is padded by repetition so that
    one compiled shape serves every call.
    """
    _, ids, mask = self.encode_text(text)
    n = pixels.shape[0]
    if n == 0:
      raise ValueError("no images to score")
    bs = min(self.batch_size, n)
    outs = []
    for start in range(0, n, bs):
      batch = pixels[start:start + bs]
      real = batch.shape[0]
      if real < bs:
        batch = np.concatenate([batch, np.repeat(batch[-1:], bs - real, axis=0)])
      out = jax.device_get(self._score(self.params, batch, ids, mask))
      outs.append({k: v[:real] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  @classmethod
  def from_dir(cls, ckpt_dir: str, **kw) -> "Scorer":
    """Loads a parameter directory or a stage workdir (`load_param_dir`)."""
    return cls(load_param_dir(ckpt_dir), checkpoint_dir=os.path.abspath(ckpt_dir), **kw)

  def score_files(self, paths: Sequence[str], text: str) -> dict[str, Any]:
    """Loads, scores and reports (as the JSON-ready dict the CLI prints)."""
    pixels = preprocess.load_images(paths, self.image_size)
    caption, ids, mask = self.encode_text(text)
    res = self.score_pixels(pixels, text)
    best = int(np.argmax(res["itm_prob"]))
    n_tok = int(mask[0].sum())
    m = self.model
    return {
        "checkpoint": self.checkpoint_dir,
        "parameters": self.loaded.path,
        "source": describe(self.loaded.provenance),
        "provenance": self.loaded.provenance,
        "image_size": self.image_size,
        "model": {"patch_size": self.config.vision.patch_size,
                  "vision_width": self.config.vision.width,
                  "vision_depth": self.config.vision.depth,
                  "text_width": self.config.text.hidden_size,
                  "text_layers": self.config.text.num_layers,
                  "embed_dim": self.config.embed_dim},
        "vision_adapter": ({"taps": list(m.adapter_taps), "reduction": m.adapter_reduction}
                           if m.use_adapter else None),
        "text": text,
        "caption": caption,
        "input_ids": [int(i) for i in ids[0, :n_tok]],
        "images": [{"path": p, "itm_prob": float(res["itm_prob"][i]),
                    "itm_logits": [float(x) for x in res["itm_logits"][i]],
                    "itc_sim": float(res["itc_sim"][i])} for i, p in enumerate(paths)],
        "best_index": best,
        "best_image": paths[best],
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m contextblip_jax.score",
      description="ITM probability and ITC similarity of one text against images.")
  p.add_argument("--checkpoint", required=True,
                 help="parameter directory (converted BLIP, or a stage's export/) or a stage "
                      "workdir")
  p.add_argument("--text", required=True, help="the description to score")
  p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                 help="token length T incl. [CLS]/[SEP] (default %(default)s)")
  p.add_argument("--no-pre-caption", action="store_true",
                 help="tokenise the text as given instead of IMAGECODE's pre_caption")
  p.add_argument("--batch-size", type=int, default=10, help="images per forward pass")
  p.add_argument("images", nargs="+", help="image files")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 1 bad input) and prints JSON to stdout."""
  args = _parse_args(argv)
  try:
    for path in args.images:          # fail fast, before loading the parameters
      if not os.path.isfile(path):
        raise preprocess.ImageLoadError(path, "no such file" if not os.path.exists(path)
                                        else "not a regular file")
    if args.max_length < 3:
      raise ValueError(f"--max-length must be >= 3, got {args.max_length}")
    scorer = Scorer.from_dir(args.checkpoint, max_length=args.max_length,
                             pre_caption=not args.no_pre_caption, batch_size=args.batch_size)
    report = scorer.score_files(list(args.images), args.text)
  except (preprocess.ImageLoadError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
