"""IMAGECODE fine-tuning, stage 1 (docs/method.md#stage-1): whole BLIP + adapter + Linear(768, 1).

Coupled-L2 Adam, lr blip 2e-6 / head 1e-4, 0.95**epoch, 40 epochs of 36 summed examples, the
best valid epoch exported. Start from a pretrain workdir (`--config.init_workdir=DIR`).
As in the reference: an epoch is ceil(16,594 / 36) = 461 steps, the last one of 34 examples
(`data.drop_remainder=True`: 460); the best of the validations after epochs 0..38 is exported
(`train.validate_last_epoch=True` lets the last epoch compete); `itm_head`, `vision_proj` and
`text_proj`, which no stage-1 loss reaches, stay as loaded (`freeze_unreached`).
Variants: ':tiny', ':noflip' (augmentation 1; docs/decisions.md item 12), ':steps=N'.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, noflip=False, steps=0)
  c = common.base_config("finetune1")
  c.model.scan_layers = True     # one compiled ViT / BERT block body: B/16 steps compile 3-7x
                                 # faster at the same step time (bench/README.md); parameters
                                 # in the other layout are converted on load
  c.optim = common.optim.default_config("finetune_stage1")
  c.train.batch_size = 36        # examples per update, losses summed (docs/decisions.md item 17)
  c.train.accum_steps = 1        # raise to fit memory; the sum is unchanged
  c.train.num_epochs = 40        # epochs over the 16,594 train descriptions
  c.train.eval_every_epochs = 1  # valid accuracy each epoch (model selection; not after
                                 # the last: train.validate_last_epoch=False, the reference)
  c.train.select_best = True     # export the best valid epoch
  c.train.save_every = 461       # one checkpoint per epoch (461 steps: the partial last
                                 # batch is kept, data.drop_remainder=False)
  # Stage 1 trains everything it uses; the context encoder (stage 2) stays untouched.
  c.freeze = [("context_encoder/.*", "freeze"), (".*", "train")]
  c.data.imagecode_dir = ""      # REQUIRED: directory with train/valid JSON and image-sets/
  c.data.augmentation = "1" if a.noflip else "0"
  c.eval.head = "stage1"
  if a.tiny:
    common.tiny(c)
    c.train.batch_size = 4
    c.train.eval_every_epochs = 0
  if a.steps:
    c.train.num_steps = a.steps
  return c
