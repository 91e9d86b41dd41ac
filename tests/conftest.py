"""Test set-up: 8 forced CPU devices before JAX initialises, so mesh code runs on CPU."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The persistent compilation cache is on by default in a per-user directory
# (configs/common.py); tests never write there: off unless a test names a temporary one.
os.environ["CONTEXTBLIP_XLA_CACHE"] = ""

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGECODE_DIR = os.path.join(REPO_ROOT, "data", "imagecode")


@pytest.fixture(scope="session")
def imagecode_dir():
  """The real IMAGECODE annotation files shipped in data/imagecode/, required by some tests."""
  if not os.path.isdir(IMAGECODE_DIR):
    raise FileNotFoundError(f"IMAGECODE annotations expected at {IMAGECODE_DIR}")
  return IMAGECODE_DIR


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def xla_optimisations_off():
  """XLA optimisations off for a module whose small graphs are dominated by compile time
  (`pytestmark = pytest.mark.usefixtures("xla_optimisations_off")`)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
