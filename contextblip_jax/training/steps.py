"""Sharded training machinery: state initialisation, train/eval steps, ahead-of-time compile.

A loss function has one signature (the objectives module binds model/config/train with
`functools.partial`):

  loss_fn(params, batch, rng) -> (scalar float32 loss, metrics dict of scalars)

Typical use (see `tests/test_steps.py`):

  mesh = sharding.make_mesh({"data": -1})
  opt = optim.make_optimizer(optim.default_config("pretrain"), steps_per_epoch)
  init_fn = lambda rng: init_params(model, rng, "pretrain")   # boxed params (models/contextblip)
  state, shardings = init_train_state(init_fn, jax.random.PRNGKey(42), tx=opt.tx,
                                      freeze_rules=[("pretrained_blip/.*", "freeze"),
                                                    (".*", "train")], mesh=mesh)
  step = make_train_step(loss_fn, opt, shardings, batch_shardings(batch, mesh), mesh=mesh)
  step, report = compilation.compile_step(step, state, batch, mesh=mesh)  # memory, FLOPs
  state, metrics = step(state, batch)

Gradient accumulation (`accum_steps=a`): the batch's leading dimension B is split into `a`
micro-batches (micro-batch i = examples i, i+a, i+2a, ..., so every micro-batch keeps its
examples spread over all data-parallel devices), gradients, losses and metrics are summed with
`lax.scan`, then:
  reduction="sum"  (fine-tuning: the loss is a sum over examples)  -> loss and gradients as is;
  reduction="mean" (pre-training: the loss is a batch mean)        -> both divided by a;
  metrics named in `sum_metrics` (counts: "correct", "num_examples") stay sums, all other
  metrics (means, accuracies) are divided by a; where the counts are there, "accuracy" and
  "loss_mean" are then taken from the sums (correct / num_examples, loss / num_examples), so
  micro-batches with fewer real rows (a padded last batch) weigh by their rows.
For a deterministic loss that decomposes over examples, both give exactly the un-accumulated
step (tested). Losses that couple examples (in-batch hard negatives) then see a pool of B/a
examples, as under per-device sampling, and micro-batch i draws its randomness from
fold_in(step_key, i) instead of step_key.

Compute precision is the model's: `ContextBlip(cfg, dtype=jnp.bfloat16)` computes in bfloat16
while the state keeps float32 parameters and optimizer moments and the losses stay float32
(tested). The logical-axis rules and the mesh are active while the step is traced, so every
`nn.with_logical_constraint` in the model resolves to mesh axes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding

from contextblip_jax.parallel import sharding as shd
from contextblip_jax.training.optim import Optimizer
from contextblip_jax.training.train_state import (FreezeRules, TrainState, freeze_unreached,
                                         merge_params, partition_params, unreached_paths)

# Metrics that are sums over the examples of a batch (summed over micro-batches, not averaged).
SUM_METRICS = ("loss", "correct", "num_examples")

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- state

def _opt_state_shardings(opt_abstract: Any, param_shardings: Any, param_abstract: Any,
                         mesh: jax.sharding.Mesh) -> Any:
  """Each optimizer-state leaf whose key path ends with a parameter path (same shape) takes
  that parameter's sharding; everything else (step counts, ...) is replicated."""
  sh = traverse_util.flatten_dict(param_shardings)
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(param_abstract).items()}
  depth = max((len(k) for k in sh), default=0)

  def one(path, leaf):
    keys = tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
    for n in range(min(depth, len(keys)), 0, -1):
      k = keys[-n:]
      if k in sh and shapes[k] == leaf.shape:
        return sh[k]
    return shd.replicated(mesh)
  return jax.tree_util.tree_map_with_path(one, opt_abstract)


def abstract_train_state(init_fn: Callable[[jax.Array], Any], *, tx: optax.GradientTransformation,
                         freeze_rules: FreezeRules, mesh: jax.sharding.Mesh,
                         rules=None) -> tuple[TrainState, TrainState, Any]:
  """Shapes and shardings of the state, with nothing allocated.

  Args:
    init_fn: rng -> *boxed* parameter tree (e.g. `lambda r: model.init(r, ...)["params"]`).
  Returns:
    (abstract TrainState of ShapeDtypeStructs carrying their shardings, TrainState of
     NamedShardings, boxed abstract params (logical axis names)).
  """
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  p_sh = shd.param_shardings(boxed, mesh, rules)
  p_abs = nn.unbox(boxed)
  tr_abs, fr_abs = partition_params(p_abs, freeze_rules)
  tr_sh, fr_sh = partition_params(p_sh, freeze_rules)
  opt_abs = jax.eval_shape(tx.init, tr_abs)
  opt_sh = _opt_state_shardings(opt_abs, tr_sh, tr_abs, mesh)
  rep = shd.replicated(mesh)
  shardings = TrainState(step=rep, trainable=tr_sh, frozen=fr_sh, opt_state=opt_sh, rng=rep)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=tr_abs,
                        frozen=fr_abs, opt_state=opt_abs,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings, boxed


