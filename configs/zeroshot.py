"""Zero-shot IMAGECODE evaluation (docs/method.md#zero-shot): ITM softmax[:, 1], argmax over the 10 images.

Paper reference on valid: 31.06% (pi 0.25, delta 2;
docs/method.md#paper-numbers).
  --config configs/zeroshot.py --config.eval.checkpoint=PRETRAIN_WORKDIR
  --config configs/zeroshot.py:test   (leaderboard JSON for test_data_unlabeled.json)
"""

from configs import evaluate


def get_config(arg=None):
  a = evaluate.common.parse_arg(arg, tiny=False, test=False)
  args = ["head=zero_shot"] + (["predict"] if a.test else []) + (["tiny"] if a.tiny else [])
  return evaluate.get_config(",".join(args))
