"""The ahead-of-time planner (run/plan.py, parallel/planning.py): the real steps of the tiny
configs compiled for a TPU topology through libtpu (no TPU here), one and two slices, the
command on forced CPU devices, and its errors."""

import json
import os
import subprocess
import sys

import pytest

from configs import evaluate, finetune_stage1, pretrain
from contextblip_jax.parallel import planning
from contextblip_jax.run import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tpu_plan(cfg, slices=1):
  cfg.mesh.fsdp = 2                    # data x fsdp: parameters sharded, batch split
  if slices > 1:
    cfg.mesh_dcn.data = slices
  return plan.plan(cfg, "v5e:2x2", slices, log=lambda *_: None)


def _check_report(p, chips, mesh):
  assert p["chips"] == chips and p["mesh"] == mesh
  assert p["chip"] == "TPU v5e" and p["hbm_gib"] == 16
  g = p["per_chip_gib"]
  assert g["argument"] > 0 and p["total_gib"] > 0
  if p["step"] == "train":                           # activations and gradients
    assert g["temp"] > 0
  assert p["fits"] is True                           # a tiny model fits 16 GiB
  assert p["flops_per_chip"] > 0 and p["compile_s"] > 0
  assert p["step_s_roofline"] > 0 and p["schedule_steps"] > 0
  assert p["collectives"].get("all-gather", {}).get("count", 0) > 0   # fsdp gathers weights
  text = plan.format_plan(p)
  assert "fits" in text and "collectives: all-gather" in text


@pytest.mark.parametrize("make,stage", [(lambda: pretrain.get_config("tiny"), "pretrain"),
                                        (lambda: finetune_stage1.get_config("tiny"), "finetune1"),
                                        (lambda: evaluate.get_config("tiny"), "evaluate")])
def test_tiny_steps_compile_for_a_tpu_topology(make, stage):
  p = _tpu_plan(make())
  assert p["mode"] == stage
  _check_report(p, 4, {"data": 2, "fsdp": 2, "tensor": 1})
  if stage == "finetune1":
    assert p["images_per_step"] == 10 * p["examples_per_step"]
  if stage == "evaluate":                  # sets_per_batch 0 -> one set per batch shard
    assert p["examples_per_step"] == 4


def test_two_slices_compile_with_the_dcn_mesh():
  p = _tpu_plan(evaluate.get_config("tiny"), slices=2)   # the quickest step to compile
  _check_report(p, 8, {"data": 4, "fsdp": 2, "tensor": 1})
  devices = planning.topology_devices("v5e:2x2", 2)
  assert sorted({d.slice_index for d in devices}) == [0, 1]


def test_collective_parser_and_roofline():
  hlo = """
  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %x), replica_groups={{0,1}}
  %ag = (bf16[8,16]{1,0}, bf16[4]{0}) all-gather-start(bf16[4,16]{1,0} %y), dimensions={0}
  %all-reduce.2 = f32[2,2]{1,0} all-reduce(f32[2,2]{1,0} %z)
  %add = f32[4] add(f32[4] %a, f32[4] %b)
  %all-reduce.3 = (f32[1,32,64]{2,1,0:T(8,128)}, bf16[64]{0:T(128)}) all-reduce(%f, %g), channel_id=2
  %all-reduce-done = f32[4] all-reduce-done(f32[4] %h)
  """
  c = planning.collectives(hlo)                  # TPU tuple layouts hold parentheses too
  assert c == {"all-reduce": {"count": 3, "bytes": 4096 + 16 + 2048 * 4 + 64 * 2},
               "all-gather": {"count": 1, "bytes": 8 * 16 * 2 + 4 * 2}}
  v5e = planning.CHIPS["v5e"]
  assert planning.roofline_s(197e12, 0.0, v5e) == pytest.approx(1.0)      # compute-bound
  assert planning.roofline_s(1.0, 819e9, v5e) == pytest.approx(1.0)       # memory-bound
  assert planning.roofline_s(1.0, 1.0, None) is None
  assert planning.hosts(planning.CHIPS["v6e"], 8) == 1                    # v6e-8: one host VM
  assert planning.hosts(planning.CHIPS["v5e"], 16) == 2                   # v5e:4x4: 2 x 8 chips
  assert planning.hosts(planning.CHIPS["v5p"], 8) == 2                    # v5p:2x2x2: 2 x 4 chips
  assert planning.hosts(planning.CHIPS["v5p"], 4) == 1
  v5e = planning.CHIPS["v5e"]
  assert planning.host_vms(v5e, 16) == (2, 224)                          # v5e:4x4
  assert planning.host_vms(v5e, 8, num_slices=2) == (2, 112)             # 2 x v5e:2x2
  assert planning.host_vms(v5e, 32, num_slices=2) == (4, 224)            # 2 x v5e:4x4
  with pytest.raises(planning.PlanError, match="unknown chip 'v9z'"):
    planning.chip_of_topology("v9z:2x2")


