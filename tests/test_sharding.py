"""Mesh construction, the logical-axis rules and the golden parameter-sharding tables (one per
parameter layout: unscanned blocks, and scanned blocks stacked [L, ...]).

Regenerate the golden tables (only after an intended change of the model or the rules) with
  REGENERATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_sharding.py
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contextblip_jax.parallel import sharding as shd
from contextblip_jax.models import layers
from contextblip_jax.models.contextblip import ContextBlip, ContextBlipConfig, init_params

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
GOLDEN = {False: os.path.join(GOLDEN_DIR, "tiny_param_shardings.txt"),
          True: os.path.join(GOLDEN_DIR, "tiny_param_shardings_scanned.txt")}


def test_make_mesh_fills_minus_one_and_validates():
  mesh = shd.make_mesh({"data": -1, "fsdp": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert shd.mesh_shape({"tensor": 2, "data": -1}, 8) == (4, 1, 2)
  with pytest.raises(ValueError, match="at most one axis"):
    shd.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 6 devices"):
    shd.make_mesh({"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown axes"):
    shd.make_mesh({"model": 2})
  one = shd.make_mesh({"data": 1}, jax.devices()[:1])
  assert one.size == 1


def test_rules_map_logical_names_once_per_array():
  # batch claims data and fsdp, so embed stays replicated on an activation...
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), shd.LOGICAL_RULES) == \
      P(("data", "fsdp"), None, None)
  # ... while a parameter's embed dimension is FSDP-sharded and its mlp dim tensor-sharded.
  assert nn.logical_to_mesh_axes(("embed", "mlp"), shd.LOGICAL_RULES) == P("fsdp", "tensor")
  assert nn.logical_to_mesh_axes(("vocab", "embed"), shd.LOGICAL_RULES) == P("tensor", "fsdp")
  assert nn.logical_to_mesh_axes(("norm",), shd.LOGICAL_RULES) == P(None)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    shd.get_rules([("embed", "model")])
  assert shd.get_rules([["batch", ["data"]]]) == (("batch", ("data",)),)


def test_fit_spec_drops_axes_that_do_not_divide():
  mesh = shd.make_mesh({"data": 4, "fsdp": 2})
  assert shd.fit_spec(P(("data", "fsdp")), (16, 3), mesh) == P(("data", "fsdp"), None)
  assert shd.fit_spec(P(("data", "fsdp")), (4, 3), mesh) == P("data", None)
  assert shd.fit_spec(P(("data", "fsdp")), (2, 3), mesh) == P(None, None)
  assert shd.fit_spec(P("fsdp", None), (30524, 32), mesh) == P("fsdp", None)
  assert shd.fit_spec(P(None, "fsdp"), (5, 7), mesh) == P(None, None)


def test_batch_shardings():
  mesh = shd.make_mesh({"data": 4, "fsdp": 2})
  b = {"image": jax.ShapeDtypeStruct((16, 8, 8, 3), jnp.float32),
       "label": jax.ShapeDtypeStruct((4,), jnp.int32), "t": jax.ShapeDtypeStruct((), jnp.int32)}
  s = shd.batch_shardings(b, mesh)
  assert s["image"].spec == P(("data", "fsdp"), None, None, None)
  assert s["label"].spec == P("data")
  assert s["t"].spec == P()


def test_constraints_are_active_while_a_step_is_traced():
  """`layers.constrain` becomes a sharding constraint under the step's context, a no-op without."""
  mesh = shd.make_mesh({"data": 4, "fsdp": 2})
  f = lambda x: layers.constrain(x * 2, ("batch", "length", "embed"))
  x = jax.ShapeDtypeStruct((8, 4, 6), jnp.float32)
  with_rules = jax.jit(shd.with_mesh_rules(f, mesh, None)).lower(x).as_text()
  without = jax.jit(f).lower(x).as_text()
  assert "sharding_constraint" in with_rules or "@Sharding" in with_rules
  assert "sharding_constraint" not in without and "@Sharding" not in without


def _tiny_param_table(scan_layers: bool) -> str:
  cfg = ContextBlipConfig.for_variant("tiny").with_layers(scan_layers=scan_layers)
  model = ContextBlip(cfg)
  boxed = jax.eval_shape(lambda r: init_params(model, r, "all"), jax.random.PRNGKey(0))
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sh = shd.describe(shd.param_shardings(boxed, mesh))
  shapes = {k: v.shape for k, v in
            __import__("flax").traverse_util.flatten_dict(nn.unbox(boxed), sep="/").items()}
  lines = ["# tiny ContextBlip (stage 'all'" + (", scanned layers" if scan_layers else "")
           + ") on mesh data=2, fsdp=2, tensor=2: path  shape  PartitionSpec"]
  lines += [f"{k}  {tuple(shapes[k])}  {v}" for k, v in sh.items()]
  return "\n".join(lines) + "\n"


