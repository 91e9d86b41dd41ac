"""Evaluation on IMAGECODE: accuracy all / video / static with 95% CIs, per-tag accuracy,
predictions JSONL; ':predict' scores the unlabelled test file and writes the leaderboard JSON.

  --config configs/evaluate.py:head=zero_shot --config.eval.checkpoint=DIR
Variants: 'head=zero_shot|stage1|stage2', 'split=valid|test', 'predict', 'tiny'.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, predict=False, head="zero_shot", split="valid")
  c = common.base_config("predict" if a.predict else "evaluate")
  c.eval.head = a.head
  c.eval.split = "test" if a.predict else a.split
  c.eval.sets_per_batch = 8      # 80 images per batch
  c.data.imagecode_dir = ""      # REQUIRED
  if a.tiny:
    common.tiny(c)
  return c