def _place_given(abstract: Any, given: Any, shardings: Any) -> dict[str, jax.Array]:
  """Flat {'/'-path: array} of the (possibly partial) tree `given`, each leaf checked against
  the model's abstract tree (unknown path or shape mismatch -> error), cast to the parameter
  dtype and placed with device_put onto its target sharding."""
  flat = traverse_util.flatten_dict(abstract, sep="/")
  flat_sh = traverse_util.flatten_dict(shardings, sep="/")
  given_flat = traverse_util.flatten_dict(given, sep="/")
  unknown = sorted(set(given_flat) - set(flat))
  if unknown:
    raise ValueError(f"given parameters not in the model: {unknown[:10]}"
                     f"{' ...' if len(unknown) > 10 else ''}")
  out = {}
  for k, v in given_flat.items():
    if tuple(np.shape(v)) != tuple(flat[k].shape):
      raise ValueError(f"given parameter {k!r} has shape {np.shape(v)}, the model expects "
                       f"{flat[k].shape}")
    out[k] = _put(v, flat[k].dtype, flat_sh[k])
  return out


def _put(value: Any, dtype, sharding: NamedSharding) -> jax.Array:
  """A jax.Array is resharded with device_put; host data goes straight to each device's shard
  (make_array_from_callback: nothing whole on one device; works across processes)."""
  if isinstance(value, jax.Array):
    return jax.device_put(value.astype(dtype), sharding)
  arr = np.asarray(value, dtype)
  return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def init_train_state(init_fn: Callable[[jax.Array], Any], rng: jax.Array, *,
                     tx: optax.GradientTransformation, freeze_rules: FreezeRules,
                     mesh: jax.sharding.Mesh, rules=None, params: Any | None = None,
                     compiler_options: dict | None = None) -> tuple[TrainState, TrainState]:
  """Shape-first, sharded initialisation of the training state.

  eval_shape(init) -> shardings from the logical axis names -> jit(init, out_shardings) (no
  parameter ever exists whole on one device) -> jit(tx.init, out_shardings) for the optimizer
  state of the trainable parameters only.

  Args:
    init_fn: rng -> boxed parameter tree.
    rng: raw PRNG key; split into the init key and the state's training key.
    params: optional (partial) tree of given values (converted checkpoint, previous stage):
      they are placed with device_put onto their shardings, and only the leaves not given are
      initialised (the jitted init returns only those; XLA prunes the rest).
    compiler_options: XLA options for the init programs (e.g. a low optimisation level).
  Returns:
    (state, shardings): the TrainState and the TrainState of its NamedShardings.
  """
  abstract, shardings, _ = abstract_train_state(init_fn, tx=tx, freeze_rules=freeze_rules,
                                                mesh=mesh, rules=rules)
  init_rng, train_rng = jax.random.split(rng)
  full_abs = merge_params(abstract.trainable, abstract.frozen)
  full_sh = merge_params(shardings.trainable, shardings.frozen)
  given = {} if params is None else _place_given(full_abs, params, full_sh)
  missing = [k for k in traverse_util.flatten_dict(full_abs, sep="/") if k not in given]
  flat_sh = traverse_util.flatten_dict(full_sh, sep="/")

  def init_missing(r):
    flat = traverse_util.flatten_dict(nn.unbox(init_fn(r)), sep="/")
    return {k: flat[k] for k in missing}

  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.get_rules(rules)):
    fresh = {}
    if missing:
      fresh = jax.jit(init_missing, out_shardings={k: flat_sh[k] for k in missing},
                      compiler_options=compiler_options)(init_rng)
    trainable, frozen = partition_params(
        traverse_util.unflatten_dict({**given, **fresh}, sep="/"), freeze_rules)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state,
                        compiler_options=compiler_options)(trainable)
  rep = shd.replicated(mesh)
  if jnp.issubdtype(train_rng.dtype, jax.dtypes.prng_key):
    train_rng = jax.random.key_data(train_rng)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), trainable=trainable,
                     frozen=frozen, opt_state=opt_state, rng=jax.device_put(train_rng, rep))
  return state, shardings


