"""Per-stage loss functions of ContextBLIP (docs/method.md).

Every loss has the one signature the training machinery calls:

  loss, metrics = loss_fn(params, batch, rng, *, model, cfg, train)

  params   full unboxed ContextBlip parameter tree (or one stage's, `init_params(stage=...)`)
  batch    dict of arrays (formats below)
  rng      PRNG key; split inside by name (dropout of each forward, negatives, mask)
  model    a `ContextBlip` module (its `config` holds the method options)
  cfg      `ObjectiveConfig` (or None / a mapping of its fields)
  train    Python bool: dropout on; dropout of *frozen* modules too iff `cfg.frozen_dropout`
  metrics  dict of float32 scalars

Losses:
  backbone_loss         BLIP from scratch: ITC + ITM with hard negatives.
                        batch {"image" [B,S,S,3] f32, "input_ids" [B,T] i32 [CLS]-first,
                        "attention_mask" [B,T]}
  pretrain_loss         ContextBLIP pre-training: L_itm + L_tmim (reference order); same batch.
  finetune_stage1_loss  CE over the K candidates, SUM over the G examples.
  finetune_stage2_loss  inter-context encoder on frozen stage-1 features, SUM over G.
                        batch {"images" [G,K,S,S,3], "input_ids" [G,T], "attention_mask" [G,T],
                        "label" [G] i32, "is_video" [G] bool, optional "example_mask" [G]
                        bool: False on the rows padding an epoch's last, partial batch;
                        they add nothing to the loss, its gradients or the counts, so
                        the loss is the SUM over the real rows (the reference's partial
                        batch); absent = every row is real}
The fine-tuning losses read the candidates through `ContextBlip.encode_candidates` +
`candidate_states`; evaluation scores are the model's `candidate_scores` on the same
embeddings (called by evaluation/scoring.py), not a function of this module.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from contextblip_jax.training import losses
from contextblip_jax.training import masking
from contextblip_jax.models.blip import l2_normalize
from contextblip_jax.models.contextblip import ContextBlip
from contextblip_jax.models.mask_decoder import gather_tokens

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Options of the losses that are not part of the model."""
  frozen_dropout: bool = True   # dropout in frozen modules active when train (docs/decisions.md item 16)
  itc_temperature: float = 0.07  # backbone_loss: ITC temperature, also divides the sampling sims
  negatives_group_size: int | None = None  # hard negatives drawn within groups of this many
                                           # rows (the per-device batch); None = global batch
  mask_group_size: int | None = None  # rows sharing one TMIM text position ('reference'
                                      # token choice; per-device batch); None = global batch
  hard_negative_scale: float = 1.0  # backbone_loss: sampling sims x this (0 = uniform random
                                    # negatives, for a backbone trained from scratch)
  # TMIM masking (pretrain_loss; training/masking.py). M = masking.num_masked(pi, P).
  mask_ratio: float = masking.DEFAULT_MASK_RATIO  # pi; 0 = ITM-only pre-training
  mask_token_choice: str = "reference"  # 'reference' one t ~ U{0..T-1} shared by the batch |
                                        # 'valid_mean' mean over valid non-special tokens |
                                        # 'per_example' one valid non-special t per example
  random_mask: bool = False     # uniform random mask instead of the attention top-M
  mask_noise: float = 0.02      # U(0, mask_noise) added to the normalised scores

  def __post_init__(self):
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"objective mask_ratio must be in [0, 1), got {self.mask_ratio}")
    if self.mask_token_choice not in masking.TOKEN_CHOICES:
      raise ValueError(f"objective mask_token_choice {self.mask_token_choice!r} not in "
                       f"{masking.TOKEN_CHOICES}")


def as_objective_config(cfg: Any) -> ObjectiveConfig:
  """None -> defaults; ObjectiveConfig -> itself; a mapping (dict/ConfigDict) of its fields."""
  if cfg is None:
    return ObjectiveConfig()
  if isinstance(cfg, ObjectiveConfig):
    return cfg
  if isinstance(cfg, Mapping) or hasattr(cfg, "to_dict"):
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    known = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    if set(d) - known:
      raise ValueError(f"unknown objective options {sorted(set(d) - known)}; known {sorted(known)}")
    return ObjectiveConfig(**d)
  raise TypeError(f"cfg must be None, ObjectiveConfig or a mapping, got {type(cfg).__name__}")


def fold(rng: jax.Array, name: str) -> jax.Array:
  """A named sub-key: fold_in(rng, crc32(name))."""
  return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _apply(model: ContextBlip, params, method: Callable, *args, rng=None, **kw):
  rngs = None if rng is None else {"dropout": rng}
  return model.apply({"params": params}, *args, method=method, rngs=rngs, **kw)


def _check_batch(batch: Mapping[str, Any], keys: tuple[str, ...], fn: str):
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"{fn}: batch lacks {missing}; has {sorted(batch)}")


