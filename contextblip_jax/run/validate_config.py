"""Checks a whole run config before any work: `validate(cfg)` raises one `ConfigError` that
names every bad key (with its value and what it must be), so a run never trains on nonsense
(a negative step count, a NaN learning rate, no checkpoints kept) and never dies later with a
bare ZeroDivisionError.

Checked: the mode; the platform (auto | cpu | gpu | tpu); train counts (batch_size,
num_epochs / num_steps, accum_steps dividing the batch, log_every, save_every,
keep_checkpoints >= 1, eval_every_epochs); the booleans train.validate_last_epoch,
data.drop_remainder (True for backbone / pretrain) and freeze_unreached; every optimizer
learning rate (finite and > 0) and the other optimizer numbers (finite, in range); data
(on_error, max_length, reader threads, min_scale, augmentation); eval (head, split,
sets_per_batch, max_sets, visualize); the objective's numbers and choices; the freeze rules;
the mesh (-1 or >= 1 per axis) and that the training batch divides over the data-parallel
devices of the mesh; the W&B block (wandb.mode, the strings and tags, and with
wandb.enabled=True that wandb is installed, found without importing it). The demo config is
checked stage by stage (keys named `stages.<stage>.<key>`). Called first by `run/cli.py` and by
`run/train.train_and_evaluate`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from contextblip_jax.parallel import accelerator
from contextblip_jax.storage import wandb_writer
from contextblip_jax.training import masking

MODES = ("backbone", "pretrain", "finetune1", "finetune2", "evaluate", "predict", "demo")
TRAIN_MODES = MODES[:4]
HEADS = ("zero_shot", "stage1", "stage2")
SPLITS = ("train", "valid", "test")
ON_ERROR = ("raise", "skip")
AUGMENTATIONS = ("0", "1", "2", "3", "none")


class ConfigError(ValueError):
  """The config has bad values; the message names every bad key."""


class _Problems:
  def __init__(self, prefix: str = ""):
    self.prefix, self.items = prefix, []

  def add(self, key: str, value: Any, need: str) -> None:
    self.items.append(f"{self.prefix}{key}={value!r}: {need}")


def _num(x: Any) -> float | None:
  if isinstance(x, bool):
    return None
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def _int_at_least(p: _Problems, c, key: str, low: int) -> None:
  v = _get(c, key)
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    p.add(key, v, f"must be an integer >= {low}")


def _get(c, dotted: str) -> Any:
  for part in dotted.split("."):
    c = c.get(part) if hasattr(c, "get") else None
  return c


def _positive_finite(p: _Problems, key: str, v: Any, allow_zero: bool = False) -> None:
  f = _num(v)
  if f is None or not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
    p.add(key, v, "must be a finite number " + (">= 0" if allow_zero else "> 0"))


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError naming every bad key of `cfg` (any mode, the demo's stages too).

  `num_devices` (default: the devices the run would use) sizes the mesh for the
  divisibility checks.
  """
  problems = _collect(cfg, "", num_devices)
  if problems:
    raise ConfigError("invalid config (" + str(len(problems)) + " problem"
                      + ("s" if len(problems) > 1 else "") + "):\n  " + "\n  ".join(problems))


def _collect(cfg, prefix: str, num_devices: int | None) -> list[str]:
  p = _Problems(prefix)
  mode = cfg.get("mode")
  if mode not in MODES:
    p.add("mode", mode, f"must be one of {', '.join(MODES)}")
    return p.items
  if cfg.get("platform", "auto") not in accelerator.PLATFORMS:
    p.add("platform", cfg.get("platform"), f"must be one of {', '.join(accelerator.PLATFORMS)}")
  if mode == "demo":
    for name, stage in (cfg.get("stages") or {}).items():
      p.items += _collect(stage, f"{prefix}stages.{name}.", num_devices)
    return p.items
  if mode in TRAIN_MODES:
    _train(p, cfg)
    _optim(p, cfg.get("optim") or {})
  _data(p, cfg.data)
  _eval(p, cfg.eval)
  _objective(p, cfg.get("objective") or {})
  _freeze(p, cfg.get("freeze") or [])
  _mesh(p, cfg, mode, num_devices)
  _wandb(p, cfg.get("wandb"))
  return p.items


