"""BLIP backbone from scratch (ITC + ITM with hard negatives) on image-caption pairs.

Stands in for downloading BLIP weights (the demo trains a tiny one); for the paper, convert
`model_base.pth` with weight_convert instead. Variants: ':tiny' (tests), ':tiny,steps=N'.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, steps=0)
  c = common.base_config("backbone")
  c.model.variant = "B/16"
  c.optim = common.optim.default_config("adamw_cosine")
  c.optim.lr = 1e-4              # peak lr (BLIP pre-training scale)
  c.optim.warmup_steps = 3000    # linear warm-up
  c.optim.total_steps = 100_000  # cosine horizon (set to the run's steps)
  c.train.batch_size = 1024      # global batch of pairs
  c.train.num_epochs = 20        # epochs over the pairs
  c.data.pairs_json = ""         # REQUIRED: comma-separated pair files, e.g. coco.json,vg.json
  if a.tiny:
    common.tiny(c)
    c.optim.warmup_steps = 1
    c.optim.total_steps = 4
  if a.steps:
    c.train.num_steps = a.steps
    c.optim.total_steps = a.steps
  return c
