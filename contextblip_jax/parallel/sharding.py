"""Mesh construction and the one logical-axis rules table (logical name -> mesh axes).

Model code names only logical axes (`embed`, `heads`, `mlp`, `vocab`, `norm`, `batch`, `length`,
or None) on parameters (`nn.with_logical_partitioning`) and activations (`layers.constrain`).
This file is the only place that maps them onto the mesh axes `data`, `fsdp`, `tensor`:

  batch  -> ('data', 'fsdp')   data parallel over both axes (FSDP shards the batch too)
  embed  -> 'fsdp'             parameters sharded along their model width (ZeRO-3 style)
  heads, mlp, vocab -> 'tensor'  Megatron-style tensor parallel dimensions
  length, norm, layers, None -> replicated  (layers: the stacked axis of scanned blocks)

A rule assigns a mesh axis only once per array (flax's priority resolution): an activation
`(batch, length, embed)` gets `(('data','fsdp'), None, None)` because `fsdp` is taken by batch.

A dimension whose size is not divisible by the mesh axes assigned to it keeps the longest prefix
of those axes that divides it (possibly none = replicated); such fallbacks are logged once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The rules table. Order matters: earlier rules claim mesh axes first (flax semantics).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("norm", None),
    ("layers", None),     # leading axis of scanned block parameters (models/layout.py)
)

_log = logging.getLogger(__name__)


def get_rules(rules: Sequence[Sequence[Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """The rules to use: `rules` from a config (list of [name, mesh axes]) or the default table."""
  if rules is None:
    return LOGICAL_RULES
  out = []
  for i, entry in enumerate(rules):
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"sharding rule #{i} must be (logical_name, mesh_axes), got {entry!r}")
    name, axes = entry
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"sharding rule {name!r} names unknown mesh axis {a!r}; "
                         f"known: {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """{data, fsdp, tensor} (one may be -1 = the rest) -> concrete (data, fsdp, tensor)."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh config has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh config {dict(mesh_config)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh config {dict(mesh_config)}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh config {dict(mesh_config)}: {num_devices} devices are not "
                       f"divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh config {dict(mesh_config)} -> {tuple(sizes)} needs "
                     f"{math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None, *,
              dcn: Mapping[str, int] | None = None) -> jax.sharding.Mesh:
  """The one way to build a (data, fsdp, tensor) mesh, with Auto axes (Explicit axes break
  sharded matmuls here). Enter it with `jax.set_mesh(mesh)`.

  `mesh_config` defaults to {data: -1} (pure data parallel; -1 = the rest). With `dcn` (several
  TPU slices, or processes joined by a slow network) `mesh_config` is the mesh inside one
  granule (a slice, or a process where devices carry no slice index) and `dcn` the mesh of
  granules; sizes multiply axis by axis, e.g. {data: 16, fsdp: 16} x dcn {data: 2} ->
  (32, 16, 1) with the outer factor of `data` across slices.
  """
  devices = list(devices) if devices is not None else jax.devices()
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if dcn is None:
    shape = mesh_shape(mesh_config or {"data": -1}, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  slices = {getattr(d, "slice_index", None) for d in devices}
  by_process = len(slices) <= 1 or None in slices
  granules = len({d.process_index for d in devices}) if by_process else len(slices)
  if len(devices) % granules:
    raise ValueError(f"{len(devices)} devices do not split evenly over {granules} granules")
  dcn_shape = mesh_shape(dcn, granules)
  ici_shape = mesh_shape(mesh_config or {"data": -1}, len(devices) // granules)
  grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                              process_is_granule=by_process)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_from_config(cfg: Any, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The run's mesh from `config.mesh` over all devices, or over the first
  `config.num_devices` (single-process runs only; e.g. tests on the 8 forced CPU devices that
  want one), or over `devices` when given (the ahead-of-time planner's abstract TPU devices).
  `config.mesh_dcn` other than all ones (several TPU slices) builds the mesh as
  `config.mesh` inside a slice times `config.mesh_dcn` across slices."""
  n = int(cfg.get("num_devices", 0) or 0)
  if n and devices is None:
    if jax.process_count() > 1:
      raise ValueError("config.num_devices applies to single-process runs only")
    devices = jax.devices()[:n]
  dcn = dict(cfg.get("mesh_dcn", None) or {})
  multislice = any(int(v) != 1 for v in dcn.values())
  return make_mesh(dict(cfg.mesh), devices, dcn=dcn if multislice else None)


def with_mesh_rules(fn: Callable, mesh: jax.sharding.Mesh, rules=None) -> Callable:
  """`fn` run with the logical rules and the (abstract) mesh active while it is traced, so
  every `nn.with_logical_constraint` in the model resolves to mesh axes. Wrap every function
  that is jitted over the mesh (train, eval and scoring steps) with it."""
  rules = get_rules(rules)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


def _axis_size(mesh: jax.sharding.Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh, what: str = "") -> P:
  """Drops trailing mesh axes of each dimension until the mesh size divides it."""
  out = []
  for d, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None or axes is P.UNCONSTRAINED:
      out.append(axes)
      continue
    tup = axes if isinstance(axes, tuple) else (axes,)
    while tup and shape[d] % _axis_size(mesh, tup):
      tup = tup[:-1]
    if len(tup) != len(axes if isinstance(axes, tuple) else (axes,)):
      _log.warning("%s: dim %d of size %d not divisible by mesh axes %s; using %s",
                   what or "array", d, shape[d], axes, tup or None)
    out.append(None if not tup else (tup[0] if len(tup) == 1 else tup))
  return P(*out)


def logical_to_mesh_spec(names: Sequence[str | None] | P | None, shape: Sequence[int],
                         mesh: jax.sharding.Mesh, rules=None, what: str = "") -> P:
  """Logical axis names of one array -> a mesh PartitionSpec that fits its shape."""
  if names is None:
    return P()
  spec = nn.logical_to_mesh_axes(tuple(names), get_rules(rules))
  return fit_spec(spec, shape, mesh, what)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(boxed_abstract: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
  """Boxed (nn.Partitioned) abstract params -> the unboxed tree of NamedShardings.

  Leaves without partitioning metadata are replicated.
  """
  def one(path, leaf):
    if isinstance(leaf, nn.Partitioned):
      names, shape = leaf.names, leaf.value.shape
    else:
      names, shape = None, leaf.shape
    spec = logical_to_mesh_spec(names, shape, mesh, rules, _path_str(path))
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(
      one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def device_put_in_place(tree: dict[str, Any], shardings: Mapping[str, Any]) -> dict[str, Any]:
  """Moves a nested dict of host arrays onto the devices leaf by leaf, replacing each leaf in
  place, so that each host array is freed as soon as its device copy exists when nothing else
  holds it: peak memory is one copy of the tree plus one leaf, not two copies (a B/16 tree is
  0.9 GB). `shardings` has the tree's structure. Returns `tree` (now holding jax Arrays)."""
  for key, value in tree.items():
    if isinstance(value, dict):
      device_put_in_place(value, shardings[key])
    else:
      tree[key] = jax.device_put(value, shardings[key])
  release_host_memory()
  return tree


def release_host_memory() -> None:
  """Gives freed heap memory back to the operating system (glibc `malloc_trim`; a no-op
  elsewhere). Reading a parameter directory leaves several hundred MB of freed but still
  mapped heap behind (Orbax / TensorStore buffers), which would count in the process's RSS."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(rules=None) -> P:
  """PartitionSpec of the leading (batch) dimension from the rules table."""
  return nn.logical_to_mesh_axes(("batch",), get_rules(rules))


def batch_shards(mesh: jax.sharding.Mesh, rules=None) -> int:
  """Into how many pieces a batch is split over `mesh` (the product of the sizes of the mesh
  axes that the batch dimension maps to: 8 on a data=8 mesh, 1 on one device)."""
  spec = batch_spec(rules)
  return _axis_size(mesh, spec[0]) if len(spec) else 1


def batch_shardings(batch: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
  """A batch tree (arrays or ShapeDtypeStructs) -> shardings over its leading dimension.

  Scalars are replicated; a leading dimension not divisible by the data-parallel size uses the
  longest prefix of the batch mesh axes that divides it (logged).
  """
  spec = batch_spec(rules)
  def one(path, x):
    shape = np.shape(x) if not hasattr(x, "shape") else x.shape
    if len(shape) == 0:
      return replicated(mesh)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh, "batch/" + _path_str(path)))
  return jax.tree_util.tree_map_with_path(one, batch)


def describe(shardings: Any) -> dict[str, str]:
  """Flat {'a/b/c': 'PartitionSpec(...)'} of a sharding tree (for logs and golden tests)."""
  flat = traverse_util.flatten_dict(shardings, sep="/") if isinstance(shardings, dict) else {
      _path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  return {k: str(s.spec if isinstance(s, NamedSharding) else s) for k, s in sorted(flat.items())}
