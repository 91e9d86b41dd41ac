"""The persistent XLA compilation cache is on by default (a per-user directory, or
$CONTEXTBLIP_XLA_CACHE), and a second run in a fresh process finds its executables there.
(conftest.py sets CONTEXTBLIP_XLA_CACHE='' so that no test writes to the user's home.)"""

import json
import os
import subprocess
import sys

from configs import common
from configs import evaluate as evaluate_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: the CLI's cache set-up from the default config, then two jitted programs.
_SCRIPT = """
import json, jax, jax.numpy as jnp
from jax import monitoring
from configs import evaluate
from contextblip_jax.run import cli
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
cfg = evaluate.get_config("tiny")
cli.use_compilation_cache(cfg.compilation_cache)
x = jnp.arange(12.0).reshape(3, 4)
y = jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x) + jax.jit(lambda a: a.max())(x)
print(json.dumps({"cache": cfg.compilation_cache, "value": float(y),
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _entries(path):
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_default_is_a_per_user_directory_and_the_env_var_overrides(monkeypatch, tmp_path):
  monkeypatch.delenv(common.COMPILATION_CACHE_ENV, raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert common.default_compilation_cache() == str(tmp_path / "home/.cache/contextblip_jax/xla")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert evaluate_config.get_config().compilation_cache == str(
      tmp_path / "xdg/contextblip_jax/xla")
  monkeypatch.setenv(common.COMPILATION_CACHE_ENV, "")           # '' turns the cache off
  assert evaluate_config.get_config().compilation_cache == ""


def test_second_run_in_a_fresh_process_compiles_nothing(tmp_path):
  cache = str(tmp_path / "xla")
  env = {**os.environ, common.COMPILATION_CACHE_ENV: cache, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}

  def run():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  first = run()
  written = _entries(cache)
  assert first["cache"] == cache and first["hits"] == 0
  assert len(written) >= 2                       # both programs written, however quick
  second = run()
  assert _entries(cache) == written              # nothing new compiled and written
  assert second["hits"] >= 2 and second["value"] == first["value"]