# ------------------------------------------------------------------ ITM with hard negatives
def itm_with_hard_negatives(params, model, input_ids, attention_mask, image_embeds, sim_i2t,
                            key, *, group_size=None, deterministic=True, rng=None,
                            return_cross_attentions=False):
  """Positive, negative-image and negative-text ITM forwards (docs/method.md#hard-negatives).

  sim_i2t [B, B] (image rows, text columns) gives the sampling weights (softmax per row, no
  further temperature). Returns (logits [3B, 2] in pos / neg-image / neg-text order, positive
  TextOutput with its cross-attentions when asked).
  """
  pos = _apply(model, params, ContextBlip.multimodal, input_ids, attention_mask, image_embeds,
               deterministic, return_cross_attentions, rng=None if rng is None
               else fold(rng, "itm_pos"))
  neg_img = losses.sample_hard_negatives(fold(key, "t2i"), sim_i2t.T, group_size)   # per text
  neg_txt = losses.sample_hard_negatives(fold(key, "i2t"), sim_i2t, group_size)     # per image
  ids_all = jnp.concatenate([input_ids, input_ids[neg_txt]], axis=0)            # [2B, T]
  mask_all = jnp.concatenate([attention_mask, attention_mask[neg_txt]], axis=0)
  embeds_all = jnp.concatenate([image_embeds[neg_img], image_embeds], axis=0)   # [2B, N, D]
  neg = _apply(model, params, ContextBlip.multimodal, ids_all, mask_all, embeds_all,
               deterministic, rng=None if rng is None else fold(rng, "itm_neg"))
  states = jnp.concatenate([pos.last_hidden_state[:, :1], neg.last_hidden_state[:, :1]], 0)
  return _apply(model, params, ContextBlip.itm_logits, states), pos


