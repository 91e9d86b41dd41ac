"""Optimizers and learning-rate schedules (docs/method.md#optimizers;
docs/decisions.md items 17-18).

Three kinds, chosen by `config.kind`:

* `pretrain`: decoupled AdamW (`optax.adamw`; lr 3e-4, wd 0.05 on every trainable
  leaf, betas (0.9, 0.999), eps 1e-8) with the reference's per-epoch schedule:
    epoch 0, iteration i:  lr = min(lr0, warmup_lr + (lr0 - warmup_lr) * i / warmup_steps)
    epoch e >= 1:          lr = max(min_lr, lr0 * decay**e)
  The warm-up (3000 steps) is cut at the end of epoch 0, so the lr jumps at epoch 1 (item 18).
* `finetune` (item 17): torch `Adam` with *coupled* L2 weight decay,
  `chain(add_decayed_weights(0.2), scale_by_adam(0.9, 0.98, 1e-6), scale_by_learning_rate(s))`,
  with parameter groups (regex -> group name, first match wins) of different lrs through
  `optax.multi_transform`; each group's lr is `lr_g * 0.95**epoch`, stepped per epoch.
* `adamw_cosine`: generic AdamW with linear warm-up and cosine decay (BLIP-from-scratch demo).

`make_optimizer(config, steps_per_epoch)` returns an `Optimizer(tx, schedules)`; `schedules`
maps a name to the lr schedule so the training step can log the current lrs. steps_per_epoch
is the input pipeline's: ceil(N / B) when fine-tuning keeps an epoch's partial last batch
(461 at 16,594 / 36, the reference's), floor(N / B) when it is dropped (pre-training).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

Schedule = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  tx: optax.GradientTransformation
  schedules: Mapping[str, Schedule]   # name -> lr schedule (for logging)


# ----------------------------------------------------------------------------- schedules

def pretrain_schedule(steps_per_epoch: int, lr: float = 3e-4, warmup_steps: int = 3000,
                      warmup_lr: float = 1e-6, decay: float = 0.9,
                      min_lr: float = 1e-6) -> Schedule:
  """Linear warm-up inside epoch 0 only, then max(min_lr, lr * decay**epoch)."""
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")

  def schedule(count):
    count = jnp.asarray(count, jnp.int32)
    epoch, i = count // steps_per_epoch, count % steps_per_epoch
    decayed = jnp.maximum(min_lr, lr * jnp.power(decay, epoch.astype(jnp.float32)))
    if warmup_steps <= 0:
      return decayed
    warm = jnp.minimum(lr, warmup_lr + (lr - warmup_lr) * i.astype(jnp.float32) / warmup_steps)
    return jnp.where(epoch == 0, warm, decayed)
  return schedule


def epoch_decay_schedule(lr: float, steps_per_epoch: int, decay: float = 0.95) -> Schedule:
  """`LambdaLR(lambda e: decay**e)` stepped once per epoch: lr * decay**(count // spe)."""
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")

  def schedule(count):
    epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
    return lr * jnp.power(decay, epoch.astype(jnp.float32))
  return schedule


def warmup_cosine_schedule(lr: float, total_steps: int, warmup_steps: int,
                           end_lr: float = 0.0) -> Schedule:
  """0 -> lr linearly over warmup_steps, then cosine to end_lr at total_steps."""
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1), end_lr)


# ----------------------------------------------------------------------------- transforms

