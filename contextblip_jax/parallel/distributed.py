"""Multi-process (multi-host) start-up and the helpers every process-aware piece of code uses.

One command runs unchanged on one process or on N cooperating processes. `initialize_distributed`
picks how the processes find each other, in this order:

  1. explicit: `--coordinator_address`, `--num_processes`, `--process_id` (or the environment
     variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
  2. SLURM: an `srun` step with more than one task (SLURM_NTASKS > 1); the coordinator is the
     first host of the step's node list, the port JAX_COORDINATOR_PORT or one derived from the job
     id (as jax's own SLURM detection does); one process per GPU gets `local_device_ids=[LOCALID]`;
  3. TPU pod: on a Cloud TPU VM, `jax.distributed.initialize()` with no arguments (jax reads the
     worker list from the TPU metadata);
  4. otherwise a single process: nothing is initialised.

`cluster` forces a choice ("none", "explicit", "slurm", "tpu"); "auto" (default) follows the order
above. The plan is computed by the pure function `plan_distributed` (unit-tested on fake
environments); `initialize_distributed` only executes it.

The data helpers work from the batch sharding, so they stay right whatever the mesh: a process
loads exactly the rows of each *global* batch that its addressable devices hold
(`process_batch_rows`), and `global_batch` assembles the global `jax.Array` from those
process-local rows with `jax.make_array_from_process_local_data`. Every process walks the same
global example order, so N processes see the same global batches as one process.
"""

from __future__ import annotations

import dataclasses
import logging as py_logging
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

CLUSTERS = ("auto", "none", "explicit", "slurm", "tpu")
_SETTING_NAMES = ("cluster", "coordinator_address", "num_processes", "process_id",
                  "local_device_ids", "initialization_timeout", "coordinator_port")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """What the user asked for (flags or config); None means "not given"."""
  cluster: str = "auto"                    # one of CLUSTERS
  coordinator_address: str | None = None   # "host:port" of process 0
  num_processes: int | None = None         # total number of processes
  process_id: int | None = None            # this process, 0..num_processes-1
  local_device_ids: tuple[int, ...] | None = None  # devices this process drives (GPU)
  initialization_timeout: int = 300        # seconds to wait for all processes to join
  coordinator_port: int | None = None      # SLURM: overrides the job-id-derived port


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
  """How to start: `kind` in {"none", "explicit", "slurm", "tpu"} and the keyword arguments
  for `jax.distributed.initialize` (empty for "none")."""
  kind: str
  kwargs: Mapping[str, Any]


def settings_from(obj: Any = None, **overrides) -> DistributedSettings:
  """Builds settings from absl flags, a ConfigDict, a dict or None (+ keyword overrides).

  Reads the attribute/key names of `DistributedSettings`; missing ones keep their defaults.
  """
  values = {}
  for name in _SETTING_NAMES:
    if obj is None:
      continue
    if isinstance(obj, Mapping):
      value = obj.get(name)
    else:
      try:
        value = getattr(obj, name)
      except (AttributeError, KeyError):
        value = None
    if value is not None:
      values[name] = value
  values.update({k: v for k, v in overrides.items() if v is not None})
  ids = values.get("local_device_ids")
  if isinstance(ids, str):
    values["local_device_ids"] = tuple(int(x) for x in ids.split(",") if x.strip())
  elif ids is not None and not isinstance(ids, tuple):
    values["local_device_ids"] = tuple(int(x) for x in ids)
  settings = DistributedSettings(**values)
  if settings.cluster not in CLUSTERS:
    raise ValueError(f"distributed cluster must be one of {CLUSTERS}, got {settings.cluster!r}")
  return settings


# --------------------------------------------------------------------------------------------
# Planning (pure: environment in, plan out)
# --------------------------------------------------------------------------------------------

def first_slurm_host(nodelist: str) -> str:
  """First host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003', 'n1,n2' -> 'n1'."""
  m = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]+)\])?", nodelist)
  if not m or not m.group(1):
    raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
  prefix, ranges = m.group(1), m.group(2)
  if ranges is None:
    return prefix
  first = re.split(r"[,-]", ranges, maxsplit=1)[0].strip()
  if not first:
    raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
  return prefix + first


def _slurm_tasks_per_node(env: Mapping[str, str], ntasks: int) -> int:
  """Tasks on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ('8(x2),4') or
  SLURM_NTASKS_PER_NODE, else ntasks / nodes."""
  for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
    if env.get(key):
      m = re.match(r"\s*(\d+)", env[key])
      if m:
        return int(m.group(1))
  nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
  return max(1, ntasks // max(1, nodes))


def _visible_gpu_count(env: Mapping[str, str]) -> int | None:
  value = env.get("CUDA_VISIBLE_DEVICES")
  if value is None:
    return None
  return len([x for x in value.split(",") if x.strip()])


def _slurm_present(env: Mapping[str, str]) -> bool:
  return all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")) and (
      "SLURM_STEP_NODELIST" in env or "SLURM_JOB_NODELIST" in env)


