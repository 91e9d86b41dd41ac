"""Score one or several descriptions against a few images with any parameter directory.

  python -m contextblip_jax.score --checkpoint DIR --text "a dog on a beach" img0.jpg img1.jpg
  python -m contextblip_jax.score --checkpoint DIR --text "a dog" --text "two dogs" img*.jpg

prints JSON: per image the ITM match probability (softmax index 1, [ENC] at position 0,
docs/method.md#itm-and-itc) and the ITC cosine similarity ([CLS]-first ids, unimodal text encoder,
no temperature), the index of the best image by ITM probability, and the checkpoint used.
With several --text the per-description results (text, caption, input_ids, images,
best_index, best_image) are listed under "descriptions", in the order given. The images go
through the vision tower once, and the image-side cross-attention keys/values once, for all
descriptions (`ContextBlip.candidate_cross_kv` + `cached_candidate_states`, the evaluation
loop's path): each further description costs only its text pass.

DIR is read by `contextblip_jax.storage.param_dir.load_param_dir`: a converted BLIP directory,
any training stage's workdir or its export/. The model is `ContextBlip(model.json)` and the
scores come from its methods (`encode_image`, `adapt`, `multimodal`, `itm_logits`,
`itc_image_features`, `itc_text_features`), so with a vision adapter ITM runs on the adapted
image tokens (as ContextBLIP's zero-shot evaluation does, docs/method.md#zero-shot) while ITC keeps the plain
BLIP image tokens; other groups of a stage's export (TMIM, fine-tuning heads) are not used.
Text goes through `pre_caption_imagecode` (disable with --no-pre-caption) and the directory's
vocabulary at T = 30 (--max-length). Images are resized to the model's image size.
`--dtype bfloat16` computes in bfloat16 and `--attention-impl cudnn` uses cuDNN attention on
an NVIDIA GPU (the model from `models/contextblip.py: make_model`, as in every mode; the
parameters stay float32 and the scores come back float32).

Input checks: model.json must describe the parameters in params/ (every shape is checked
against the model it describes, naming the first mismatches; an invalid model.json names the
file); a description with no letter or digit after cleaning (empty, or punctuation only) is
refused rather than scored; 16-bit and float images are scaled to 8 bits, or refused when
their values are out of range (`data/preprocess.to_rgb`). Bad input: `error: ...` on stderr
and exit status 2 (the traceback with --verbose or CONTEXTBLIP_VERBOSE=1).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

from contextblip_jax.data import preprocess
from contextblip_jax.data.tokenizer import DEFAULT_MAX_LENGTH, BlipTokenizer, pre_caption_imagecode
from contextblip_jax.models.contextblip import (ContextBlip, ContextBlipConfig, init_params,
                                                make_model, stage_param_names)
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.storage import cli_errors, paths
from contextblip_jax.storage.checkpoints import silence_shutdown_noise
from contextblip_jax.storage.param_dir import ParamDir, describe, load_param_dir


def _scores(model: ContextBlip, pixels, input_ids, attention_mask) -> dict[str, jax.Array]:
  """`model.apply(..., method=_scores)`: pixels [N,S,S,3], D texts ids/mask [D,T] -> scores
  itm_logits [D, N, 2], itm_prob [D, N], itc_sim [D, N].

  The N images are scored as one candidate set: vision and the image-side cross-attention
  keys/values once (`candidate_cross_kv`), shared by the D descriptions."""
  vision = model.encode_image(pixels)                                  # [N, 1+P, D] + taps
  itm_embeds = model.adapt(vision)[None]                               # one set [1, N, 1+P, D]
  kv = model.candidate_cross_kv(itm_embeds)
  states = model.cached_candidate_states(kv, input_ids[None], attention_mask[None])[0]
  d, n, width = states.shape                                           # [ENC] states [D, N, Dt]
  logits = model.itm_logits(states.reshape(d * n, 1, width)).reshape(d, n, 2)
  image_feat = model.itc_image_features(vision.last_hidden_state)      # [N, E]
  text_feat = model.itc_text_features(input_ids, attention_mask)       # [D, E]
  return {"itm_logits": logits, "itm_prob": jax.nn.softmax(logits, axis=-1)[..., 1],
          "itc_sim": text_feat @ image_feat.T}


@functools.lru_cache(maxsize=8)
def make_score_fn(config: ContextBlipConfig, compute_dtype: str = "float32",
                  attention_impl: str = "explicit"):
  """Returns jitted `score(params, pixels [N,S,S,3], ids [D,T], mask [D,T]) -> dict`.

  params = {"pretrained_blip": ..., ["vision_adapter": ...]}. Each text is scored against the
  N images (docs/decisions.md item 22). Outputs: itm_logits [D, N, 2], itm_prob [D, N], itc_sim [D, N]
  (float32 whatever `compute_dtype` is; the model from `make_model`, as every mode builds it).
  Cached, so every Scorer of the same architecture in a process shares one compilation.
  """
  model = make_model(config, compute_dtype, attention_impl)

  def score(params, pixels, input_ids, attention_mask):
    return model.apply({"params": params}, pixels, input_ids, attention_mask, method=_scores)

  return jax.jit(score)


def check_shapes(model: ContextBlipConfig, params: dict[str, Any], where: str) -> None:
  """Raises ValueError when `params` (groups of the zero-shot tree) do not have the paths
  and shapes of the model `model` describes (an edited model.json), naming the first ones."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  want = jax.eval_shape(lambda r: nn.unbox(init_params(ContextBlip(model), r, "zero_shot")),
                        jax.random.PRNGKey(0))
  want = traverse_util.flatten_dict({k: v for k, v in want.items() if k in params}, sep="/")
  have = traverse_util.flatten_dict(params, sep="/")
  problems = [f"{k}: missing" for k in sorted(set(want) - set(have))]
  problems += [f"{k}: not in the model" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: shape {list(np.shape(have[k]))}, the model needs {list(want[k].shape)}"
               for k in sorted(set(want) & set(have)) if tuple(np.shape(have[k])) != want[k].shape]
  if problems:
    raise ValueError(f"{where}: model.json does not describe the parameters in params/ "
                     f"({len(problems)} differences; was it edited?): " + "; ".join(problems[:4])
                     + (" ..." if len(problems) > 4 else ""))


