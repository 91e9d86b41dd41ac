"""Evaluation on IMAGECODE: accuracy all / video / static with 95% CIs, per-tag accuracy,
accuracy by number of propositions (valid), predictions JSONL; ':predict' scores the
unlabelled test file and writes the leaderboard JSON.

  --config configs/evaluate.py:head=zero_shot --config.eval.checkpoint=DIR
Variants: 'head=zero_shot|stage1|stage2', 'split=valid|test', 'predict', 'tiny'.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, predict=False, head="zero_shot", split="valid")
  c = common.base_config("predict" if a.predict else "evaluate")
  c.eval.head = a.head
  c.eval.split = "test" if a.predict else a.split
  c.data.imagecode_dir = ""      # REQUIRED
  c.data.propositions_file = "auto"  # valid split, paper Table 10 (data/propositions.py):
                                 # 'auto' = <imagecode_dir>/valid_split.json, else the
                                 # repository's data/imagecode/valid_split.json, when present
                                 # (descriptions not in it are counted); '' = off; a path =
                                 # that file, which must match some description
  if a.tiny:
    common.tiny(c)
  return c