def _plan_slurm(s: DistributedSettings, env: Mapping[str, str]) -> DistributedPlan:
  if not _slurm_present(env):
    raise ValueError("cluster='slurm' but the SLURM variables (SLURM_JOB_ID, SLURM_NTASKS, "
                     "SLURM_PROCID, SLURM_STEP_NODELIST) are not set; launch with srun")
  ntasks, procid = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
  if s.coordinator_address:
    address = s.coordinator_address
  else:
    port = s.coordinator_port or env.get("JAX_COORDINATOR_PORT")
    if port is None:   # jax's rule: the job id mapped into the top 4096 ports
      port = int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    address = f"{first_slurm_host(nodelist)}:{int(port)}"
  ids = s.local_device_ids
  if ids is None and _slurm_tasks_per_node(env, ntasks) > 1:
    # One process per GPU: each process drives GPU LOCALID of the node, unless SLURM already
    # bound one GPU per task (then the only visible GPU is the right one).
    visible = _visible_gpu_count(env)
    if visible is None or visible > 1:
      ids = (int(env.get("SLURM_LOCALID", "0")),)
  kwargs = dict(coordinator_address=address, num_processes=ntasks, process_id=procid,
                initialization_timeout=s.initialization_timeout,
                cluster_detection_method="deactivate")
  if ids is not None:
    kwargs["local_device_ids"] = list(ids)
  return DistributedPlan("slurm", kwargs)


