"""Training loop of every stage: `train_and_evaluate(config, workdir)`.

Stages (config.mode):
  backbone   BLIP from scratch on pairs (objectives.backbone_loss)
  pretrain   ContextBLIP pre-training on pairs (pretrain_loss: ITM hard negatives + TMIM)
  finetune1  IMAGECODE stage 1 (finetune_stage1_loss, summed over the examples of a step)
  finetune2  IMAGECODE stage 2 (finetune_stage2_loss, inter-context encoder)

The loop: shape-first sharded state (`steps.init_train_state`, parameters from
config.init_checkpoint / config.init_workdir where given), or an automatic resume from the
latest checkpoint in <workdir>/ckpt straight into the target shardings together with the Grain
iterator position; a jitted train step with explicit shardings and donation; metrics to
TensorBoard + metrics.jsonl and a progress line with rate and ETA; periodic asynchronous
checkpoints; SIGTERM -> save, wait, return; fine-tuning: valid accuracy every
`eval_every_epochs` (best exported when `select_best`; the last epoch a candidate only with
`validate_last_epoch`). Trainable leaves no loss reaches are frozen first (`freeze_unreached`,
steps.stage_freeze_rules). At the end: <workdir>/export (the stage's parameters for the next
stage), a final evaluation, then DONE.json. A rerun of a
finished workdir returns the recorded summary without training again.

Safety (README, "Safety and errors"): the config is validated first (run/validate_config.py);
the workdir is checked (never a parameter directory, an export or a foreign directory) and
locked for the run; a previous run's files without a checkpoint stop the run unless
train.restart=True moves them aside; a corrupt newest checkpoint falls back to the newest
intact step; a non-finite loss or gradient norm raises TrainingDivergedError naming the step
(checked on the devices every step, read before every save, best-epoch export and the end).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contextblip_jax.data import imagecode
from contextblip_jax.data import pairs as pairs_reader
from contextblip_jax.data import pipeline, tokenizer
from contextblip_jax.evaluation import loop as ev
from contextblip_jax.evaluation import scoring
from contextblip_jax.models.contextblip import ContextBlip, init_params
from contextblip_jax.parallel import compilation, distributed
from contextblip_jax.parallel import sharding as shd
from contextblip_jax.run import validate_config
from contextblip_jax.run.model_config import build_model
from contextblip_jax.storage import checkpoints, lock, param_dir, paths
from contextblip_jax.storage import workdir as wd
from contextblip_jax.storage.metric_writers import MetricWriter, Progress
from contextblip_jax.training import masking, objectives, optim, steps

TRAIN_STAGES = ("backbone", "pretrain", "finetune1", "finetune2")
LOSS = {"backbone": "backbone", "pretrain": "pretrain", "finetune1": "finetune_stage1",
        "finetune2": "finetune_stage2"}
PARAM_TREE = {"backbone": "backbone", "pretrain": "pretrain", "finetune1": "finetune",
              "finetune2": "finetune"}
EVAL_HEAD = {"pretrain": "zero_shot", "finetune1": "stage1", "finetune2": "stage2"}

# Parameter groups a training stage takes from the stage before it (the rest start fresh).
TAKE_FROM_PREVIOUS = {
    "backbone": (),
    "pretrain": ("pretrained_blip", "vision_adapter"),
    "finetune1": ("pretrained_blip", "vision_adapter"),
    "finetune2": ("pretrained_blip", "vision_adapter", "prediction_layer"),
}
Hook = Callable[[int, dict], None]   # called after every step with (step, host metrics)


# ------------------------------------------------------------------ data

def train_pipeline(cfg: ml_collections.ConfigDict, stage: str, image_size: int,
                   mesh: jax.sharding.Mesh, counts: dict[str, int]) -> pipeline.Pipeline:
  """The stage's Grain pipeline (this process's rows of every global batch under `mesh`);
  `counts` receives the skipped-item counts."""
  d, t = cfg.data, cfg.train
  common = dict(image_size=image_size, global_batch_size=t.batch_size, seed=cfg.seed,
                max_length=d.max_length, augmentation=_augmentation(d.augmentation),
                num_epochs=None,
                shard=distributed.mesh_batch_rows(mesh, t.batch_size, cfg.sharding_rules),
                cache_images=d.cache_images, num_threads=d.num_threads,
                worker_count=d.worker_count)
  if stage in ("backbone", "pretrain"):
    files = [p.strip() for p in str(d.pairs_json).split(",") if p.strip()]
    if not files:
      raise ValueError(f"config.data.pairs_json is required for mode {stage!r}")
    data = pairs_reader.read_pairs(files, d.pairs_image_root or None,
                                   check_images="decode" if d.on_error == "skip" else True,
                                   on_error=d.on_error)
    counts["skipped_pairs"] = data.num_skipped
    return pipeline.pretrain_pipeline(data, min_scale=d.min_scale, **common)
  split = imagecode.load_split(cfg, "train")
  if not split.examples:
    raise imagecode.ImagecodeDataError(
        f"{split.source}: no description to train on (all {split.num_skipped_descriptions} "
        f"were skipped: {split.skipped[0].entry!r}: {split.skipped[0].reason}, ...)"
        if split.skipped else f"{split.source}: no description to train on")
  counts["skipped_descriptions"] = split.num_skipped_descriptions
  return pipeline.imagecode_train_pipeline(split, drop_remainder=d.drop_remainder, **common)


def _augmentation(value) -> int | str:
  """Config string ('0'-'3' or 'none') -> the value data/augment.py takes."""
  value = str(value).strip()
  return int(value) if value.isdigit() else value


# ------------------------------------------------------------------ state

def _make_model(cfg, stage) -> tuple[ContextBlip, dict[str, Any] | None, str]:
  """(model, host params to start from or None, where they came from)."""
  init_path = cfg.init_workdir or cfg.init_checkpoint
  if cfg.init_workdir and cfg.init_checkpoint:
    raise ValueError("set only one of config.init_workdir and config.init_checkpoint")
  if not init_path:
    if stage in ("finetune1", "finetune2"):
      raise ValueError(f"mode {stage!r} needs config.init_workdir (previous stage) or "
                       "config.init_checkpoint (converted BLIP)")
    return build_model(cfg), None, ""
  source = param_dir.load_param_dir(init_path)
  model = build_model(cfg, source)
  return model, params_to_take(stage, source), source.path


def _sum_metrics(metrics_list: Sequence[dict]) -> dict[str, float]:
  """Mean of each metric over the logged steps ('correct'/'num_examples' summed)."""
  out: dict[str, float] = {}
  for k in metrics_list[0]:
    vals = [float(m[k]) for m in metrics_list]
    out[k] = float(np.sum(vals)) if k in ("correct", "num_examples") else float(np.mean(vals))
  return out


class _Eval:
  """Valid-set evaluation inside training (fine-tuning heads and pre-training zero-shot)."""

  def __init__(self, cfg, model, stage, mesh, state_shardings, workdir):
    self.head = EVAL_HEAD.get(stage)
    self.enabled = bool(self.head and cfg.data.imagecode_dir)
    if not self.enabled:
      return
    self.split = imagecode.load_split(cfg, "valid")
    if cfg.eval.max_sets:
      self.split = imagecode.first_sets(self.split, cfg.eval.max_sets)
    full = state_shardings.params
    self.shardings = scoring.head_params(full, model, self.head)
    self.evaluator = ev.Evaluator(model, self.head, cfg, mesh, self.shardings)
    self.out_dir = paths.join(workdir, wd.EVAL)
    self.model = model

  def __call__(self, state, name, writer, step) -> dict[str, Any]:
    params = scoring.head_params(state.params, self.model, self.head)
    return ev.evaluate_split(self.evaluator, params, self.split, self.out_dir, name, writer,
                             step)


def params_to_take(stage: str, source: param_dir.ParamDir) -> dict[str, Any]:
  """The groups of `source` that `stage` starts from (missing required groups raise)."""
  want = TAKE_FROM_PREVIOUS[stage]
  have = {k: v for k, v in source.params.items() if k in want}
  if "pretrained_blip" in want and "pretrained_blip" not in have:
    raise ValueError(f"{source.path}: no 'pretrained_blip' parameters to start {stage} from")
  if stage == "finetune2" and "prediction_layer" not in have:
    raise ValueError(f"{source.path}: stage 2 starts from a stage-1 workdir; no "
                     "'prediction_layer' found")
  return have


# ------------------------------------------------------------------ main loop

def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[Hook] = (),
                       built_from: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes, or reuses) one training stage in `workdir`; returns its summary.

  Before any work: the whole config is validated (`validate_config`), the workdir is checked
  (`workdir.check_workdir`: never a parameter directory, an export or a foreign directory)
  and locked for the run (`lock.hold_workdir`, released on return, on an exception and after
  SIGTERM). A previous run's files are resumed from, or refused, or moved aside by
  train.restart. `built_from` (the demo's fingerprints) is recorded in built_from.json; a
  workdir whose record differs was built from something else and starts over (its files
  moved to restarted.<time>/).
  """
  stage = cfg.mode
  if stage not in TRAIN_STAGES:
    raise ValueError(f"train_and_evaluate: mode {stage!r} is not a training stage "
                     f"{TRAIN_STAGES}")
  validate_config.validate(cfg)
  workdir = paths.abspath(workdir)
  wd.check_workdir(workdir, stage)
  with lock.hold_workdir(workdir):
    return _train_stage(cfg, workdir, stage, hooks, built_from)