class Scorer:
  """A loaded parameter directory plus its tokenizer and compiled scoring function."""

  def __init__(self, loaded: ParamDir, max_length: int = DEFAULT_MAX_LENGTH,
               pre_caption: bool = True, batch_size: int = 10, checkpoint_dir: str = "",
               dtype: str = "float32", attention_impl: str = "explicit"):
    """`dtype`: compute dtype 'float32' | 'bfloat16'; `attention_impl`: 'explicit' | 'xla' |
    'cudnn' (models/contextblip.py make_model; the parameters stay float32)."""
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
    check_shapes(self.model, {k: loaded.params[k] for k in names}, loaded.path)
    self.tokenizer = BlipTokenizer(loaded.vocab_path)
    params = {k: loaded.params[k] for k in names}
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # leaf by leaf, freeing each host leaf (peak: one copy of the weights, not two)
    self.params = shd.device_put_in_place(params, jax.tree.map(lambda _: one_device, params))
    self._score = make_score_fn(self.model, dtype, attention_impl)

  def encode_text(self, text: str) -> tuple[str, np.ndarray, np.ndarray]:
    """-> (cleaned caption, input_ids int32 [1, T], attention_mask int32 [1, T])."""
    caption = pre_caption_imagecode(text) if self.pre_caption else text
    if not any(ch.isalnum() for ch in caption):
      raise ValueError(f"the description {text!r} has no word to score (empty or punctuation "
                       f"only{'' if caption == text else f' after cleaning: {caption!r}'})")
    enc = self.tokenizer([caption], max_length=self.max_length)
    return caption, enc["input_ids"], enc["attention_mask"]

  def encode_texts(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> (cleaned captions, input_ids int32 [D, T], attention_mask int32 [D, T])."""
    encoded = [self.encode_text(t) for t in texts]
    return ([c for c, _, _ in encoded], np.concatenate([i for _, i, _ in encoded]),
            np.concatenate([m for _, _, m in encoded]))

  def score_pixels(self, pixels: np.ndarray, text: str | Sequence[str]
                   ) -> dict[str, np.ndarray]:
    """pixels float32 [N, S, S, 3] (normalised) -> itm_logits [N,2], itm_prob [N], itc_sim [N]
    for one text (a str); [D, N, 2], [D, N], [D, N] for a list of D texts.

    Images run in batches of `batch_size`, each batch's vision and cross-attention keys/values
    shared by all the texts; the last batch is padded by repetition so that one compiled shape
    serves every call (per number of texts).
    """
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not texts:
      raise ValueError("no description to score")
    _, ids, mask = self.encode_texts(texts)
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
      outs.append({k: v[:, :real] for k, v in out.items()})
    res = {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}
    return {k: v[0] for k, v in res.items()} if single else res

  @classmethod
  def from_dir(cls, ckpt_dir: str, **kw) -> "Scorer":
    """Loads a parameter directory or a stage workdir (`load_param_dir`)."""
    return cls(load_param_dir(ckpt_dir), checkpoint_dir=paths.abspath(ckpt_dir), **kw)

  def score_files(self, paths: Sequence[str], text: str | Sequence[str]) -> dict[str, Any]:
    """Loads, scores and reports (as the JSON-ready dict the CLI prints). One text (a str, or
    a list of one): its results at the top level; several: under "descriptions"."""
    texts = [text] if isinstance(text, str) else list(text)
    pixels = preprocess.load_images(paths, self.image_size)
    captions, ids, mask = self.encode_texts(texts)
    res = self.score_pixels(pixels, texts)                     # [D, N]
    m = self.model
    report = {
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
    }
    per_text = []
    for j, t in enumerate(texts):
      best = int(np.argmax(res["itm_prob"][j]))
      n_tok = int(mask[j].sum())
      per_text.append({
          "text": t,
          "caption": captions[j],
          "input_ids": [int(i) for i in ids[j, :n_tok]],
          "images": [{"path": p, "itm_prob": float(res["itm_prob"][j, i]),
                      "itm_logits": [float(x) for x in res["itm_logits"][j, i]],
                      "itc_sim": float(res["itc_sim"][j, i])} for i, p in enumerate(paths)],
          "best_index": best,
          "best_image": paths[best],
      })
    if len(per_text) == 1:
      report.update(per_text[0])
    else:
      report["descriptions"] = per_text
    return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m contextblip_jax.score",
      description="ITM probability and ITC similarity of descriptions against images.")
  p.add_argument("--checkpoint", required=True,
                 help="parameter directory (converted BLIP, or a stage's export/) or a stage "
                      "workdir")
  p.add_argument("--text", required=True, action="append",
                 help="a description to score; repeat for several (the images' vision and "
                      "cross-attention keys/values are computed once for all)")
  p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                 help="token length T incl. [CLS]/[SEP] (default %(default)s)")
  p.add_argument("--no-pre-caption", action="store_true",
                 help="tokenise the text as given instead of IMAGECODE's pre_caption")
  p.add_argument("--batch-size", type=int, default=10, help="images per forward pass")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (parameters stay float32; default %(default)s)")
  p.add_argument("--attention-impl", default="explicit", choices=("explicit", "xla", "cudnn"),
                 help="attention: explicit float32 softmax, or jax.nn.dot_product_attention "
                      "with 'xla' or 'cudnn' (NVIDIA GPU with --dtype bfloat16; default "
                      "%(default)s)")
  p.add_argument("--verbose", action="store_true", help="print the traceback on an error")
  p.add_argument("images", nargs="+", help="image files")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 2 bad input) and prints JSON to stdout."""
  args = _parse_args(argv)
  silence_shutdown_noise()
  try:
    for path in args.images:          # fail fast, before loading the parameters
      if not os.path.isfile(path):
        raise preprocess.ImageLoadError(path, "no such file" if not os.path.exists(path)
                                        else "not a regular file")
    if args.max_length < 3:
      raise ValueError(f"--max-length must be >= 3, got {args.max_length}")
    scorer = Scorer.from_dir(args.checkpoint, max_length=args.max_length,
                             pre_caption=not args.no_pre_caption, batch_size=args.batch_size,
                             dtype=args.dtype, attention_impl=args.attention_impl)
    report = scorer.score_files(list(args.images), list(args.text))
  except (preprocess.ImageLoadError, OSError, ValueError) as e:
    return cli_errors.report(e, verbose=args.verbose)
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
