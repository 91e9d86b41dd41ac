"""config.platform: a run that asks for a GPU or TPU stops with exit 2 when JAX fell back to the
CPU (naming what was asked, what JAX found and the install command); 'auto' runs on what JAX
finds and says which; bad values are config errors."""

import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import pytest

from configs import evaluate as evaluate_config
from contextblip_jax.parallel import accelerator
from contextblip_jax.run import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = [SimpleNamespace(device_kind="cpu", process_index=0)] * 4
GPUS = [SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", process_index=i // 8)
        for i in range(16)]


def test_auto_and_matching_platforms_pass_with_a_line_naming_the_backend():
  line = accelerator.check_platform("auto", "cpu", CPUS)
  assert line.startswith("JAX backend: cpu, 4 devices (cpu), 1 process") and "auto" in line
  line = accelerator.check_platform("gpu", "gpu", GPUS)
  assert "gpu, 16 devices (NVIDIA H100 80GB HBM3), 2 processes" in line


@pytest.mark.parametrize("asked,extra", [("gpu", ".[cuda12]"), ("tpu", ".[tpu]")])
def test_accelerator_asked_but_cpu_found_names_both_and_the_install_command(asked, extra):
  with pytest.raises(accelerator.AcceleratorError) as e:
    accelerator.check_platform(asked, "cpu", CPUS)
  msg = str(e.value)
  assert f"config.platform='{asked}'" in msg and "JAX runs on cpu, 4 devices" in msg
  assert f'pip install -e "{extra}"' in msg and "jax.devices()" in msg
  assert "--config.platform=auto" in msg


def test_plugin_installed_but_no_device_says_so_instead_of_install():
  with pytest.raises(accelerator.AcceleratorError) as e:
    accelerator.check_platform("tpu", "cpu", CPUS, plugins=["libtpu 0.0.42.1"])
  msg = str(e.value)
  assert "libtpu 0.0.42.1 is installed but found no device" in msg and "pip install" not in msg
  with pytest.raises(accelerator.AcceleratorError, match="asks for the CPU, but JAX runs on gpu"):
    accelerator.check_platform("cpu", "gpu", GPUS)


def test_require_platform_on_this_machine():
  line = accelerator.require_platform("auto")
  assert line.startswith(f"JAX backend: cpu, {jax.device_count()} devices")
  assert accelerator.require_platform("cpu") == line.replace("auto", "cpu")
  with pytest.raises(accelerator.AcceleratorError, match="asks for a GPU"):
    accelerator.require_platform("gpu")


def test_bad_platform_is_a_config_error():
  cfg = evaluate_config.get_config("tiny")
  assert cfg.platform == "auto"
  validate_config.validate(cfg)
  cfg.platform = "cuda"
  with pytest.raises(validate_config.ConfigError, match=r"platform='cuda': must be one of auto"):
    validate_config.validate(cfg)


def _cli(tmp_path, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
      [sys.executable, "-m", "contextblip_jax.main", "--config", "configs/evaluate.py:tiny",
       "--workdir", str(tmp_path / "run"), *overrides], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=300)


def test_cli_gpu_on_cpu_exits_2_before_any_work(tmp_path):
  proc = _cli(tmp_path, "--config.platform=gpu")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: config.platform='gpu' asks for a GPU, but JAX runs on cpu" in proc.stderr
  assert 'pip install -e ".[cuda12]"' in proc.stderr
  assert not (tmp_path / "run").exists()          # nothing was written


def test_cli_auto_logs_the_backend_and_runs_on(tmp_path):
  # The run passes the platform check and goes on to its own work: here it stops at the
  # evaluation's checkpoint (none given), a later user error.
  proc = _cli(tmp_path)
  assert "JAX backend: cpu, 1 device (cpu), 1 process" in proc.stderr, proc.stderr[-2000:]
  assert proc.returncode == 2 and "is not a parameter directory" in proc.stderr