def _restart_requested(cfg, workdir: str) -> bool:
  """train.restart, unless the previous run here was started by this very config with
  restart=True (a requeued restarted run resumes instead of starting over again)."""
  if not cfg.train.restart:
    return False
  path = paths.join(workdir, wd.CONFIG)
  if paths.isfile(path):
    with paths.open(path, encoding="utf-8") as f:
      if f.read() == cfg.to_json_best_effort(indent=1, sort_keys=True):
        distributed.log_main("%s: train.restart=True, but the run in this workdir was started "
                             "by this same config with restart=True: resuming it", workdir)
        return False
  return True


def _train_stage(cfg: ml_collections.ConfigDict, workdir: str, stage: str,
                 hooks: Sequence[Hook], built_from: dict[str, Any] | None) -> dict[str, Any]:
  """The stage in a checked, locked workdir."""
  stale = built_from is not None and wd.read_built_from(workdir) != built_from
  if stale and wd.move_previous_run(workdir):
    distributed.log_main("%s: built from other data or another config than this run's; "
                         "starting the stage over", workdir)
  elif _restart_requested(cfg, workdir):
    wd.move_previous_run(workdir)
  if built_from is not None:
    wd.write_built_from(workdir, built_from)
  done = wd.read_done(workdir)
  if done is not None:
    distributed.log_main("%s: stage %s already finished; reusing it (rerun with "
                         "--config.train.restart=True to train again)", workdir, stage)
    return done
  wd.write_config(workdir, cfg)
  previous = wd.previous_run(workdir)     # before the Checkpointer removes temporary steps
  t_start = time.time()
  model, given, source = _make_model(cfg, stage)
  mesh = shd.mesh_from_config(cfg)
  counts: dict[str, int] = {}
  data = train_pipeline(cfg, stage, model.config.blip.vision.image_size, mesh, counts)
  spe = data.steps_per_epoch
  total = int(cfg.train.num_steps or cfg.train.num_epochs * spe)
  rules = cfg.sharding_rules
  batch_abs = distributed.global_shapes(next(iter(data)), data.global_batch_size)
  parts = build_train_step(cfg, stage, model, mesh, batch_abs, spe)
  opt, init_fn, freeze, unreached = parts.opt, parts.init_fn, parts.freeze, parts.unreached
  abstract, state_sh, step_fn = parts.abstract, parts.state_shardings, parts.step_fn
  batch_sh = parts.batch_shardings
  if unreached:
    distributed.log_main("%s: %d parameters no loss reaches are frozen: %s", stage,
                         len(unreached), ", ".join(unreached))
  data_iter = iter(data)
  ckpt = checkpoints.Checkpointer(paths.join(workdir, wd.CKPT),
                                    save_every=cfg.train.save_every,
                                    max_to_keep=cfg.train.keep_checkpoints,
                                    corrupt_dir=paths.join(workdir, wd.CKPT_CORRUPT))
  meta: dict[str, Any] = {"best_acc": -1.0, "best_step": -1}
  if ckpt.all_steps():
    state, meta, _ = ckpt.restore_intact(abstract, data_iter)
    distributed.log_main("resumed %s from step %d", stage, int(state.step))
  elif previous:
    ckpt.close()
    raise wd.WorkdirError(
        f"{workdir}: a previous run left {'; '.join(previous)} but no checkpoint to resume "
        f"from (killed before its first save, or the checkpoints were removed). Not starting "
        f"from scratch over it: rerun with --config.train.restart=True (moves those files to "
        f"{workdir}/restarted.<time>/) or use a new --workdir")
  else:
    state, _ = steps.init_train_state(init_fn, jax.random.PRNGKey(cfg.seed), tx=opt.tx,
                                      freeze_rules=freeze, mesh=mesh, rules=rules, params=given,
                                      compiler_options=compilation.FAST_COMPILE)
    distributed.log_main("%s: initialised (%s)", stage, f"from {source}" if source else
                         "from scratch")
  if cfg.train.compile_report:
    step_fn, report = compilation.compile_step(step_fn, abstract, batch_abs, mesh=mesh,
                                         name=f"{stage} train_step")
  evaluator = _Eval(cfg, model, stage, mesh, state_sh, workdir)
  writer = MetricWriter(workdir, stage=stage, config=cfg, resume=True)  # + W&B (one run)
  run = StageRun(cfg, workdir, stage, model, evaluator, writer, spe, total)
  start = int(state.step)
  summary: dict[str, Any] = {"stage": stage, "steps": total, "steps_per_epoch": spe,
                             "init": source, "frozen_unreached": unreached, **counts}
  if start == 0 and counts:
    writer.write_scalars(0, {k: float(v) for k, v in counts.items()})
  progress = Progress(total, stage, initial=start, every=cfg.train.log_every)
  eval_every = cfg.train.eval_every_epochs * spe if cfg.train.eval_every_epochs else 0
  logged: list[dict] = []
  preempted = False
  finite = _FiniteCheck(mesh, stage, ckpt)
  try:
    with checkpoints.SigtermGuard() as guard:
      for step in range(start, total):
        batch = distributed.global_batch(next(data_iter), batch_sh)
        state, metrics = step_fn(state, batch)
        done_steps = step + 1
        finite.track(done_steps, metrics)
        if hooks or done_steps % cfg.train.log_every == 0 or done_steps == total:
          host = jax.tree.map(float, jax.device_get(metrics))
          logged.append(host)
          for h in hooks:
            h(done_steps, host)
          if done_steps % cfg.train.log_every == 0 or done_steps == total:
            writer.write_scalars(done_steps, _sum_metrics(logged))
            progress.update(done_steps - progress.count, loss=host["loss"])
            logged = []
        if eval_every and done_steps % eval_every == 0 and done_steps < total:
          finite.check()
          meta = _maybe_best(run, state, done_steps, meta)
        if ckpt.should_save(done_steps):
          finite.check()                  # a diverged state is never saved
          ckpt.save(done_steps, state, data_iter, meta=meta)
        # all processes stop at the same step, whichever of them got the signal
        if distributed.any_process(guard.requested):
          preempted = True
          finite.check()
          ckpt.save(done_steps, state, data_iter, meta=meta, force=True)
          break
    finite.check()                        # before the export and DONE.json
  except BaseException:
    writer.close(failed=True)             # the W&B run ends as failed
    raise
  finally:
    ckpt.close()
  if preempted:
    writer.close()
    distributed.log_main("%s: stopped on SIGTERM at step %d (checkpoint saved)", stage,
                         int(state.step))
    return {**summary, "preempted": True, "step": int(state.step)}
  with writer:                            # closed (failed) on an exception here too
    summary.update(_finish(run, state, meta))
    summary["seconds"] = round(time.time() - t_start, 1)
  wd.write_done(workdir, summary)
  return summary


