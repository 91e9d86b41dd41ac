"""The training state and the one implementation of freezing.

Which parameters train is configuration: an ordered list of `(regex, 'train' | 'freeze')` pairs
matched (`re.fullmatch`) against '/'-joined parameter paths such as
`pretrained_blip/visual_encoder/blocks_0/attn/qkv/kernel`; the first match wins and a path that
no rule matches is an error. `partition_params` splits a parameter tree into two disjoint
nested dicts (trainable, frozen) that `merge_params` joins again. The optimizer only ever sees
the trainable tree, so frozen parameters carry no optimizer state and are never updated, and
gradients are taken only with respect to the trainable tree (no backward pass through frozen
sub-networks whose inputs do not depend on trainable parameters).

Parameters no loss reaches (`unreached_paths`, `freeze_unreached`): a trainable leaf that no
differentiable path connects to the loss (stage 1 never calls `itm_head`, `vision_proj` or
`text_proj`) has no gradient in the reference (torch leaves `.grad` None, and Adam / AdamW
skip it), while a JAX gradient is a zero array that coupled-L2 decay (stage 1) or decoupled
AdamW decay (pre-training) would turn into an update. The training loop therefore finds those
leaves from the stage's loss (a dependence analysis of the loss's JVP program: a tangent that
never reaches the loss's tangent is a leaf torch would leave without a gradient) and prepends
one exact ('freeze') rule per leaf to the configured rules (`config.freeze_unreached`), so
they stay bit-identical and carry no optimizer state. A leaf with a structural path whose
gradient happens to be numerically zero (a shared bias under a softmax) still trains, as in
torch.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import flax.struct
import jax
from flax import traverse_util
from jax.extend import core as jcore

Params = Any
FreezeRules = Sequence[tuple[str, str]]

_log = logging.getLogger(__name__)


def _flatten(tree: Params) -> dict[str, Any]:
  if not isinstance(tree, dict):
    raise TypeError(f"parameters must be a nested dict, got {type(tree).__name__}")
  return traverse_util.flatten_dict(tree, sep="/")


def _compile_rules(rules: FreezeRules) -> list[tuple[re.Pattern, str, str]]:
  out = []
  for i, entry in enumerate(rules):
    if len(entry) != 2:
      raise ValueError(f"freeze rule #{i} must be (regex, 'train'|'freeze'), got {entry!r}")
    pattern, kind = entry
    if kind not in ("train", "freeze"):
      raise ValueError(f"freeze rule #{i} ({pattern!r}): kind must be 'train' or 'freeze', "
                       f"got {kind!r}")
    out.append((re.compile(pattern), kind, pattern))
  return out


def trainable_paths(params: Params, rules: FreezeRules) -> dict[str, bool]:
  """{'/'-joined path: True if it trains} for every leaf; first matching rule wins."""
  compiled = _compile_rules(rules)
  used, result = set(), {}
  for path in _flatten(params):
    for regex, kind, pattern in compiled:
      if regex.fullmatch(path):
        result[path] = kind == "train"
        used.add(pattern)
        break
    else:
      raise ValueError(f"parameter {path!r} matches no freeze rule; rules: {list(rules)}. "
                       "End the list with ('.*', 'train') or ('.*', 'freeze').")
  for _, _, pattern in compiled:
    if pattern not in used:
      _log.info("freeze rule %r matches no parameter", pattern)
  return result


def partition_params(params: Params, rules: FreezeRules) -> tuple[Params, Params]:
  """Nested dict -> (trainable, frozen): two disjoint nested dicts, same paths as `params`."""
  flags = trainable_paths(params, rules)
  flat = _flatten(params)
  trainable = {k: v for k, v in flat.items() if flags[k]}
  frozen = {k: v for k, v in flat.items() if not flags[k]}
  return (traverse_util.unflatten_dict(trainable, sep="/"),
          traverse_util.unflatten_dict(frozen, sep="/"))


def merge_params(trainable: Params, frozen: Params) -> Params:
  """Inverse of `partition_params`; raises on a path present in both."""
  a, b = _flatten(trainable), _flatten(frozen)
  both = sorted(set(a) & set(b))
  if both:
    raise ValueError(f"paths both trainable and frozen: {both[:5]}")
  return traverse_util.unflatten_dict({**a, **b}, sep="/")


# ----------------------------------------------------------------------------- reachability

# Calls whose sub-program maps its inputs and outputs one to one are followed precisely; any
# other equation (scan, while, cond, custom derivative rules, ...) is taken as connecting each
# of its inputs to each of its outputs (conservative: a leaf is never wrongly found unreached).
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint")


def _sub_jaxpr(eqn) -> Any:
  """The one-to-one sub-program of a call-like equation, or None."""
  if eqn.primitive.name not in _CALLS:
    return None
  for key in ("jaxpr", "call_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      sub = sub.jaxpr
    if (isinstance(sub, jcore.Jaxpr) and len(sub.invars) == len(eqn.invars)
        and len(sub.outvars) == len(eqn.outvars)):
      return sub
  return None


def _sources(jaxpr, in_sets: Sequence[int]) -> list[int]:
  """Forward dependence through `jaxpr`: each input carries a bit set (a Python int) of the
  sources it depends on; returns the bit set of every output."""
  env: dict[Any, int] = {}

  def read(v) -> int:
    return 0 if isinstance(v, jcore.Literal) else env.get(v, 0)
  for v, bits in zip(jaxpr.invars, in_sets):
    env[v] = bits
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      outs = _sources(sub, ins)
    else:
      union = 0
      for bits in ins:
        union |= bits
      outs = [union] * len(eqn.outvars)
    for v, bits in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = bits
  return [read(v) for v in jaxpr.outvars]


def unreached_paths(loss_fn, trainable: Params, frozen: Params, *args) -> list[str]:
  """'/'-paths of the leaves of `trainable` that no differentiable path connects to the loss.

  `loss_fn(params, *args) -> (loss, aux)` (the training steps' signature); every argument
  may be abstract (`jax.ShapeDtypeStruct`): only programs are traced, nothing runs. The
  loss's JVP with respect to `trainable` is traced and each tangent input is followed forward
  through the program (stop_gradient, integer outputs and unused branches carry no tangent,
  so JAX leaves no equation connecting them).
  """
  _flatten(trainable)
  with_paths = jax.tree_util.tree_flatten_with_path(trainable)[0]
  if not with_paths:
    return []
  names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in with_paths]

  def tangent_of_loss(tr, tangents, fr, rest):
    f = lambda t: loss_fn(merge_params(t, fr), *rest)[0]
    return jax.jvp(f, (tr,), (tangents,))[1]
  jaxpr = jax.make_jaxpr(tangent_of_loss)(trainable, trainable, frozen, args).jaxpr
  n = len(names)
  # inputs: the n primal leaves, the n tangents (both in tree_leaves order), then the rest
  in_sets = [0] * n + [1 << i for i in range(n)]
  (reached,) = _sources(jaxpr, in_sets + [0] * (len(jaxpr.invars) - 2 * n))
  return [name for i, name in enumerate(names) if not reached >> i & 1]


def freeze_unreached(rules: FreezeRules, unreached: Sequence[str]) -> list[tuple[str, str]]:
  """`rules` with one exact freeze rule per unreached path in front (first match wins)."""
  return [(re.escape(p), "freeze") for p in unreached] + [tuple(r) for r in rules]


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree; checkpoint it whole).

  step:      int32 scalar, number of optimizer updates applied so far.
  trainable: nested dict of the parameters the optimizer updates.
  frozen:    nested dict of the parameters held fixed (no optimizer state).
  opt_state: optax state of `trainable` only.
  rng:       base PRNG key (raw uint32[2]); step randomness is fold_in(rng, step).
  """
  step: jax.Array
  trainable: Params
  frozen: Params
  opt_state: Any
  rng: jax.Array

  @property
  def params(self) -> Params:
    """The full parameter tree the model applies."""
    return merge_params(self.trainable, self.frozen)
