"""Stacks of identical transformer blocks: remat policies, `nn.scan`, and the two parameter
layouts with the one conversion between them.

Every stack of identical blocks (ViT `blocks`, BERT `layer` of the text encoder and the TMIM
decoder, the context encoder's `transformer`) is held in one of two layouts, chosen by
`scan_layers` of its VisionConfig / TextConfig (models/variants.py):

  unscanned  one subtree per block, `blocks_0` .. `blocks_{L-1}` (the checkpoint's names); the
             blocks are unrolled in the compiled program
  scanned    one subtree `blocks` whose leaves carry a leading layer axis [L, ...] (logical
             axis `LAYER_AXIS`, replicated by the rules in parallel/sharding.py); `nn.scan` runs
             one compiled block body L times (much shorter compiles)

The math is the same: a tree converted by `to_layout` gives the same outputs in either layout
(tests/test_scan_layers.py). `remat` (`remat` of the same configs: a name of REMAT_POLICIES)
recomputes each block's activations in the backward pass instead of keeping them.

  to_layout(tree, scan=True)     unscanned -> scanned (a no-op for stacks already scanned)
  to_layout(tree, scan=False)    scanned -> unscanned
  is_scanned(tree)               whether a tree holds a scanned stack

`to_layout` takes host NumPy trees (parameter directories), jax arrays, ShapeDtypeStructs and
boxed `nn.Partitioned` trees (the layer axis name is added / removed).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Names of the stacked submodules; unscanned they are `{name}_{i}`.
STACK_NAMES = ("blocks", "layer", "transformer")
LAYER_AXIS = "layers"       # logical name of the leading axis of scanned parameters

# config name -> jax.checkpoint policy ('none': no remat; 'full': save nothing, recompute all).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_INDEXED = re.compile(r"^(%s)_(\d+)$" % "|".join(STACK_NAMES))


def check_remat(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; known: {sorted(REMAT_POLICIES)}")
  return policy


def remat(cls: type[nn.Module], policy: str, static_argnums: Sequence[int] = (),
          prevent_cse: bool = True) -> type[nn.Module]:
  """`cls` with its `__call__` rematerialised under `policy` ('none': `cls` itself).

  static_argnums count `self` as 0 (Python values such as `deterministic`)."""
  if check_remat(policy) == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[policy], static_argnums=tuple(static_argnums),
                  prevent_cse=prevent_cse)


def scanned(cls: type[nn.Module], length: int, *, policy: str, static_argnums: Sequence[int],
            in_axes: tuple[Any, ...], methods: Mapping[str, tuple[Any, ...]] | None = None
            ) -> type[nn.Module]:
  """`cls` (a block whose `__call__(carry, *args) -> (carry, out)`) scanned `length` times.

  Parameters get a leading [length] axis named LAYER_AXIS, each block its own params and
  dropout keys. `in_axes` of the arguments after the carry (`nn.broadcast` or 0 = one slice
  per block); `methods`: other scanned methods of `cls` -> their in_axes.
  """
  body = remat(cls, policy, static_argnums, prevent_cse=False)   # scan already blocks CSE
  common = dict(variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                length=length, metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
  per_method = {"__call__": dict(common, in_axes=in_axes)}
  for name, axes in (methods or {}).items():
    per_method[name] = dict(common, in_axes=axes)
  return nn.scan(body, methods=per_method)


def unstack_outputs(stacked: jax.Array | None) -> tuple[jax.Array, ...]:
  """Per-block outputs [L, ...] of a scan -> a tuple of L arrays (() for None)."""
  if stacked is None:
    return ()
  return tuple(stacked[i] for i in range(stacked.shape[0]))


# ------------------------------------------------------------------ parameter layouts

def is_scanned(tree: Any) -> bool:
  """Whether `tree` (nested dicts) holds a scanned stack (a subtree named in STACK_NAMES)."""
  if not isinstance(tree, Mapping):
    return False
  return any((k in STACK_NAMES and isinstance(v, Mapping)) or is_scanned(v)
             for k, v in tree.items())


def to_layout(tree: Any, scan: bool) -> Any:
  """`tree` with every stack of blocks in the scanned (`scan`) or unscanned layout.

  Stacks already in the target layout are left as they are; other subtrees are copied
  unchanged. Raises ValueError on a stack whose block indices are not 0..L-1.
  """
  if not isinstance(tree, Mapping):
    return tree
  out: dict[str, Any] = {}
  groups: dict[str, dict[int, Any]] = {}
  for key, value in tree.items():
    m = _INDEXED.match(key)
    if scan and m and isinstance(value, Mapping):
      groups.setdefault(m.group(1), {})[int(m.group(2))] = value
    elif not scan and key in STACK_NAMES and isinstance(value, Mapping):
      for i, block in enumerate(_unstack(value)):
        out[f"{key}_{i}"] = block
    else:
      out[key] = to_layout(value, scan)
  for name, blocks in groups.items():
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f"stack {name!r}: block indices {sorted(blocks)} are not 0..L-1")
    if name in out:
      raise ValueError(f"stack {name!r} is present in both layouts")
    out[name] = _stack([blocks[i] for i in range(len(blocks))])
  return out


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack(blocks: list[Any]) -> Any:
  def leaf(*xs):
    x0 = xs[0]
    if _is_box(x0):
      return x0.replace(value=_stack_values([x.value for x in xs]),
                        names=(LAYER_AXIS,) + tuple(x0.names))
    return _stack_values(list(xs))
  return jax.tree.map(leaf, *blocks, is_leaf=_is_box)


def _stack_values(xs: list[Any]) -> Any:
  x0 = xs[0]
  if isinstance(x0, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + tuple(x0.shape), x0.dtype)
  if isinstance(x0, np.ndarray) or np.isscalar(x0):
    return np.stack(xs)
  return jnp.stack(xs)


def _unstack(stack: Mapping) -> list[Any]:
  leaves = jax.tree.leaves(stack, is_leaf=_is_box)
  if not leaves:
    return []
  first = leaves[0].value if _is_box(leaves[0]) else leaves[0]
  n = first.shape[0]

  def take(i):
    def leaf(x):
      if _is_box(x):
        if tuple(x.names[:1]) != (LAYER_AXIS,):
          raise ValueError(f"scanned parameter names {x.names} lack the leading {LAYER_AXIS!r}")
        return x.replace(value=_index(x.value, i), names=tuple(x.names[1:]))
      return _index(x, i)
    return jax.tree.map(leaf, stack, is_leaf=_is_box)
  return [take(i) for i in range(n)]


def _index(x: Any, i: int) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return x[i]