def _plan_explicit(s: DistributedSettings, env: Mapping[str, str]) -> DistributedPlan:
  address = s.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  num = s.num_processes if s.num_processes is not None else env.get("JAX_NUM_PROCESSES")
  pid = s.process_id if s.process_id is not None else env.get("JAX_PROCESS_ID")
  missing = [n for n, v in (("coordinator_address", address), ("num_processes", num),
                            ("process_id", pid)) if v is None]
  if missing:
    raise ValueError(f"explicit multi-process start needs {missing} (flags --{missing[0]} ... "
                     "or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  num, pid = int(num), int(pid)
  if not 0 <= pid < num:
    raise ValueError(f"process_id {pid} out of range for num_processes {num}")
  if ":" not in address:
    raise ValueError(f"coordinator_address must be host:port, got {address!r}")
  if num == 1:
    return DistributedPlan("none", {})
  kwargs = dict(coordinator_address=address, num_processes=num, process_id=pid,
                initialization_timeout=s.initialization_timeout,
                cluster_detection_method="deactivate")
  if s.local_device_ids is not None:
    kwargs["local_device_ids"] = list(s.local_device_ids)
  return DistributedPlan("explicit", kwargs)


def _plan_tpu(s: DistributedSettings) -> DistributedPlan:
  # jax reads the coordinator, process count and id from the TPU metadata server.
  return DistributedPlan("tpu", dict(initialization_timeout=s.initialization_timeout))


def on_cloud_tpu_vm(env: Mapping[str, str] | None = None) -> bool:
  """True on a Cloud TPU VM (jax's own start-up check, or the TPU worker variables)."""
  env = os.environ if env is None else env
  from jax._src import cloud_tpu_init  # private, but the flag jax's TPU detection itself uses
  if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
    return True
  return bool(env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"))


def plan_distributed(settings: DistributedSettings, env: Mapping[str, str] | None = None,
                     tpu_vm: bool | None = None) -> DistributedPlan:
  """Decides how (and whether) to call `jax.distributed.initialize`; see the module doc."""
  env = os.environ if env is None else env
  tpu_vm = on_cloud_tpu_vm(env) if tpu_vm is None else tpu_vm
  s, kind = settings, settings.cluster
  if kind == "none":
    return DistributedPlan("none", {})
  if kind == "explicit":
    return _plan_explicit(s, env)
  if kind == "slurm":
    return _plan_slurm(s, env)
  if kind == "tpu":
    return _plan_tpu(s)
  # auto
  explicit_given = (s.coordinator_address or s.num_processes is not None
                    or s.process_id is not None or "JAX_COORDINATOR_ADDRESS" in env)
  if explicit_given and not (_slurm_present(env) and s.num_processes is None
                             and s.process_id is None and "JAX_NUM_PROCESSES" not in env):
    return _plan_explicit(s, env)
  if _slurm_present(env) and int(env["SLURM_NTASKS"]) > 1:
    return _plan_slurm(s, env)
  if tpu_vm:
    return _plan_tpu(s)
  return DistributedPlan("none", {})


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------

def initialize_distributed(settings: Any = None, *, env: Mapping[str, str] | None = None,
                           **overrides) -> DistributedPlan:
  """Starts the JAX distributed runtime when the environment/flags ask for several processes.

  Call once, first thing in `main`, before anything touches a device. `settings` may be absl
  FLAGS, a ConfigDict, a dict, a `DistributedSettings` or None; keyword overrides win.
  Idempotent: a second call (or a call after jax was already initialised) does nothing.
  With several processes, non-zero processes then log warnings only
  (`quiet_non_main_processes`); a single process touches no device here.
  Returns the plan it executed.
  """
  s = settings if isinstance(settings, DistributedSettings) else settings_from(
      settings, **overrides)
  plan = plan_distributed(s, env)
  if plan.kind != "none" and not jax.distributed.is_initialized():
    logging.info("jax.distributed.initialize (%s): %s", plan.kind, dict(plan.kwargs))
    jax.distributed.initialize(**plan.kwargs)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    quiet_non_main_processes()
  return plan


def define_flags(flag_values=None) -> None:
  """Defines --distributed_cluster, --coordinator_address, --num_processes, --process_id,
  --local_device_ids, --initialization_timeout on `flag_values` (absl FLAGS by default)."""
  from absl import flags
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_enum("distributed_cluster", "auto", CLUSTERS,
                    "How processes find each other (auto: explicit > SLURM > TPU > single).",
                    flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Total number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Index of this process.", flag_values=fv)
  flags.DEFINE_list("local_device_ids", None, "Local device ids this process drives.",
                    flag_values=fv)
  flags.DEFINE_integer("initialization_timeout", 300,
                       "Seconds to wait for every process to join.", flag_values=fv)


def settings_from_flags(flag_values=None) -> DistributedSettings:
  """Settings from the flags `define_flags` created."""
  from absl import flags
  fv = flags.FLAGS if flag_values is None else flag_values
  return settings_from(None, cluster=fv.distributed_cluster,
                       coordinator_address=fv.coordinator_address,
                       num_processes=fv.num_processes, process_id=fv.process_id,
                       local_device_ids=fv.local_device_ids,
                       initialization_timeout=fv.initialization_timeout)


# --------------------------------------------------------------------------------------------
# Process-0-only output
# --------------------------------------------------------------------------------------------

def is_main_process() -> bool:
  """True on process 0 (the one that writes metrics, logs and summaries)."""
  return jax.process_index() == 0


def quiet_non_main_processes() -> None:
  """Non-zero processes log warnings and errors only (absl and Python logging)."""
  if not is_main_process():
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger().setLevel(py_logging.WARNING)


def log_main(msg: str, *args) -> None:
  """absl `logging.info` on process 0 only."""
  if is_main_process():
    logging.info(msg, *args)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any process (one tiny all-gather; free with
  one process). E.g. a SIGTERM seen by some processes -> all stop at the same step."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))))


# --------------------------------------------------------------------------------------------
# Per-process data
# --------------------------------------------------------------------------------------------

def _batch_dim_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of dimension 0 alone (for a NamedSharding), so row maps need no full shape."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        spec[0] if spec else None))
  return sharding


def process_batch_rows(sharding: jax.sharding.Sharding, global_batch_size: int,
                       process_index: int | None = None) -> np.ndarray:
  """Sorted rows of a global batch [global_batch_size, ...] whose data `process_index`'s
  devices hold under `sharding` (this process by default). Rows replicated over devices of
  several processes are loaded by each of them."""
  pid = jax.process_index() if process_index is None else process_index
  rows = set()
  index_map = _batch_dim_sharding(sharding).devices_indices_map((global_batch_size,))
  for device, index in index_map.items():
    if device.process_index == pid:
      rows.update(range(global_batch_size)[index[0]])
  if not rows:
    raise ValueError(f"process {pid} holds no rows of the batch under {sharding}")
  return np.array(sorted(rows), dtype=np.int64)


def mesh_batch_rows(mesh: jax.sharding.Mesh, global_batch_size: int, rules=None) -> np.ndarray:
  """The rows of every global batch this process loads when batches are sharded over `mesh`
  by the logical rules (`process_batch_rows` of the batch sharding): pass them to the Grain
  pipelines as `shard`."""
  from contextblip_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  row = jax.ShapeDtypeStruct((global_batch_size,), np.int32)
  return process_batch_rows(sharding.batch_shardings(row, mesh, rules), global_batch_size)


def global_batch(local_batch: Any, sharding: Any, global_batch_size: int | None = None) -> Any:
  """Process-local rows (a pytree of NumPy arrays [local_B, ...]) -> global `jax.Array`s.

  `sharding` is one `jax.sharding.Sharding` for every leaf or a matching pytree of them. With
  one process this is a sharded `device_put`. The global batch size is inferred by jax (right
  for batch-dimension sharding) unless given.
  """
  leaves, treedef = jax.tree.flatten(local_batch)
  if isinstance(sharding, jax.sharding.Sharding):
    shardings = [sharding] * len(leaves)
  else:
    shardings = treedef.flatten_up_to(sharding)
  out = []
  for x, sh in zip(leaves, shardings):
    x = np.asarray(x)
    shape = None if global_batch_size is None else (global_batch_size,) + x.shape[1:]
    out.append(jax.make_array_from_process_local_data(sh, x, shape))
  return jax.tree.unflatten(treedef, out)


def global_shapes(local_batch: Any, global_batch_size: int) -> Any:
  """Process-local batch (pytree of [local_B, ...] arrays) -> ShapeDtypeStructs of the global
  batch [global_batch_size, ...] (to compile a step before the first global batch exists)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((global_batch_size,) + x.shape[1:],
                                                     x.dtype), local_batch)
