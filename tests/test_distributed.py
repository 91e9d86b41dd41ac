"""distributed.py: the start-up plan from fake environments, and the per-process data helpers on
one process with 8 forced CPU devices (the multi-process run is tests/test_multiprocess.py)."""

import jax
import numpy as np
import pytest
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from contextblip_jax.parallel import distributed as dist
from contextblip_jax.parallel import sharding as shd

SLURM_ENV = {
    "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
}


def plan(env, tpu_vm=False, **kw):
  return dist.plan_distributed(dist.settings_from(None, **kw), env=env, tpu_vm=tpu_vm)


@pytest.mark.parametrize("nodelist,host", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-0015],host2", "node001"),
    ("node[007,009-015],host2", "node007"), ("a-b-c[3]", "a-b-c3"), ("gpu[12-13]", "gpu12"),
])
def test_first_slurm_host(nodelist, host):
  assert dist.first_slurm_host(nodelist) == host


def test_single_process_is_a_noop():
  assert plan({}).kind == "none"
  assert plan({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
               "SLURM_STEP_NODELIST": "n1"}).kind == "none"
  assert plan({}, coordinator_address="h:1", num_processes=1, process_id=0).kind == "none"
  # an explicit no turns everything off, even on a TPU VM
  assert plan(SLURM_ENV, tpu_vm=True, cluster="none").kind == "none"


def test_explicit_flags():
  p = plan({}, coordinator_address="127.0.0.1:4321", num_processes=2, process_id=1,
           initialization_timeout=60)
  assert p.kind == "explicit"
  assert p.kwargs == dict(coordinator_address="127.0.0.1:4321", num_processes=2, process_id=1,
                          initialization_timeout=60, cluster_detection_method="deactivate")


def test_explicit_from_environment_and_local_ids():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:9999", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  p = plan(env, local_device_ids="0,1")
  assert p.kind == "explicit"
  assert (p.kwargs["coordinator_address"], p.kwargs["num_processes"],
          p.kwargs["process_id"], p.kwargs["local_device_ids"]) == ("10.0.0.2:9999", 4, 3, [0, 1])


def test_explicit_errors_name_what_is_missing():
  with pytest.raises(ValueError, match="process_id"):
    plan({}, coordinator_address="h:1", num_processes=2)
  with pytest.raises(ValueError, match="out of range"):
    plan({}, coordinator_address="h:1", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="host:port"):
    plan({}, coordinator_address="h", num_processes=2, process_id=0)
  with pytest.raises(ValueError, match="cluster"):
    dist.settings_from({"cluster": "mpi"})


def test_slurm_one_process_per_gpu():
  p = plan(SLURM_ENV)
  assert p.kind == "slurm"
  port = 123456 % 4096 + 61440
  assert p.kwargs["coordinator_address"] == f"gpu017:{port}"
  assert (p.kwargs["num_processes"], p.kwargs["process_id"]) == (16, 9)
  assert p.kwargs["local_device_ids"] == [1]
  assert p.kwargs["cluster_detection_method"] == "deactivate"


def test_slurm_port_override_and_gpu_binding():
  p = plan(dict(SLURM_ENV, JAX_COORDINATOR_PORT="5000", CUDA_VISIBLE_DEVICES="3"))
  assert p.kwargs["coordinator_address"] == "gpu017:5000"
  assert "local_device_ids" not in p.kwargs     # SLURM bound one GPU per task already


def test_slurm_one_process_per_node_uses_all_gpus():
  env = dict(SLURM_ENV, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
             SLURM_STEP_TASKS_PER_NODE="1(x2)")
  p = plan(env)
  assert p.kind == "slurm" and p.kwargs["num_processes"] == 2
  assert "local_device_ids" not in p.kwargs


def test_slurm_forced_without_environment_fails():
  with pytest.raises(ValueError, match="srun"):
    plan({}, cluster="slurm")


def test_tpu_pod_calls_initialize_without_arguments():
  p = plan({}, tpu_vm=True, initialization_timeout=120)
  assert p.kind == "tpu" and p.kwargs == {"initialization_timeout": 120}
  assert plan({"TPU_WORKER_HOSTNAMES": "w0,w1"}, tpu_vm=None).kind == "tpu"
  assert plan({}, cluster="tpu").kind == "tpu"


def test_settings_from_flags_and_config():
  fv = flags.FlagValues()
  dist.define_flags(fv)
  fv(["prog", "--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=0",
      "--local_device_ids=0,1"])
  s = dist.settings_from_flags(fv)
  assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
      "127.0.0.1:1234", 2, 0, (0, 1))
  assert dist.settings_from({"num_processes": 4}, process_id=2).process_id == 2


def test_initialize_single_process_does_nothing():
  p = dist.initialize_distributed(None, env={})
  assert p.kind == "none" and not jax.distributed.is_initialized()
  assert dist.is_main_process()


def _mesh():
  return jax.make_mesh((4, 2), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_mesh_batch_rows_and_global_batch_single_process():
  mesh = _mesh()
  sharding = NamedSharding(mesh, P("data"))
  rows = dist.mesh_batch_rows(shd.make_mesh({"data": 4, "fsdp": 2}), 16)
  assert rows.tolist() == list(range(16))          # one process loads every row
  batch = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "y": np.arange(16, dtype=np.int32)}
  out = dist.global_batch({k: v[rows] for k, v in batch.items()}, sharding)
  assert out["x"].shape == (16, 3) and out["x"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  assert len(out["y"].addressable_shards) == 8
  shapes = dist.global_shapes(batch, 32)
  assert shapes["x"].shape == (32, 3) and shapes["y"].dtype == np.int32


def test_rows_follow_device_ownership():
  # Pretend each pair of devices is a separate process: rows follow the devices' positions.
  devs = np.array(jax.devices()).reshape(4, 2)
  mesh = jax.sharding.Mesh(devs, ("data", "tensor"))
  sharding = NamedSharding(mesh, P("data"))
  index_map = sharding.devices_indices_map((8,))
  rows_of_dev0 = range(8)[index_map[devs[0, 0]][0]]
  assert list(rows_of_dev0) == [0, 1]
  assert dist.process_batch_rows(sharding, 8).tolist() == list(range(8))
  with pytest.raises(ValueError, match="no rows"):
    dist.process_batch_rows(sharding, 8, process_index=1)


def test_hybrid_mesh_single_process_is_ici_only():
  mesh = shd.make_mesh({"data": -1, "tensor": 2}, dcn={"data": 1})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError):
    shd.make_mesh({"data": -1}, dcn={"data": 2})   # one process = one granule


def test_any_process_single():
  assert dist.any_process(True) is True and dist.any_process(False) is False
