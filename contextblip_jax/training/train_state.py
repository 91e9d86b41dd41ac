"""The training state and the one implementation of freezing.

Which parameters train is configuration: an ordered list of `(regex, 'train' | 'freeze')` pairs
matched (`re.fullmatch`) against '/'-joined parameter paths such as
`pretrained_blip/visual_encoder/blocks_0/attn/qkv/kernel`; the first match wins and a path that
no rule matches is an error. `partition_params` splits a parameter tree into two disjoint
nested dicts (trainable, frozen) that `merge_params` joins again. The optimizer only ever sees
the trainable tree, so frozen parameters carry no optimizer state and are never updated, and
gradients are taken only with respect to the trainable tree (no backward pass through frozen
sub-networks whose inputs do not depend on trainable parameters).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import flax.struct
import jax
from flax import traverse_util

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