def _train(p: _Problems, cfg) -> None:
  t = cfg.train
  _int_at_least(p, cfg, "train.batch_size", 1)
  _int_at_least(p, cfg, "train.num_steps", 0)
  if t.num_steps == 0:
    _int_at_least(p, cfg, "train.num_epochs", 1)
  _int_at_least(p, cfg, "train.accum_steps", 1)
  _int_at_least(p, cfg, "train.log_every", 1)
  _int_at_least(p, cfg, "train.save_every", 1)
  _int_at_least(p, cfg, "train.keep_checkpoints", 1)
  _int_at_least(p, cfg, "train.eval_every_epochs", 0)
  b, a = t.batch_size, t.accum_steps
  if isinstance(b, int) and isinstance(a, int) and b >= 1 and a >= 1 and b % a:
    p.add("train.batch_size", b, f"must be divisible by train.accum_steps={a}")
  for key in ("train.validate_last_epoch", "data.drop_remainder", "freeze_unreached"):
    if _get(cfg, key) is not None and not isinstance(_get(cfg, key), bool):
      p.add(key, _get(cfg, key), "must be True or False")
  if cfg.mode in ("backbone", "pretrain") and _get(cfg, "data.drop_remainder") is False:
    p.add("data.drop_remainder", False, f"must be True for mode {cfg.mode!r} (its losses pair "
          "the rows of a batch: in-batch hard negatives; only fine-tuning keeps a partial batch)")


def _optim(p: _Problems, o) -> None:
  for key in ("lr", "warmup_lr", "end_lr", "min_lr"):
    if key in o:
      _positive_finite(p, f"optim.{key}", o[key], allow_zero=key != "lr")
  for name, lr in (o.get("lrs") or {}).items():
    _positive_finite(p, f"optim.lrs.{name}", lr)
  for key in ("weight_decay", "eps"):
    if key in o:
      _positive_finite(p, f"optim.{key}", o[key], allow_zero=True)
  for key in ("b1", "b2", "decay"):
    if key in o:
      f = _num(o[key])
      if f is None or not 0.0 <= f <= 1.0:
        p.add(f"optim.{key}", o[key], "must be a number in [0, 1]")
  for key in ("warmup_steps", "total_steps"):
    if key in o and (isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 0):
      p.add(f"optim.{key}", o[key], "must be an integer >= 0")


def _data(p: _Problems, d) -> None:
  if d.on_error not in ON_ERROR:
    p.add("data.on_error", d.on_error, f"must be one of {', '.join(ON_ERROR)}")
  if str(d.augmentation).strip() not in AUGMENTATIONS:
    p.add("data.augmentation", d.augmentation, f"must be one of {', '.join(AUGMENTATIONS)}")
  if not isinstance(d.max_length, int) or d.max_length < 3:
    p.add("data.max_length", d.max_length, "must be an integer >= 3 ([CLS], a word, [SEP])")
  if not isinstance(d.num_threads, int) or d.num_threads < 1:
    p.add("data.num_threads", d.num_threads, "must be an integer >= 1")
  if not isinstance(d.worker_count, int) or d.worker_count < 0:
    p.add("data.worker_count", d.worker_count, "must be an integer >= 0")
  f = _num(d.min_scale)
  if f is None or not 0.0 < f <= 1.0:
    p.add("data.min_scale", d.min_scale, "must be in (0, 1]")


def _eval(p: _Problems, e) -> None:
  if e.head not in HEADS:
    p.add("eval.head", e.head, f"must be one of {', '.join(HEADS)}")
  if e.split not in SPLITS:
    p.add("eval.split", e.split, f"must be one of {', '.join(SPLITS)}")
  for key, low in (("sets_per_batch", 0), ("max_sets", 0), ("visualize", 0)):
    v = e.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      p.add(f"eval.{key}", v, f"must be an integer >= {low}")