@pytest.mark.parametrize("scan_layers", [False, True])
def test_golden_tiny_param_shardings(scan_layers):
  table, path = _tiny_param_table(scan_layers), GOLDEN[scan_layers]
  if os.environ.get("REGENERATE_GOLDEN"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(table)
  with open(path) as f:
    golden = f.read()
  if table != golden:
    want, got = golden.splitlines(), table.splitlines()
    diff = [f"- {l}" for l in want if l not in got] + [f"+ {l}" for l in got if l not in want]
    raise AssertionError(f"parameter shardings differ from tests/golden/{os.path.basename(path)} "
                         "(REGENERATE_GOLDEN=1 to accept):\n" + "\n".join(diff[:40]))
  # A few entries spelled out, so the table cannot silently become all-replicated.
  assert "pretrained_blip/text_encoder/embeddings/word_embeddings/embedding  (30524, 32)  " \
         "P('tensor', 'fsdp')" in table
  if scan_layers:   # the layer axis is replicated, the others sharded as unscanned
    assert "pretrained_blip/visual_encoder/blocks/mlp/fc1/kernel  (4, 32, 64)  " \
           "P(None, 'fsdp', 'tensor')" in table
    assert "context_encoder/transformer/output/kernel  (2, 64, 32)  " \
           "P(None, 'tensor', 'fsdp')" in table
  else:
    assert "pretrained_blip/visual_encoder/blocks_0/mlp/fc1/kernel  (32, 64)  " \
           "P('fsdp', 'tensor')" in table


def test_mesh_from_config():
  from configs import common
  cfg = common.base_config("pretrain")
  mesh = shd.mesh_from_config(cfg)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  cfg.mesh.fsdp, cfg.num_devices = 2, 4
  assert dict(shd.mesh_from_config(cfg).shape) == {"data": 2, "fsdp": 2, "tensor": 1}
  cfg.num_devices = 0
  cfg.mesh_dcn.data = 2       # two granules asked for; one process is one granule
  with pytest.raises(ValueError, match="needs 2 devices, have 1"):
    shd.mesh_from_config(cfg)


def test_device_put_in_place_moves_each_leaf_and_frees_the_host_copy():
  import gc
  import weakref
  host = {"a": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)},
          "b": np.ones((8, 2), np.float32)}
  alive = [weakref.ref(host["a"]["w"]), weakref.ref(host["b"])]
  expected = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((8, 2))}
  mesh = shd.make_mesh({"data": -1})
  sh = {"a": {"w": shd.replicated(mesh)},
        "b": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))}
  out = shd.device_put_in_place(host, sh)
  assert out is host                                       # the same dict, leaves replaced
  assert isinstance(out["a"]["w"], jax.Array) and isinstance(out["b"], jax.Array)
  assert out["b"].sharding == sh["b"] and out["a"]["w"].sharding == sh["a"]["w"]
  np.testing.assert_array_equal(np.asarray(out["a"]["w"]), expected["w"])
  np.testing.assert_array_equal(np.asarray(out["b"]), expected["b"])
  # On CPU a device array may alias its host buffer (zero-copy), so the host arrays can live
  # as long as the device arrays do; but nothing else may hold them.
  del out, host
  gc.collect()
  assert all(r() is None for r in alive)


def test_batch_shards_and_the_evaluation_default_of_one_set_per_shard():
  import ml_collections
  from contextblip_jax.evaluation import loop
  one = shd.make_mesh({"data": -1}, jax.devices()[:1])
  eight = shd.make_mesh({"data": 4, "fsdp": 2})
  tensor = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  assert [shd.batch_shards(m) for m in (one, eight, tensor)] == [1, 8, 2]
  cfg = ml_collections.ConfigDict({"eval": {"sets_per_batch": 0}, "sharding_rules": None})
  assert loop.sets_per_batch(cfg, eight) == 8 and loop.sets_per_batch(cfg, one) == 1
  cfg.eval.sets_per_batch = 3
  assert loop.sets_per_batch(cfg, eight) == 3
