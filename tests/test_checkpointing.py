"""Checkpointing: sharded round trip with the Grain iterator, crash/kill mid-save, SIGTERM."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contextblip_jax.storage import checkpoints


def _mesh_state():
  mesh = jax.make_mesh((4, 2), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "tensor"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"params": {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), sh)},
           "step": jax.device_put(jnp.int32(7), rep)}
  return state, sh


def _iterator():
  return iter(grain.MapDataset.range(50).shuffle(seed=3).batch(4).to_iter_dataset())


def test_round_trip_restores_into_shardings_and_iterator(tmp_path):
  state, sh = _mesh_state()
  it = _iterator()
  next(it)
  with checkpoints.Checkpointer(str(tmp_path), save_every=5) as ckpt:
    assert not ckpt.save(3, state, it)            # off the interval
    assert ckpt.save(5, state, it, meta={"stage": "t", "epoch": 1})
    expected_next = next(it)                      # state was captured before this
    ckpt.wait()
    assert ckpt.latest_step() == 5
  it2 = _iterator()
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    restored, meta = ckpt.restore(checkpoints.abstract_like(state), it2)
  assert meta == {"stage": "t", "epoch": 1}
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert restored["params"]["w"].sharding == sh
  assert int(restored["step"]) == 7
  np.testing.assert_array_equal(next(it2), expected_next)


class _FailingIterator:
  """Stands in for a data iterator whose state cannot be written (raises mid-save)."""

  def get_state(self):
    raise RuntimeError("disk full")


def test_error_during_save_keeps_previous_step(tmp_path):
  state, _ = _mesh_state()
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, _iterator(), force=True)
    ckpt.wait()
    with pytest.raises(RuntimeError, match="disk full"):
      ckpt.save(2, jax.tree.map(lambda x: x + 1, state), _FailingIterator(), force=True)
      ckpt.wait()
  with checkpoints.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 1
    restored, _ = ckpt.restore(checkpoints.abstract_like(state))
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import jax.numpy as jnp
    from contextblip_jax.storage import checkpoints
    class Hang:
      def get_state(self):
        open(sys.argv[2], "w").close()   # the save of step 2 is under way
        time.sleep(600)
    state = {"w": jnp.arange(1000.0)}
    ckpt = checkpoints.Checkpointer(sys.argv[1])
    ckpt.save(1, state, meta={"ok": 1}, force=True)
    ckpt.wait()
    ckpt.save(2, {"w": state["w"] + 1}, Hang(), force=True)
""")


def test_kill_during_save_keeps_previous_step(tmp_path):
  ckpt_dir, marker = str(tmp_path / "ckpt"), str(tmp_path / "saving")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, ckpt_dir, marker], env=env)
  try:
    deadline = time.time() + 120
    while not os.path.exists(marker):
      assert proc.poll() is None, "the saving process died before the kill"
      assert time.time() < deadline, "the save of step 2 never started"
      time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert any("tmp" in name for name in os.listdir(ckpt_dir))   # the half-written step 2
  with checkpoints.Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.latest_step() == 1
    restored, meta = ckpt.restore({"w": jax.ShapeDtypeStruct((1000,), jnp.float32)})
  assert meta == {"ok": 1}
  np.testing.assert_array_equal(restored["w"], np.arange(1000.0))
  assert not any("tmp" in name for name in os.listdir(ckpt_dir))  # cleaned on open


def test_sigterm_guard_sets_flag_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoints.SigtermGuard() as guard:
    assert not guard.requested
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert guard.requested
  assert signal.getsignal(signal.SIGTERM) == before