class TrainingDivergedError(RuntimeError):
  """A non-finite loss or gradient norm; the message names the step and the last good
  checkpoint."""


class _FiniteCheck:
  """Remembers, on the devices, the first step whose loss or gradient norm is not finite
  (no host sync per step); `check` (before every save, export and best-epoch evaluation)
  raises TrainingDivergedError naming it."""

  def __init__(self, mesh, stage: str, ckpt: checkpoints.Checkpointer):
    rep = shd.replicated(mesh)
    self.stage, self.ckpt = stage, ckpt
    self.first = jax.device_put(np.full((3,), -1.0, np.float32), rep)   # step, loss, gnorm

    def track(first, step, loss, gnorm):
      bad = (first[0] < 0) & ~(jnp.isfinite(loss) & jnp.isfinite(gnorm))
      now = jnp.stack([step, loss, gnorm]).astype(jnp.float32)
      return jnp.where(bad, now, first)
    self._track = jax.jit(track, out_shardings=rep)

  def track(self, step: int, metrics: dict) -> None:
    self.first = self._track(self.first, np.float32(step), metrics["loss"],
                             metrics["grad_norm"])

  def check(self) -> None:
    step, loss, gnorm = (float(x) for x in np.asarray(jax.device_get(self.first)))
    if step < 0:
      return
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    good = (f"the last good checkpoint is {paths.join(self.ckpt.directory, str(last))}"
            if last is not None else "no checkpoint was saved yet")
    raise TrainingDivergedError(
        f"{self.stage}: non-finite {'loss' if not np.isfinite(loss) else 'gradient norm'} at "
        f"step {int(step)} (loss={loss}, grad_norm={gnorm}): training stopped; {good}; no "
        f"export/ or DONE.json was written. Lower the learning rate (config.optim) or check "
        f"the data, then rerun to resume from that checkpoint")