def adamw(schedule: Schedule, weight_decay: float = 0.05, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8) -> optax.GradientTransformation:
  """torch.optim.AdamW: decoupled decay p -= lr * (adam(g) + wd * p) on every leaf."""
  return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def coupled_adam(schedule: Schedule, weight_decay: float = 0.2, b1: float = 0.9,
                 b2: float = 0.98, eps: float = 1e-6) -> optax.GradientTransformation:
  """torch.optim.Adam(weight_decay=wd): g += wd * p *before* the moments (coupled L2)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.scale_by_learning_rate(schedule))


def group_labels(params: Any, groups: Sequence[tuple[str, str]]) -> Any:
  """Tree of group names: the first `(regex, name)` whose regex fullmatches the '/'-path."""
  compiled = [(re.compile(p), name) for p, name in groups]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {}
  for path in flat:
    for regex, name in compiled:
      if regex.fullmatch(path):
        labels[path] = name
        break
    else:
      raise ValueError(f"parameter {path!r} matches no optimizer group; groups: {list(groups)}")
  return traverse_util.unflatten_dict(labels, sep="/")


def grouped(transforms: Mapping[str, optax.GradientTransformation],
            groups: Sequence[tuple[str, str]]) -> optax.GradientTransformation:
  """`optax.multi_transform` with labels from regex rules over the (trainable) tree."""
  names = {name for _, name in groups}
  missing = names - set(transforms)
  if missing:
    raise ValueError(f"optimizer groups {sorted(missing)} have no learning rate; "
                     f"defined: {sorted(transforms)}")
  return optax.multi_transform(dict(transforms), lambda p: group_labels(p, groups))


# ----------------------------------------------------------------------------- configs

def default_config(kind: str = "pretrain") -> ml_collections.ConfigDict:
  """The reference's defaults for one optimizer kind: 'pretrain', 'finetune_stage1', 'finetune_stage2',
  'adamw_cosine'."""
  c = ml_collections.ConfigDict()
  if kind == "pretrain":
    c.kind = "pretrain"
    c.lr = 3e-4             # peak / epoch-0 target lr
    c.warmup_steps = 3000   # linear warm-up length (cut at the end of epoch 0)
    c.warmup_lr = 1e-6      # lr at step 0
    c.decay = 0.9           # per-epoch multiplicative decay from epoch 1
    c.min_lr = 1e-6         # floor of the decayed lr
    c.weight_decay = 0.05   # decoupled (AdamW), on every trainable leaf
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8   # Adam moments / epsilon
  elif kind in ("finetune_stage1", "finetune_stage2"):
    c.kind = "finetune"
    # (regex over '/'-joined trainable paths, group name); first match wins.
    c.groups = ([("prediction_layer/.*", "head"), (".*", "blip")] if kind == "finetune_stage1"
                else [(".*", "context")])
    c.lrs = ({"head": 1e-4, "blip": 2e-6} if kind == "finetune_stage1"
             else {"context": 2e-6})   # base lr per group
    c.decay = 0.95          # lr_g * decay**epoch, stepped per epoch
    c.weight_decay = 0.2    # coupled L2 (torch Adam)
    c.b1, c.b2, c.eps = 0.9, 0.98, 1e-6
  elif kind == "adamw_cosine":
    c.kind = "adamw_cosine"
    c.lr = 1e-4             # peak lr
    c.warmup_steps = 100    # linear warm-up from 0
    c.total_steps = 10_000  # cosine decay horizon
    c.end_lr = 0.0          # lr at total_steps
    c.weight_decay = 0.05   # decoupled
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
  else:
    raise ValueError(f"unknown optimizer kind {kind!r}; known: pretrain, finetune_stage1, "
                     "finetune_stage2, adamw_cosine")
  return c


def make_optimizer(config: Mapping[str, Any], steps_per_epoch: int) -> Optimizer:
  """Builds the optimizer described by an optimizer config (see `default_config`)."""
  kind = config["kind"]
  if kind == "pretrain":
    s = pretrain_schedule(steps_per_epoch, config["lr"], config["warmup_steps"],
                          config["warmup_lr"], config["decay"], config["min_lr"])
    return Optimizer(adamw(s, config["weight_decay"], config["b1"], config["b2"], config["eps"]),
                     {"lr": s})
  if kind == "finetune":
    groups = [tuple(g) for g in config["groups"]]
    lrs = dict(config["lrs"])
    scheds = {n: epoch_decay_schedule(lr, steps_per_epoch, config["decay"])
              for n, lr in lrs.items()}
    txs = {n: coupled_adam(s, config["weight_decay"], config["b1"], config["b2"], config["eps"])
           for n, s in scheds.items()}
    return Optimizer(grouped(txs, groups), {f"lr_{n}": s for n, s in scheds.items()})
  if kind == "adamw_cosine":
    s = warmup_cosine_schedule(config["lr"], config["total_steps"], config["warmup_steps"],
                               config["end_lr"])
    return Optimizer(adamw(s, config["weight_decay"], config["b1"], config["b2"], config["eps"]),
                     {"lr": s})
  raise ValueError(f"unknown optimizer kind {kind!r}; known: pretrain, finetune, adamw_cosine")
