"""Shared pieces of the config files: `parse_arg` and the sub-configs every mode reads.

Each config file has one `get_config(arg=None)`; `arg` is the text after ':' on the command
line (`--config configs/pretrain.py:tiny,steps=20`) and is parsed by `parse_arg` into
structural variants. Leaves are then overridden with `--config.a.b=v`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from contextblip_jax.run.validate_config import MODES  # noqa: F401 - the one list of modes
from contextblip_jax.training import masking, optim

# Paper-scale data locations are placeholders: no default points at a real local file.


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """'tiny,steps=20' -> ConfigDict(tiny=True, steps=20, <other spec defaults>).

  Every key must appear in `spec` (its default gives the type); a bare key sets a bool True.
  """
  out = ml_collections.ConfigDict(dict(spec))
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in spec:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(spec)}")
    default = spec[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.strip().lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value.strip()
  return out


COMPILATION_CACHE_ENV = "CONTEXTBLIP_XLA_CACHE"


def default_compilation_cache() -> str:
  """The default `config.compilation_cache`: $CONTEXTBLIP_XLA_CACHE when set ('' = off), else
  $XDG_CACHE_HOME/contextblip_jax/xla, else ~/.cache/contextblip_jax/xla (one per user)."""
  if COMPILATION_CACHE_ENV in os.environ:
    return os.environ[COMPILATION_CACHE_ENV]
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "contextblip_jax", "xla")


def model_config(variant: str = "B/16", image_size: int = 224) -> ml_collections.ConfigDict:
  """ContextBlipConfig fields (models/contextblip.py); sizes come from models/variants.py."""
  m = ml_collections.ConfigDict()
  m.variant = variant            # 'tiny' | 'B/16' (models/variants.py); a converted
                                 # checkpoint or previous stage overrides the backbone sizes
  m.image_size = image_size      # input resolution of every image
  # Size overrides of the variant's row (0 = keep the variant's value); the demo uses them.
  m.width = 0                    # ViT width = text hidden size
  m.depth = 0                    # ViT blocks
  m.text_layers = 0              # text encoder layers
  m.heads = 0                    # attention heads (ViT, text, TMIM decoder, context encoder)
  m.mlp_dim = 0                  # MLP / FFN hidden size (ViT and text)
  m.patch_size = 0               # ViT patch side
  m.use_adapter = True           # multi-scale adapter on the ViT (False: plain BLIP)
  m.adapter_taps = ()            # 1-based ViT blocks tapped; () = the variant's default
  m.adapter_reduction = 2        # delta of the adapter (docs/decisions.md item 1)
  m.use_tmim = True              # build the TMIM modules (decoder, mask token; pre-training)
  m.reference_patch_layout = False   # reproduce the released code's patch scramble (docs/decisions.md item 7)
  m.context_layers = 2           # inter-context encoder depth (stage 2)
  m.dropout = -1.0               # text/context dropout override; <0 keeps the variant's 0.1
  m.init_kernel_scale = 1.0      # from-scratch init: ViT/text 2-D kernels x this (BERT/ViT
                                 # N(0, 0.02) suits width 768; ~sqrt(768 / width) for a tiny
                                 # model; parameters loaded from a source keep their values)
  # Memory and compile time (models/layout.py; README "Memory and compile time"):
  m.scan_layers = False          # nn.scan over the identical ViT / BERT blocks: one compiled
                                 # block body, parameters stacked [L, ...]; parameters from a
                                 # source in the other layout are converted on load
  m.remat = "none"               # per-block remat: 'none' | 'full' (recompute everything in
                                 # the backward pass) | 'dots_saveable' (keep matmul outputs) |
                                 # 'dots_with_no_batch_dims_saveable' (keep weight matmuls)
  # Precision and attention kernel (run/model_config.py build_model; README "Precision:
  # compute_dtype, attention_impl"). Neither is part of the parameters.
  m.compute_dtype = "float32"    # 'float32' | 'bfloat16': activations and matmul inputs;
                                 # parameters, optimizer state, LayerNorm statistics,
                                 # softmaxes, logits and losses stay float32
  m.attention_impl = "explicit"  # attention without probabilities: 'explicit' (float32
                                 # softmax written out; the numerics of every figure here) |
                                 # jax.nn.dot_product_attention with 'xla' (any backend) or
                                 # 'cudnn' (NVIDIA GPU, needs bfloat16)
  return m


def data_config() -> ml_collections.ConfigDict:
  """Where the data lives and how it is read."""
  d = ml_collections.ConfigDict()
  d.pairs_json = ""              # comma-separated pair files (coco.json,vg.json) for pre-training
  d.pairs_image_root = ""        # root of relative pair image paths ('' = each JSON's directory)
  d.imagecode_dir = ""           # directory with train/valid/test JSONs (+ annotation YAML)
  d.image_root = ""              # IMAGECODE image-sets directory ('' = <imagecode_dir>/image-sets)
  d.annotation_yaml = ""         # phenomenon tags ('' = <imagecode_dir>/manual_annotation_valid.yaml
                                 # when present)
  d.on_error = "raise"           # bad input: 'raise' (error naming file/entry) | 'skip' (counted)
  d.augmentation = "0"           # training transform (data/augment.py): '0' BLIP's, '1' no
                                 # flip, '2' scale (0.5, 1), '3' M=10, 'none' resize only
  d.min_scale = 0.2              # RandomResizedCrop lower scale in pre-training
  d.max_length = 30              # text length T
  d.drop_remainder = True        # an epoch's last, partial training batch: True = dropped
                                 # (floor(N / B) steps; BLIP's drop_last pre-training loaders,
                                 # the only choice for backbone / pretrain, whose losses pair
                                 # rows) | False = kept, padded and masked (ceil(N / B) steps;
                                 # the reference fine-tuning loader: finetune1/2's default)
  d.cache_images = False         # decode every image once into memory (small datasets only)
  d.num_threads = 2              # Grain reader threads
  d.worker_count = 0             # Grain worker processes (0 on 2-core machines)
  return d


def train_config() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = 256             # global batch (pairs, or IMAGECODE examples per update)
  t.num_epochs = 1               # epochs (ignored when num_steps > 0)
  t.num_steps = 0                # total optimizer steps; 0 = num_epochs * steps_per_epoch
  t.accum_steps = 1              # micro-batches per step (gradient accumulation)
  t.log_every = 50               # steps between metric records / progress lines
  t.save_every = 500             # steps between (asynchronous) checkpoints
  t.keep_checkpoints = 2         # most recent checkpoints kept (>= 1)
  t.restart = False              # True: start over in a workdir a previous run left files in
                                 # (they move to <workdir>/restarted.<time>/); False: resume,
                                 # or stop saying what was found
  t.eval_every_epochs = 0        # fine-tuning: valid accuracy every this many epochs (0 = end)
  t.select_best = False          # export the best-valid parameters instead of the last
  t.validate_last_epoch = False  # select_best candidates: False = the reference's (docs/decisions.md
                                 # item 23: validation after epochs 0..E-2; the last parameters
                                 # are evaluated and reported, never selected) | True = the
                                 # last parameters are a candidate too
  t.compile_report = True        # AOT-compile the step first and log memory / FLOPs
  return t


def eval_config(head: str = "zero_shot") -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.head = head                  # 'zero_shot' (ITM) | 'stage1' | 'stage2' scores
  e.split = "valid"              # 'valid' (labelled) | 'test' (leaderboard) | 'train'
  e.sets_per_batch = 0           # image sets per evaluation batch (10 images each); 0 = one
                                 # per device of the batch axes (evaluation/loop.py): the
                                 # least memory at full use of the devices
  e.checkpoint = ""              # parameters to evaluate: a stage workdir or converted dir
                                 # ('' = this workdir's own export)
  e.max_sets = 0                 # evaluate only the first N sets (0 = all)
  e.visualize = 4                # PNGs of mask / cross-attention for this many sets (0 = none)
  return e


def objective_config() -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.frozen_dropout = True        # dropout active in frozen modules while training (docs/decisions.md item 16)
  o.itc_temperature = 0.07       # backbone ITC temperature
  o.negatives_group_size = 0     # hard negatives within groups of this many rows (0 = batch)
  o.hard_negative_scale = 1.0    # backbone: sampling sims x this (0 = random negatives)
  o.mask_group_size = 0          # rows sharing one TMIM text position (0 = batch)
  o.mask_ratio = masking.DEFAULT_MASK_RATIO  # pi of TMIM; 0 = ITM-only pre-training (docs/decisions.md item 13)
  o.mask_token_choice = "reference"  # TMIM attention source (docs/decisions.md item 5)
  o.random_mask = False          # uniform random mask instead of attention top-M
  o.mask_noise = 0.02            # U(0, noise) tie-breaking noise on the patch scores
  return o


def wandb_config() -> ml_collections.ConfigDict:
  """Weights & Biases logging beside TensorBoard (storage/wandb_writer.py; README "Weights &
  Biases"). Needs the extra: pip install -e '.[wandb]'."""
  w = ml_collections.ConfigDict()
  w.enabled = False              # True: one W&B run per stage / evaluation (process 0 only)
  w.project = "contextblip_jax"  # W&B project
  w.entity = ""                  # W&B team or user ('' = $WANDB_ENTITY / your default entity)
  w.name = ""                    # run name ('' = '<stage>-<workdir name>')
  w.mode = ""                    # '' ($WANDB_MODE, else 'online') | 'online' | 'offline' (files
                                 # in <workdir>/wandb/, uploaded later with `wandb sync`)
  w.tags = ()                    # run tags, e.g. ('paper', 'v5e')
  return w


def base_config(mode: str) -> ml_collections.ConfigDict:
  """Every field any mode reads, with paper-scale defaults."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
  c = ml_collections.ConfigDict()
  c.mode = mode                  # backbone | pretrain | finetune1 | finetune2 | evaluate |
                                 # predict | demo
  c.seed = 42                    # every random key derives from this
  c.platform = "auto"            # 'auto' (what JAX finds) | 'cpu' | 'gpu' | 'tpu': a run that
                                 # asks for an accelerator stops (exit 2) when JAX fell back
                                 # to the CPU (parallel/accelerator.py; README "Install on
                                 # GPU / TPU")
  c.init_checkpoint = ""         # converted BLIP directory (python -m weight_convert --out DIR)
  c.init_workdir = ""            # previous stage's workdir (its export/ parameters)
  c.model = model_config()
  c.data = data_config()
  c.data.drop_remainder = mode not in ("finetune1", "finetune2")   # fine-tuning keeps it
  c.train = train_config()
  c.optim = optim.default_config("pretrain")  # optimizer (contextblip_jax/training/optim.py)
  c.objective = objective_config()
  c.eval = eval_config()
  c.wandb = wandb_config()       # optional Weights & Biases run (off by default)
  c.freeze = [(".*", "train")]   # (regex over parameter paths, 'train' | 'freeze'), first wins
  c.freeze_unreached = True      # also freeze trainable leaves no loss reaches (stage 1:
                                 # itm_head, vision_proj, text_proj): torch leaves their grad
                                 # None and Adam skips them; False lets weight decay move them
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # device mesh
  # Several TPU slices: the mesh across slices (config.mesh is then the mesh inside one).
  c.mesh_dcn = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  c.num_devices = 0              # devices in the mesh: 0 = all; n = the first n (one process)
  c.sharding_rules = ml_collections.config_dict.placeholder(tuple)  # None = sharding.py table
  c.compilation_cache = default_compilation_cache()  # persistent XLA compilation cache
                                 # directory (run/cli.py): a second run of the same programs
                                 # loads them instead of compiling; '' = off
  c.compile_fast = False         # XLA backend optimisation level 0 for the train/eval steps:
                                 # ~2x faster compiles, ~2x slower steps (tests, short runs)
  return c


def tiny(c: ml_collections.ConfigDict, data_dir: str = "") -> ml_collections.ConfigDict:
  """Shrinks a config to the tiny model and a few steps (tests; generated data)."""
  c.model.variant = "tiny"
  c.model.image_size = 32
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.save_every = 2
  c.train.compile_report = False
  c.compile_fast = True
  c.eval.sets_per_batch = 4
  c.eval.visualize = 1
  c.data.cache_images = True
  if data_dir:
    c.data.imagecode_dir = data_dir
  c.mesh.data = -1
  return c