def _init_tree(rng, *, model, tree, kernel_scale: float = 1.0):
  """Boxed parameters of `tree`; with `kernel_scale` != 1 the 2-D kernels of the ViT and the
  text encoder (stacked [L, in, out] under scanned layers) are multiplied by it (BERT's
  N(0, 0.02) suits width 768: at width 64 the [CLS]/[ENC] output barely depends on the other
  tokens and a from-scratch model does not learn ITM in a few hundred steps)."""
  params = init_params(model, rng, tree)
  if kernel_scale == 1.0:
    return params

  def scale(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    stacked = isinstance(leaf, nn.Partitioned) and tuple(leaf.names[:1]) == ("layers",)
    hit = (names[:1] == ["pretrained_blip"] and names[-1] == "kernel"
           and value.ndim == 2 + stacked
           and any(n in ("text_encoder", "visual_encoder") for n in names))
    if not hit:
      return leaf
    if isinstance(leaf, nn.Partitioned):
      return leaf.replace_boxed(value * kernel_scale)
    return value * kernel_scale
  return jax.tree_util.tree_map_with_path(scale, params,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass
class TrainStep:
  """What `build_train_step` makes for a stage: its optimizer, parameter init, freeze rules,
  the abstract state (ShapeDtypeStructs with shardings, nothing allocated) and the jitted step."""
  opt: optim.Optimizer
  init_fn: Callable[[jax.Array], Any]
  freeze: list[tuple[str, str]]
  unreached: list[str]              # trainable leaves no loss reaches, frozen (freeze_unreached)
  abstract: Any                     # TrainState of ShapeDtypeStructs
  state_shardings: Any
  batch_shardings: Any
  step_fn: Any                      # jit(train_step)


def build_train_step(cfg: ml_collections.ConfigDict, stage: str, model: ContextBlip,
                     mesh: jax.sharding.Mesh, batch_abs: Any, steps_per_epoch: int) -> TrainStep:
  """The stage's jitted training step and its abstract state on `mesh`, from the config and
  the global batch's shapes (`batch_abs`: ShapeDtypeStructs) alone: used by the stage itself
  and by the ahead-of-time planner (`run/plan.py`), which has no data and no devices."""
  rules = cfg.sharding_rules
  opt = optim.make_optimizer(cfg.optim, steps_per_epoch)
  init_fn = functools.partial(_init_tree, model=model, tree=PARAM_TREE[stage],
                              kernel_scale=cfg.model.init_kernel_scale)
  loss_fn = functools.partial(objectives.LOSSES[LOSS[stage]], model=model,
                              cfg=_objective_cfg(cfg), train=True)
  freeze, unreached = [tuple(r) for r in cfg.freeze], []
  if cfg.freeze_unreached:          # leaves no loss reaches stay as they are (torch: grad None)
    freeze, unreached = steps.stage_freeze_rules(loss_fn, init_fn, freeze, batch_abs,
                                                 mesh=mesh, rules=rules)
  abstract, state_sh, _ = steps.abstract_train_state(init_fn, tx=opt.tx, freeze_rules=freeze,
                                                     mesh=mesh, rules=rules)
  batch_sh = shd.batch_shardings(batch_abs, mesh, rules)
  reduction = "sum" if stage.startswith("finetune") else "mean"
  step_fn = steps.make_train_step(loss_fn, opt, state_sh, batch_sh, mesh=mesh, rules=rules,
                                  accum_steps=cfg.train.accum_steps, reduction=reduction,
                                  compiler_options=compilation.compiler_options(cfg))
  return TrainStep(opt, init_fn, freeze, unreached, abstract, state_sh, batch_sh, step_fn)


def _objective_cfg(cfg) -> objectives.ObjectiveConfig:
  """config.objective -> ObjectiveConfig (group sizes: 0 in the config = the whole batch)."""
  o = cfg.objective.to_dict()
  for k in ("negatives_group_size", "mask_group_size"):
    o[k] = o[k] or None
  return objectives.as_objective_config(o)


@dataclasses.dataclass
class StageRun:
  """One stage's run, as the end-of-epoch and end-of-stage steps need it."""
  cfg: ml_collections.ConfigDict
  workdir: str
  stage: str
  model: ContextBlip
  evaluator: _Eval
  writer: MetricWriter
  steps_per_epoch: int
  total_steps: int

  def export(self, state, step: int, **meta) -> None:
    """<workdir>/export: the stage's parameters for the next stage."""
    wd.export_params(self.workdir, state.params, self.stage, self.model.config, step=step,
                     vocab_path=tokenizer.VOCAB_PATH,
                     init=self.cfg.init_workdir or self.cfg.init_checkpoint, **meta)


def _maybe_best(run: StageRun, state, step: int, meta: dict[str, Any]) -> dict[str, Any]:
  """Valid accuracy at an epoch boundary; exports the parameters when it is the best."""
  if not run.evaluator.enabled:
    return meta
  epoch = step // run.steps_per_epoch
  report = run.evaluator(state, f"{run.evaluator.head}_valid_epoch{epoch}", run.writer, step)
  acc = report["all"]["acc"]
  meta = dict(meta)
  if run.cfg.train.select_best and acc > meta.get("best_acc", -1.0):
    meta.update(best_acc=acc, best_step=step)
    run.export(state, step, valid_acc=acc)
    distributed.log_main("new best valid accuracy %.4f at step %d: exported", acc, step)
  return meta


def _finish(run: StageRun, state, meta: dict[str, Any]) -> dict[str, Any]:
  """Final valid evaluation, the export for the next stage (best or last), the summary."""
  cfg, evaluator, total = run.cfg, run.evaluator, run.total_steps
  out: dict[str, Any] = {"final_step": int(state.step)}
  if evaluator.enabled:
    report = evaluator(state, f"{evaluator.head}_valid", run.writer, total)
    out["valid"] = _compact(report)
    acc = report["all"]["acc"]
    # train.validate_last_epoch=False (the reference): the last parameters are reported, not
    # a candidate for the best export
    if (cfg.train.select_best and cfg.train.validate_last_epoch
        and acc > meta.get("best_acc", -1.0)):
      meta = {**meta, "best_acc": acc, "best_step": total}
      run.export(state, total, valid_acc=acc)
    out["best_valid_acc"], out["best_step"] = meta.get("best_acc"), meta.get("best_step")
    if cfg.eval.visualize and jax.process_index() == 0:
      from contextblip_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
      params = scoring.head_params(state.params, run.model, evaluator.head)
      out["figures"] = visualize.attention_figures(
          run.model, params, evaluator.split,
          paths.join(run.workdir, wd.EVAL, f"{evaluator.head}_attention"),
          num_sets=cfg.eval.visualize, max_length=cfg.data.max_length,
          mask_ratio=cfg.objective.mask_ratio or masking.DEFAULT_MASK_RATIO)
  if not (cfg.train.select_best and evaluator.enabled) or meta.get("best_step", -1) < 0:
    run.export(state, total)          # (also when no epoch was validated for selection)
  out["export"] = paths.join(run.workdir, wd.EXPORT)
  return out


def _compact(report: dict[str, Any]) -> dict[str, Any]:
  keep = ("all", "video", "static", "tags", "skipped_descriptions", "files", "head")
  return {k: report[k] for k in keep if k in report}