def _itm_metrics(logits) -> Metrics:
  return {"itm_accuracy": losses.accuracy(logits, losses.itm_labels(logits.shape[0] // 3))}


# ------------------------------------------------------------------ (a) BLIP backbone
def backbone_loss(params, batch, rng, *, model: ContextBlip, cfg=None, train: bool = True):
  """BLIP-style training of the backbone: L = L_itc + L_itm (hard negatives from ITC / temp).

  Everything trains (no stop_gradient except on the sampling weights); the adapter is not used.
  """
  cfg = as_objective_config(cfg)
  _check_batch(batch, ("image", "input_ids", "attention_mask"), "backbone_loss")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  det, drop = not train, fold(rng, "dropout")
  embeds = _apply(model, params, ContextBlip.encode_image, batch["image"]).last_hidden_state
  image_feat = _apply(model, params, ContextBlip.itc_image_features, embeds)
  text_feat = _apply(model, params, ContextBlip.itc_text_features, ids, mask, det,
                     rng=fold(drop, "itc_text"))
  l_itc, sim = losses.itc_loss(image_feat, text_feat, cfg.itc_temperature)
  logits, _ = itm_with_hard_negatives(params, model, ids, mask, embeds,
                                      sim * cfg.hard_negative_scale, fold(rng, "negatives"),
                                      group_size=cfg.negatives_group_size, deterministic=det,
                                      rng=drop)
  l_itm = losses.itm_loss(logits)
  loss = l_itc + l_itm
  return loss, {"loss": loss, "itc_loss": l_itc, "itm_loss": l_itm, **_itm_metrics(logits)}


# ------------------------------------------------------------------ (b) ContextBLIP pre-training
def pretrain_loss(params, batch, rng, *, model: ContextBlip, cfg=None, train: bool = True):
  """L = L_itm + L_tmim in the reference order (docs/method.md#pre-training); cfg.mask_ratio 0 gives ITM only.

  The frozen ViT passes and the ITC sampling features are computed under stop_gradient (the
  reference's no_grad); the gradient reaches the adapter through the frozen text encoder.
  """
  cfg, c = as_objective_config(cfg), model.config
  _check_batch(batch, ("image", "input_ids", "attention_mask"), "pretrain_loss")
  pixels, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
  frozen_det = not (train and cfg.frozen_dropout)
  drop = fold(rng, "dropout")
  # 1. frozen ViT with taps, frozen ITC features (no temperature).
  vision = jax.lax.stop_gradient(_apply(model, params, ContextBlip.encode_image, pixels))
  image_feat = _apply(model, params, ContextBlip.itc_image_features, vision.last_hidden_state)
  text_feat = _apply(model, params, ContextBlip.itc_text_features, ids, mask, frozen_det,
                     rng=fold(drop, "itc_text"))
  sim_i2t = jax.lax.stop_gradient(image_feat @ text_feat.T)                 # [B, B]
  # 2. adapter.  3-4. positive ITM (with attentions), negatives, L_itm.
  embeds = _apply(model, params, ContextBlip.adapt, vision)
  logits, pos = itm_with_hard_negatives(
      params, model, ids, mask, embeds, sim_i2t, fold(rng, "negatives"),
      group_size=cfg.negatives_group_size, deterministic=frozen_det, rng=drop,
      return_cross_attentions=True)
  l_itm = losses.itm_loss(logits)
  metrics = {"itm_loss": l_itm, **_itm_metrics(logits)}
  loss = l_itm
  if masking.num_masked(cfg.mask_ratio, c.num_patches) > 0:
    if not c.use_tmim:
      raise ValueError(f"objective mask_ratio {cfg.mask_ratio} needs the TMIM modules, but the "
                       "model config has use_tmim=False")
    # 5. mask from the attentions.  6. visible-only ViT pass, adapter, decoder, L_tmim.
    masked_idx, visible_idx = masking.select_masked_patches(
        pos.cross_attentions, mask, fold(rng, "mask"), mask_ratio=cfg.mask_ratio,
        token_choice=cfg.mask_token_choice, random_mask=cfg.random_mask, noise=cfg.mask_noise,
        group_size=cfg.mask_group_size)
    visible = jax.lax.stop_gradient(
        _apply(model, params, ContextBlip.encode_visible, pixels, visible_idx))
    enc = _apply(model, params, ContextBlip.adapt, visible)
    pred = _apply(model, params, ContextBlip.reconstruct, enc, pos.last_hidden_state, mask,
                  visible_idx, masked_idx, not train, rng=fold(drop, "decoder"))
    target = gather_tokens(_apply(model, params, ContextBlip.patchify, pixels), masked_idx)
    l_tmim = losses.mse_loss(pred, target)
    metrics["tmim_loss"] = l_tmim
    loss = loss + l_tmim
  metrics["loss"] = loss
  return loss, metrics


# ------------------------------------------------------------------ (c) fine-tuning
_FINETUNE_KEYS = ("images", "input_ids", "attention_mask", "label", "is_video")
EXAMPLE_MASK = "example_mask"   # optional batch key (data/pipeline.py EXAMPLE_MASK)


def _candidate_features(params, batch, *, model, deterministic, rng):
  """L2-normalised [ENC] features [G, K, Dt] of the adapted multimodal forward (docs/method.md#stage-1)."""
  embeds = _apply(model, params, ContextBlip.encode_candidates, batch["images"])  # [G,K,N,D]
  enc = _apply(model, params, ContextBlip.candidate_states, embeds, batch["input_ids"],
               batch["attention_mask"], deterministic, rng=rng)             # [G, K, Dt]
  return l2_normalize(enc)


def _candidate_loss(logits, labels, example_mask=None):
  """SUM of the per-example CE over the real rows (`example_mask`; None = all rows), and the
  metrics over those rows: loss_mean = loss / count, accuracy = correct / count."""
  per_example = losses.candidate_cross_entropy(logits, labels)            # [G]
  hits = losses.correct(logits, labels)
  if example_mask is None:
    real, count = jnp.ones(labels.shape, bool), jnp.float32(labels.shape[0])
  else:
    real = jnp.asarray(example_mask).astype(bool)
    count = jnp.sum(real.astype(jnp.float32))
  loss = jnp.sum(jnp.where(real, per_example, 0.0))    # padding rows: no value, no gradient
  correct = jnp.sum(jnp.where(real, hits, 0.0))
  denom = jnp.maximum(count, 1.0)
  return loss, {"loss": loss, "loss_mean": loss / denom, "accuracy": correct / denom,
                "correct": correct, "num_examples": count}


def finetune_stage1_loss(params, batch, rng, *, model: ContextBlip, cfg=None,
                         train: bool = True):
  """Stage 1: prediction_layer on the features -> CE over K; everything trains."""
  as_objective_config(cfg)
  _check_batch(batch, _FINETUNE_KEYS, "finetune_stage1_loss")
  feat = _candidate_features(params, batch, model=model, deterministic=not train,
                             rng=fold(rng, "dropout"))
  logits = _apply(model, params, ContextBlip.stage1_logits, feat)
  return _candidate_loss(logits, batch["label"], batch.get(EXAMPLE_MASK))


def finetune_stage2_loss(params, batch, rng, *, model: ContextBlip, cfg=None,
                         train: bool = True):
  """Stage 2: frozen stage-1 features (stop_gradient; dropout on iff train and
  frozen_dropout) + positions * is_video -> context encoder -> + feat -> stage-1 head."""
  cfg = as_objective_config(cfg)
  _check_batch(batch, _FINETUNE_KEYS, "finetune_stage2_loss")
  drop = fold(rng, "dropout")
  feat = jax.lax.stop_gradient(_candidate_features(
      params, batch, model=model, deterministic=not (train and cfg.frozen_dropout),
      rng=fold(drop, "stage1")))
  logits = _apply(model, params, ContextBlip.stage2_logits, feat, batch["is_video"],
                  not train, rng=fold(drop, "context"))
  return _candidate_loss(logits, batch["label"], batch.get(EXAMPLE_MASK))


LOSSES = {
    "backbone": backbone_loss,
    "pretrain": pretrain_loss,
    "finetune_stage1": finetune_stage1_loss,
    "finetune_stage2": finetune_stage2_loss,
}
