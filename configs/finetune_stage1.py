"""IMAGECODE fine-tuning, stage 1 (SPEC §6.2, §7.3): whole BLIP + adapter + Linear(768, 1).

Coupled-L2 Adam, lr blip 2e-6 / head 1e-4, 0.95**epoch, 40 epochs of 36 summed examples, the
best valid epoch exported. Start from a pretrain workdir (`--config.init_workdir=DIR`).
Variants: ':tiny', ':noflip' (augmentation 1; SPEC §10 item 12), ':steps=N'.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, noflip=False, steps=0)
  c = common.base_config("finetune1")
  c.optim = common.optim.default_config("finetune_stage1")
  c.train.batch_size = 36        # examples per update, losses summed (SPEC §10 item 17)
  c.train.accum_steps = 1        # raise to fit memory; the sum is unchanged
  c.train.num_epochs = 40        # epochs over the 16,594 train descriptions
  c.train.eval_every_epochs = 1  # valid accuracy each epoch (model selection)
  c.train.select_best = True     # export the best valid epoch
  c.train.save_every = 461       # one checkpoint per epoch (461 steps)
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
