"""The main job: the whole method on the embedded synthetic default, on 2 CPU cores.

  python -m contextblip_jax.main --config configs/demo.py --workdir runs/demo

Stages (each a full config under `stages`, run in <workdir>/<stage>, each starting from the
one before): generate the synthetic IMAGECODE-layout data -> backbone (tiny BLIP from scratch
on the pairs, standing in for downloaded BLIP weights) -> pretrain (ContextBLIP: adapter +
TMIM, BLIP frozen; its final evaluation is the zero-shot result) -> finetune1 -> finetune2 ->
test-set predictions (leaderboard JSON) -> report.md.

Learning rates differ from the paper's on purpose: the paper fine-tunes a 224M-parameter
pre-trained BLIP at 2e-6 for 40 epochs; a from-scratch model with ~2.4M parameters trained for
a few hundred steps needs lrs around 1e-3 to move at all. The backbone also starts from a
width-scaled init and random ITM negatives (README, "The demo"). Everything else follows the
paper's recipe (summed per-example CE with coupled-L2 Adam in fine-tuning, frozen BLIP in
pre-training, frozen stage 1 in stage 2).

Variants: ':tiny' (seconds; tests), ':fast' (fewer steps, for a quick look).
"""

import ml_collections

from configs import common


def _stage(mode: str, a) -> ml_collections.ConfigDict:
  c = common.base_config(mode)
  c.model.variant = "tiny"       # models/variants.py row, widened below
  c.model.image_size = 32        # the synthetic images are 32 x 32
  c.model.width = 64             # ViT width = text hidden size
  c.model.mlp_dim = 128          # MLP / FFN hidden size
  c.model.depth = 4              # ViT blocks (all four feed the adapter)
  c.model.text_layers = 2        # text encoder layers
  c.model.heads = 4              # attention heads everywhere
  c.model.patch_size = 8         # 4 x 4 patches of 8 px
  c.model.dropout = 0.0          # no dropout: a few hundred steps on a tiny model
  c.data.cache_images = True     # ~30 MB of 32-px images, decoded once
  c.data.augmentation = "none"   # position/size/left-right words: no crops or flips
  c.data.num_threads = 1
  c.train.log_every = 50
  c.train.save_every = 200
  c.train.compile_report = False
  c.eval.sets_per_batch = 25
  c.eval.visualize = 4
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # all devices
  c.compile_fast = a.tiny        # tests: XLA optimisation level 0
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, fast=False)
  scale = 0.02 if a.tiny else (0.4 if a.fast else 1.0)

  def steps(n):
    return max(2, int(n * scale))

  c = common.base_config("demo")
  c.data_seed = 0                # seed of the generated dataset
  c.synthetic = ml_collections.ConfigDict(dict(
      n_train_sets=40 if a.tiny else 500,    # training sets (~2.2 descriptions each)
      n_valid_sets=12 if a.tiny else 200,    # validation sets (tagged)
      n_test_sets=6 if a.tiny else 100,      # unlabelled test sets
      n_pairs=120 if a.tiny else 3000,       # pre-training pairs
      image_size=32))                        # JPEG side
  c.stages = ml_collections.ConfigDict()

  b = _stage("backbone", a)
  b.model.init_kernel_scale = 3.46   # sqrt(768 / 64): BERT/ViT init std rescaled to width 64
  b.objective.hard_negative_scale = 0.0   # random ITM negatives (hard ones from a weak ITC
                                          # are mostly true matches of these short captions)
  b.optim = common.optim.default_config("adamw_cosine")
  b.optim.lr = 1e-3              # from scratch, tiny model
  b.optim.warmup_steps = steps(30)
  b.optim.total_steps = steps(600)
  b.optim.end_lr = 5e-5
  b.optim.weight_decay = 0.01
  b.train.batch_size = 8 if a.tiny else 64
  b.train.num_steps = steps(600)
  c.stages.backbone = b

  p = _stage("pretrain", a)
  p.optim = common.optim.default_config("adamw_cosine")   # short run: warm-up + cosine
  p.optim.lr = 1e-3
  p.optim.warmup_steps = steps(20)
  p.optim.total_steps = steps(150)
  p.optim.end_lr = 5e-5
  p.optim.weight_decay = 0.05    # the paper's AdamW decay
  p.freeze = [("pretrained_blip/.*", "freeze"), (".*", "train")]   # docs/method.md#freezing
  p.train.batch_size = 8 if a.tiny else 64
  p.train.num_steps = steps(150)
  p.eval.head = "zero_shot"
  c.stages.pretrain = p

  f1 = _stage("finetune1", a)
  f1.optim = common.optim.default_config("finetune_stage1")   # coupled-L2 Adam, 2 groups
  f1.optim.lrs = ml_collections.ConfigDict({"head": 5e-2, "blip": 2e-4})
  f1.optim.decay = 0.8           # per epoch (0.95 in the paper over 40 epochs)
  f1.optim.weight_decay = 0.0    # 0.2 in the paper, with its 2e-6 lr
  f1.freeze = [("context_encoder/.*", "freeze"), (".*", "train")]
  f1.train.batch_size = 4 if a.tiny else 8
  f1.train.num_steps = steps(440)   # 4 epochs of the ~880 train descriptions
  f1.eval.head = "stage1"
  c.stages.finetune1 = f1

  f2 = _stage("finetune2", a)
  f2.optim = common.optim.default_config("finetune_stage2")
  f2.optim.lrs = ml_collections.ConfigDict({"context": 2e-3})
  f2.optim.decay = 0.8
  f2.optim.weight_decay = 0.0
  f2.freeze = [("context_encoder/.*", "train"), (".*", "freeze")]
  f2.train.batch_size = 4 if a.tiny else 16
  f2.train.num_steps = steps(300)
  f2.eval.head = "stage2"
  c.stages.finetune2 = f2

  c.predict_test = True          # stage-2 predictions on the unlabelled test file
  # One flag for every stage: --config.model.compute_dtype=bfloat16 (README "Precision"),
  # --config.wandb.enabled=True (README "Weights & Biases").
  for stage in c.stages.values():
    stage.model.compute_dtype = c.model.get_ref("compute_dtype")
    for key in c.wandb:
      stage.wandb[key] = c.wandb.get_ref(key)
  return c