def _objective(p: _Problems, o) -> None:
  if "itc_temperature" in o:
    _positive_finite(p, "objective.itc_temperature", o.itc_temperature)
  if "mask_ratio" in o:
    f = _num(o.mask_ratio)
    if f is None or not 0.0 <= f < 1.0:
      p.add("objective.mask_ratio", o.mask_ratio, "must be in [0, 1)")
  for key in ("mask_noise", "hard_negative_scale"):
    if key in o:
      _positive_finite(p, f"objective.{key}", o[key], allow_zero=True)
  if "mask_token_choice" in o and o.mask_token_choice not in masking.TOKEN_CHOICES:
    p.add("objective.mask_token_choice", o.mask_token_choice,
          f"must be one of {', '.join(masking.TOKEN_CHOICES)}")
  for key in ("negatives_group_size", "mask_group_size"):
    if key in o and (isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < 0):
      p.add(f"objective.{key}", o[key], "must be an integer >= 0 (0 = the whole batch)")


def _freeze(p: _Problems, rules) -> None:
  for i, rule in enumerate(rules):
    try:
      pattern, action = rule
      re.compile(pattern)
      ok = action in ("train", "freeze")
    except (TypeError, ValueError, re.error):
      ok = False
    if not ok:
      p.add(f"freeze[{i}]", rule, "must be (regex, 'train' | 'freeze')")


def _wandb(p: _Problems, w) -> None:
  """config.wandb (configs/common.py wandb_config); absent in older configs: nothing to check."""
  if w is None:
    return
  if not isinstance(w.get("enabled"), bool):
    p.add("wandb.enabled", w.get("enabled"), "must be True or False")
  if w.get("mode") not in wandb_writer.MODES:
    p.add("wandb.mode", w.get("mode"), "must be one of 'online', 'offline' or '' ($WANDB_MODE, "
          "else 'online')")
  for key in ("project", "entity", "name"):
    if not isinstance(w.get(key), str):
      p.add(f"wandb.{key}", w.get(key), "must be a string")
  tags = w.get("tags")
  if not isinstance(tags, (tuple, list)) or not all(isinstance(t, str) and t for t in tags):
    p.add("wandb.tags", tags, "must be a tuple of non-empty strings")
  if w.get("enabled") is True and (why := wandb_writer.missing()):
    p.add("wandb.enabled", True, why.replace("config.wandb.enabled=True but ", ""))


def _mesh(p: _Problems, cfg, mode: str, num_devices: int | None) -> None:
  """Mesh axes -1 or >= 1; batches divisible by the data-parallel size of the mesh."""
  bad = False
  for axes in ("mesh", "mesh_dcn"):
    for name, v in (cfg.get(axes) or {}).items():
      if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
        p.add(f"{axes}.{name}", v, "must be -1 (the rest) or an integer >= 1")
        bad = True
  n = cfg.get("num_devices", 0)
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    p.add("num_devices", n, "must be an integer >= 0 (0 = all devices)")
    bad = True
  if bad:
    return
  dp = _data_parallel_size(cfg, num_devices)
  if dp is None:
    return
  b = cfg.train.batch_size
  if mode in TRAIN_MODES and isinstance(b, int) and b >= 1 and b % dp:
    p.add("train.batch_size", b, f"must be divisible by the data-parallel size of the mesh "
          f"({dp} devices)")


def _data_parallel_size(cfg, num_devices: int | None) -> int | None:
  """Devices a batch is split over: the product of the mesh axes other than 'tensor'
  (data and fsdp shard the batch), with -1 filled in; None when the mesh cannot be sized."""
  import jax  # pylint: disable=g-import-not-at-top
  n = num_devices or cfg.get("num_devices", 0) or jax.device_count()
  sizes = dict(cfg.get("mesh") or {})
  dcn = dict(cfg.get("mesh_dcn") or {})
  known = math.prod(v for v in sizes.values() if v != -1) * math.prod(dcn.values() or [1])
  if list(sizes.values()).count(-1) > 1 or known == 0 or n % known:
    return None                       # the mesh builder reports this itself
  rest = n // known
  full = {k: (rest if v == -1 else v) * dcn.get(k, 1) for k, v in sizes.items()}
  return math.prod(v for k, v in full.items() if k != "tensor")
