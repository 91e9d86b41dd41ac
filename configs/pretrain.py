"""ContextBLIP pre-training (docs/method.md#pre-training): L_itm (hard negatives) + L_tmim on COCO + VG pairs.

BLIP is frozen; the multi-scale adapter and the TMIM modules train (docs/method.md#freezing). Start from the
converted `model_base.pth` (`--config.init_checkpoint=DIR`) or a backbone workdir
(`--config.init_workdir=DIR`). Variants: ':tiny', ':nomim' (no TMIM, ITM only;
docs/decisions.md item 13), ':steps=N'.
Each epoch drops its last partial batch, as BLIP's `drop_last` loaders do
(`data.drop_remainder` must stay True here: the losses pair the rows of a batch).
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, nomim=False, steps=0)
  c = common.base_config("pretrain")
  c.model.scan_layers = True     # one compiled ViT / BERT block body: B/16 steps compile 3-7x
                                 # faster at the same step time (bench/README.md); parameters
                                 # in the other layout are converted on load
  c.optim = common.optim.default_config("pretrain")   # AdamW 3e-4, wd 0.05, 0.9**epoch
  c.train.batch_size = 1024      # 256 per GPU x 4 GPUs
  c.train.num_epochs = 20        # the reference saves every epoch
  c.train.save_every = 1000      # steps between checkpoints
  if a.nomim:                    # ITM only: no TMIM modules, no masking
    c.model.use_tmim = False
    c.objective.mask_ratio = 0.0
  c.freeze = [("pretrained_blip/.*", "freeze"), (".*", "train")]   # docs/method.md#freezing
  c.objective.negatives_group_size = 256   # hard negatives within each GPU's batch (docs/decisions.md item 10)
  c.objective.mask_group_size = 256        # one TMIM text position per GPU's batch
  c.data.pairs_json = ""         # REQUIRED: comma-separated pair files, e.g. coco.json,vg.json
  c.data.augmentation = "0"       # RandomResizedCrop(0.2-1) + flip + RandAugment(2, 5)
  c.eval.head = "zero_shot"      # zero-shot valid accuracy at the end (if imagecode_dir is set)
  if a.tiny:
    common.tiny(c)
    c.optim.warmup_steps = 2
    c.objective.negatives_group_size = 0
    c.objective.mask_group_size = 0
  if a.steps:
    c.train.num_steps = a.steps
  return c
