"""IMAGECODE fine-tuning, stage 2 (docs/method.md#stage-2): inter-context encoder on frozen stage-1 features.

Only the 2-layer context Transformer and its 10 position embeddings train (lr 2e-6 by default,
docs/decisions.md item 11 suggests sweeping {2e-6, 1e-4}: ':lr=1e-4'); 20 epochs; the stage-1 head is
frozen. Start from a stage-1 workdir (`--config.init_workdir=DIR`). Epochs, the partial last
batch and model selection as in stage 1 (461 steps per epoch; the best of the validations after
epochs 0..18). Variants: ':tiny', ':steps=N', ':lr=X'.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, steps=0, lr=2e-6)
  c = common.base_config("finetune2")
  c.model.scan_layers = True     # one compiled ViT / BERT block body: B/16 steps compile 3-7x
                                 # faster at the same step time (bench/README.md); parameters
                                 # in the other layout are converted on load
  c.optim = common.optim.default_config("finetune_stage2")
  c.optim.lrs.context = a.lr     # the context group's base lr
  c.train.batch_size = 36        # examples per update, losses summed
  c.train.num_epochs = 20
  c.train.eval_every_epochs = 1
  c.train.select_best = True
  c.train.save_every = 461       # one checkpoint per epoch (ceil(16,594 / 36) steps)
  c.freeze = [("context_encoder/.*", "train"), (".*", "freeze")]   # docs/method.md#freezing
  c.data.imagecode_dir = ""      # REQUIRED
  c.eval.head = "stage2"
  if a.tiny:
    common.tiny(c)
    c.train.batch_size = 4
    c.train.eval_every_epochs = 0
  if a.steps:
    c.train.num_steps = a.steps
  return c
