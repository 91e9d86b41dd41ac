"""Modes 'evaluate' (a labelled split: accuracy report) and 'predict' (the unlabelled test
file: leaderboard JSON) of `python -m contextblip_jax.main`.

The parameters come from `config.eval.checkpoint` (any parameter directory or stage workdir)
or the workdir itself; outputs go to `<workdir>/eval/` (see `evaluation/loop.py`). On the
valid split the report adds accuracy by number of propositions when a propositions file is
found (`config.data.propositions_file`, `data/propositions.py`). With
`config.eval.benchmark='mmvp'` (configs/mmvp.py) 'evaluate' scores the MMVP-VLM pairs of
`config.data.mmvp_dir` instead (`evaluation/mmvp_eval.py`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from contextblip_jax.data import imagecode, mmvp, propositions
from contextblip_jax.evaluation import loop, mmvp_eval, scoring
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.run.model_config import build_model
from contextblip_jax.storage import param_dir, paths
from contextblip_jax.storage import workdir as wd
from contextblip_jax.storage.metric_writers import MetricWriter
from contextblip_jax.training import masking


def load_eval_params(cfg: ml_collections.ConfigDict, workdir: str):
  """(model, params on the mesh, mesh, shardings) from config.eval.checkpoint or workdir."""
  path = cfg.eval.checkpoint or workdir
  source = param_dir.load_param_dir(path)
  model = build_model(cfg, source)
  mesh = shd.mesh_from_config(cfg)
  params = scoring.head_params(source.params, model, cfg.eval.head)
  shardings = scoring.param_shardings_for(model, params, mesh, cfg.sharding_rules)
  source.params = None     # the host copy is freed leaf by leaf as it reaches the devices
  params = shd.device_put_in_place(params, shardings)
  return model, params, mesh, shardings


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Mode 'evaluate' (labelled split: accuracy) or 'predict' (test: leaderboard JSON)."""
  if cfg.eval.get("benchmark", "imagecode") != "imagecode":
    return run_mmvp(cfg, workdir)
  split_name = "test" if cfg.mode == "predict" else cfg.eval.split
  name = f"{cfg.eval.head}_{split_name}"
  model, params, mesh, shardings = load_eval_params(cfg, workdir)
  split = imagecode.load_split(cfg, split_name)
  if cfg.eval.max_sets:
    if not split.labelled:
      raise ValueError("config.eval.max_sets would leave descriptions out of the leaderboard "
                       "file; use it with a labelled split only")
    split = imagecode.first_sets(split, cfg.eval.max_sets)
  props = propositions.for_split(cfg, split_name, (e.description for e in split.examples))
  evaluator = loop.Evaluator(model, cfg.eval.head, cfg, mesh, shardings)
  out_dir = paths.join(workdir, wd.EVAL)
  with MetricWriter(workdir, stage=cfg.mode, config=cfg) as writer:
    report = loop.evaluate_split(evaluator, params, split, out_dir, name, writer,
                                 propositions=props)
  if cfg.eval.visualize and split.labelled:
    from contextblip_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
    report["figures"] = visualize.attention_figures(
        model, params, split, paths.join(out_dir, f"{name}_attention"),
        num_sets=cfg.eval.visualize, max_length=cfg.data.max_length,
        mask_ratio=cfg.objective.mask_ratio or masking.DEFAULT_MASK_RATIO)
  return report


def run_mmvp(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """MMVP-VLM pair accuracy of `config.eval.head` (<workdir>/eval/mmvp_<head>.*)."""
  if cfg.eval.benchmark != "mmvp" or cfg.mode != "evaluate":
    raise ValueError(f"config.eval.benchmark={cfg.eval.benchmark!r} with mode {cfg.mode!r}: "
                     "known benchmarks are 'imagecode' (evaluate / predict) and 'mmvp' "
                     "(evaluate)")
  if not cfg.data.get("mmvp_dir"):
    raise ValueError("config.data.mmvp_dir is required (the MMVP-VLM directory holding "
                     f"{mmvp.QUESTIONS_FILE} and '{mmvp.IMAGE_DIR}/')")
  bench = mmvp.read_mmvp(cfg.data.mmvp_dir,
                         pairs_per_category=cfg.eval.get("mmvp_pairs_per_category",
                                                         mmvp.PAIRS_PER_CATEGORY))
  model, params, mesh, shardings = load_eval_params(cfg, workdir)
  evaluator = mmvp_eval.MmvpEvaluator(model, cfg.eval.head, cfg, mesh, shardings)
  return mmvp_eval.evaluate_mmvp(evaluator, params, bench, paths.join(workdir, wd.EVAL),
                                 f"mmvp_{cfg.eval.head}")
