"""MMVP-VLM (paper Table 3): pair accuracy per category and on average, with 95% CIs.

  --config configs/mmvp.py:head=stage2 --config.eval.checkpoint=DIR --config.data.mmvp_dir=MMVP_VLM
Each pair's 2 images are one candidate set; 'stage2' runs the inter-context encoder over the 2
candidates with the position embedding off (the reference's zero position mask); 'zero_shot'
and 'stage1' score the same pairs with the other heads. Outputs: <workdir>/eval/mmvp_<head>.
{predictions.jsonl, report.json, leaderboard.json} (evaluation/mmvp_eval.py).
Variants: 'head=zero_shot|stage1|stage2' (default stage2, the paper's), 'tiny'.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, head="stage2")
  c = common.base_config("evaluate")
  c.eval.benchmark = "mmvp"      # 'mmvp' (this file) | 'imagecode' (configs/evaluate.py)
  c.eval.head = a.head
  c.eval.sets_per_batch = 8      # pairs per batch (2 images each)
  c.eval.mmvp_pairs_per_category = 15  # pairs each category must have (0 = any)
  c.eval.visualize = 0           # no attention figures for MMVP
  c.data.mmvp_dir = ""           # REQUIRED: holds Questions.csv and 'MLLM_VLM Images/'
  if a.tiny:
    common.tiny(c)
    c.eval.visualize = 0
  return c