def stage_freeze_rules(loss_fn: LossFn, init_fn: Callable[[jax.Array], Any],
                       freeze_rules: FreezeRules, batch: Any, *, mesh: jax.sharding.Mesh,
                       rules=None) -> tuple[list[tuple[str, str]], list[str]]:
  """The freeze rules a stage trains with: `freeze_rules` plus, in front, one exact freeze
  rule per trainable leaf that no differentiable path connects to `loss_fn`'s loss
  (`train_state.unreached_paths`; torch leaves their gradient None and its optimizer skips
  them). Nothing is allocated: the parameters and `batch` are abstract.

  Returns (rules, the '/'-paths frozen for that reason).
  """
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  trainable, frozen = partition_params(nn.unbox(boxed), freeze_rules)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  fn = shd.with_mesh_rules(loss_fn, mesh, rules)
  paths = unreached_paths(fn, trainable, frozen, abstract,
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
  return freeze_unreached(freeze_rules, paths), paths


# ----------------------------------------------------------------------------- steps

def _micro_batches(batch: Any, accum_steps: int) -> Any:
  """[B, ...] -> [a, B/a, ...] with micro-batch i = examples i, i+a, ... (strided)."""
  def split(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f"batch dimension {b} is not divisible by accum_steps={accum_steps}")
    y = x.reshape((b // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))
  return jax.tree.map(split, batch)


def loss_and_grads(trainable: Any, frozen: Any, batch: Any, rng: jax.Array, *, loss_fn: LossFn,
                   accum_steps: int = 1, reduction: str = "mean",
                   sum_metrics: Sequence[str] = SUM_METRICS):
  """((loss, metrics), grads) with gradients w.r.t. `trainable` only.

  With accumulation the loss and gradients follow `reduction`; the metrics named in
  `sum_metrics` (counts, sums over examples) are summed over micro-batches and all other
  metrics (means, accuracies) are averaged.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

  def f(tr, mb, r):
    return loss_fn(merge_params(tr, frozen), mb, r)
  grad_fn = jax.value_and_grad(f, has_aux=True)
  if accum_steps == 1:
    return grad_fn(trainable, batch, rng)

  micro = _micro_batches(batch, accum_steps)
  first = jax.tree.map(lambda x: x[0], micro)
  out_shape = jax.eval_shape(grad_fn, trainable, first, rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

  def body(acc, xs):
    i, mb = xs
    out = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, acc, out), None
  (loss, metrics), grads = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))[0]
  if reduction == "mean":
    loss, grads = loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)
  metrics = {k: v if k in sum_metrics else v / accum_steps for k, v in metrics.items()}
  if "num_examples" in metrics:
    count = jnp.maximum(metrics["num_examples"], 1.0)
    if "correct" in metrics and "accuracy" in metrics:
      metrics["accuracy"] = metrics["correct"] / count
    if reduction == "sum" and "loss_mean" in metrics:
      metrics["loss_mean"] = loss / count
  return (loss, metrics), grads


def train_step(state: TrainState, batch: Any, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, accum_steps: int = 1, reduction: str = "mean",
               sum_metrics: Sequence[str] = SUM_METRICS,
               schedules: Mapping[str, Callable] | None = None) -> tuple[TrainState, dict]:
  """One optimizer update. Randomness: fold_in(state.rng, state.step). Pure; jit it with
  `make_train_step`."""
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, metrics), grads = loss_and_grads(state.trainable, state.frozen, batch, rng,
                                          loss_fn=loss_fn, accum_steps=accum_steps,
                                          reduction=reduction, sum_metrics=sum_metrics)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  metrics = dict(metrics)
  metrics["loss"] = loss
  metrics["grad_norm"] = optax.tree.norm(grads)
  for name, s in (schedules or {}).items():
    metrics[name] = jnp.asarray(s(state.step), jnp.float32)
  new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
  return new, metrics


def eval_step(state: TrainState, batch: Any, *, loss_fn: LossFn) -> dict:
  """Loss and metrics without an update (bind `train=False` into `loss_fn`)."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss, metrics = loss_fn(state.params, batch, rng)
  return {**metrics, "loss": loss}


def make_train_step(loss_fn: LossFn, optimizer: Optimizer | optax.GradientTransformation,
                    state_shardings: TrainState, batch_shardings: Any, *,
                    mesh: jax.sharding.Mesh, rules=None, accum_steps: int = 1,
                    reduction: str = "mean", sum_metrics: Sequence[str] = SUM_METRICS,
                    donate: bool = True, compiler_options: dict | None = None):
  """jit(train_step) with explicit in/out shardings; the state argument is donated."""
  if isinstance(optimizer, Optimizer):
    tx, schedules = optimizer.tx, optimizer.schedules
  else:
    tx, schedules = optimizer, None
  fn = functools.partial(train_step, loss_fn=loss_fn, tx=tx, accum_steps=accum_steps,
                         reduction=reduction, sum_metrics=sum_metrics, schedules=schedules)
  return jax.jit(shd.with_mesh_rules(fn, mesh, rules),
                 in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, shd.replicated(mesh)),
                 donate_argnums=(0,) if donate else (), compiler_options=compiler_options)


def make_eval_step(loss_fn: LossFn, state_shardings: TrainState, batch_shardings: Any, *,
                   mesh: jax.sharding.Mesh, rules=None, compiler_options: dict | None = None):
  """jit(eval_step) with explicit in/out shardings (nothing donated)."""
  fn = functools.partial(eval_step, loss_fn=loss_fn)
  return jax.jit(shd.with_mesh_rules(fn, mesh, rules), in_shardings=(state_shardings, batch_shardings),
                 out_shardings=shd.replicated(mesh), compiler_options=compiler_options)