def _aot(*args, timeout=300):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "contextblip_jax.aot", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_command_on_forced_cpu_devices(tmp_path):
  out = tmp_path / "plan.json"
  r = _aot("--config", "configs/evaluate.py:tiny", "--topology", "v5e:2x2", "--platform", "cpu",
           "--json", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "evaluate on v5e:2x2" in r.stdout and "memory per chip" in r.stdout
  p = json.loads(out.read_text())            # 4 forced host devices, v5e figures for estimates
  assert p["chips"] == 4 and p["mesh"]["data"] == 4 and p["platform"] == "cpu"
  assert p["fits"] is True and p["per_chip_gib"]["argument"] > 0 and p["step_s_roofline"] > 0
  assert p["host_images_per_s"] > 0


def test_command_errors_name_the_problem():
  r = _aot("--config", "configs/backbone.py:tiny", "--topology", "v9z:2x2")
  assert r.returncode == 2 and "unknown chip 'v9z'" in r.stderr
  r = _aot("--config", "configs/backbone.py:tiny", "--topology", "v5e:2x2",
           "--config.mesh.data=3")
  assert r.returncode == 2 and "does not fit v5e:2x2" in r.stderr, r.stderr[-2000:]


def test_markdown_table_rows_from_plan_files(tmp_path):
  """The launch table's row from a plan file: the compute roofline from the FLOPs, the input
  per host VM from the chip table (v5e:4x4 is 2 host VMs of 8 chips and 224 vCPUs)."""
  p = {"mode": "pretrain", "topology": "v5e:4x4", "num_slices": 1, "chips": 16,
       "mesh": {"data": 16, "fsdp": 1}, "compute_dtype": "bfloat16", "remat": "none",
       "examples_per_step": 1024, "images_per_step": 1024, "total_gib": 13.9, "hbm_gib": 16,
       "fits": True, "flops_per_chip": 197e12 * 0.05, "bytes_from": "compiled",
       "step_s_roofline": 0.1, "schedule_steps": 1000, "schedule_hours": 1000 * 0.1 / 3600,
       "chip_hours": 16 * 1000 * 0.1 / 3600,
       "host_images_per_s": 1000.0, "host_vcpus_needed": 5.0}     # 200 images/s per vCPU
  (tmp_path / "a.json").write_text(json.dumps(p))
  table = plan.markdown_table(str(tmp_path))
  row = table.splitlines()[2]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[:3] == ["pre-training, batch 1024", "v5e:4x4 (16 chips)", "data=16"]
  assert cells[7] == "50 ms (100 ms with HBM traffic)"                 # 0.05 s of bf16 peak
  assert cells[8] == "1000 steps, 0.01 h" and cells[9] == "0.2"       # scaled to 50 ms
  assert cells[10] == "10240 images/s, 51 of 224 vCPUs"                # 1024 / 0.05 s / 2 hosts
