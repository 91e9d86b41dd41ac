"""The weight converter: mapping table, strictness, safe loading, atomic output, resampling,
config inference, ContextBLIP adapter keys and the command line (numerical parity with
transformers is in test_parity_hf.py)."""

import os
import pickle
import subprocess
import sys

import flax
import numpy as np
import pytest
import torch

from tests.helpers import torch_reference as tr
from contextblip_jax.models.variants import get_variant
from contextblip_jax.storage.param_dir import blip_model_config, load_param_dir
from weight_convert import (ConversionError, UnsafeCheckpointError, abstract_params, convert,
                            export_hf, load_source, mapping, resample_pos_embed, to_flax,
                            to_state_dict)
from weight_convert.__main__ import main
from weight_convert.infer_config import adapter_from_source, config_from_hf
from weight_convert.loaders import SourceState
from weight_convert.resample import resize_bicubic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  return tr.build_hf_model(tr.hf_config(), seed=0)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
  d = tmp_path_factory.mktemp("sources")
  return dict(
      hf=tr.save_hf_dir(model, str(d / "hf")),
      orig=tr.save_original(tr.original_state_dict(model), str(d / "orig.pth"), epoch=3),
      cb=tr.save_original(tr.contextblip_state_dict(model), str(d / "cb.pth")))


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _siblings(path):
  return sorted(os.listdir(os.path.dirname(path)))


# --- the mapping table -------------------------------------------------------------------

def test_table_maps_every_leaf_once_and_matches_hf_and_original_key_sets(model):
  config = get_variant("tiny")
  flat = _flat(abstract_params(blip_model_config(config, (1, 2, 3, 4), 2)))
  used_rules = set()
  hf_keys, orig_keys = set(), set()
  for path in flat:
    rule, _ = mapping.rule_for(path)           # raises unless exactly one rule matches
    used_rules.add(rule)
    key, _ = mapping.source_key(path, "original")
    orig_keys.add(key)
    if rule.hf is not None:
      hf_keys.add(mapping.source_key(path, "hf")[0])
  assert used_rules == set(mapping.RULES), "every rule must be used by the target tree"
  want_hf = set(model.state_dict())
  assert hf_keys == want_hf
  want_orig = {tr.hf_key_to_original(k) for k in want_hf}
  assert orig_keys - {k for k in orig_keys if k.startswith("vision_adapter.")} == want_orig


def test_ignored_groups_are_named():
  cases = {"text_decoder.bert.encoder.layer.0.attention.self.query.weight": "text_decoder",
           "visual_encoder_m.cls_token": "momentum_encoders", "ptr_queue": "queues",
           "queue_ptr": "queues", "temp": "temp",
           "text_encoder.embeddings.position_ids": "position_ids",
           "recon_head.weight": "contextblip_tmim", "mask_embed": "contextblip_tmim",
           "text_encoder.pooler.dense.weight": "text_pooler"}
  for key, group in cases.items():
    assert mapping.ignored_group(key) == group, key
  assert mapping.ignored_group("visual_encoder.cls_token") is None
  assert mapping.ignored_group("temperature") is None


# --- original format ---------------------------------------------------------------------

def test_original_pth_fills_leaves_with_hooks_and_reports_ignored_groups(model, files):
  conv = to_flax(load_source(files["orig"]), vision_heads=4, text_heads=4)
  assert conv.report.ignored == {"text_decoder": 2, "momentum_encoders": 4, "queues": 4,
                                 "temp": 1, "position_ids": 1}
  assert any("other top-level entries not read: epoch" in n for n in conv.report.notes)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  v = conv.params["pretrained_blip"]["visual_encoder"]
  np.testing.assert_array_equal(v["blocks_1"]["attn"]["qkv"]["kernel"],
                                sd["vision_model.encoder.layers.1.self_attn.qkv.weight"].T)
  np.testing.assert_array_equal(v["patch_embed_kernel"], sd[
      "vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["norm"]["scale"], sd["vision_model.post_layernorm.weight"])
  t = conv.params["pretrained_blip"]["text_encoder"]
  np.testing.assert_array_equal(t["embeddings"]["word_embeddings"]["embedding"],
                                sd["text_encoder.embeddings.word_embeddings.weight"])
  c = conv.config
  assert (c.vision.width, c.vision.depth, c.vision.patch_size, c.vision.image_size) == (
      32, 4, 8, 32)
  assert (c.text.vocab_size, c.text.num_layers, c.text.num_heads, c.embed_dim) == (
      30524, 2, 4, 16)
  assert c.vision.layer_norm_eps == 1e-6 and c.text.hidden_dropout == 0.1


def test_original_safetensors_file_and_bare_state_dict_give_same_params(model, files, tmp_path):
  from safetensors.torch import save_file
  sd = tr.original_state_dict(model)
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "orig.safetensors"))
  bare = tr.save_original(sd, str(tmp_path / "bare.pth"), wrap=None)
  ref = _flat(to_flax(load_source(files["orig"]), vision_heads=4, text_heads=4).params)
  for src in (str(tmp_path / "orig.safetensors"), bare):
    got = _flat(to_flax(load_source(src), vision_heads=4, text_heads=4).params)
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_hf_pytorch_model_bin_and_sharded_safetensors_give_same_params(model, files, tmp_path):
  import json
  import shutil
  from safetensors.torch import save_file
  sd = model.state_dict()
  bin_dir, shard_dir = tmp_path / "bin", tmp_path / "sharded"
  for d in (bin_dir, shard_dir):
    d.mkdir()
    shutil.copy(os.path.join(files["hf"], "config.json"), d / "config.json")
  torch.save(sd, bin_dir / "pytorch_model.bin")
  keys = sorted(sd)
  halves = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  for name, ks in halves.items():
    save_file({k: sd[k].contiguous() for k in ks}, str(shard_dir / name))
  with open(shard_dir / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {k: n for n, ks in halves.items() for k in ks}}, f)
  ref = _flat(to_flax(load_source(files["hf"])).params)
  for d in (bin_dir, shard_dir):
    got = _flat(to_flax(load_source(str(d))).params)
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_untied_decoder_word_embeddings_are_reported(model):
  sd = tr.original_state_dict(model)
  src = SourceState(dict(sd), {}, "mem.pth", "original")
  assert not any("differs" in n for n in to_flax(src, vision_heads=4, text_heads=4).report.notes)
  sd["text_decoder.bert.embeddings.word_embeddings.weight"] += 1.0
  notes = to_flax(SourceState(sd, {}, "mem.pth", "original"), vision_heads=4,
                  text_heads=4).report.notes
  assert any("text_decoder.bert.embeddings.word_embeddings.weight differs" in n for n in notes)


def test_heads_default_to_width_over_64_so_tiny_widths_need_them(files):
  with pytest.raises(ConversionError, match="cannot infer vision heads for width 32"):
    to_flax(load_source(files["orig"]), text_heads=4)


def test_config_inference_names_a_missing_key():
  src = SourceState({"visual_encoder.cls_token": np.zeros((1, 1, 32)),
                     "visual_encoder.patch_embed.proj.weight": np.zeros((32, 3, 8, 8)),
                     "visual_encoder.pos_embed": np.zeros((1, 17, 32))},
                    {}, "fake.pth", "original")
  with pytest.raises(ConversionError, match="missing key 'text_encoder.embeddings.word_emb"):
    to_flax(src, vision_heads=4, text_heads=4)


def test_contextblip_checkpoint_adapter_transposed_and_tmim_reported(model, files, tmp_path):
  out = convert(files["cb"], str(tmp_path / "cb"), vision_heads=4, text_heads=4)
  pre = load_param_dir(out)
  assert pre.model.use_adapter and pre.model.adapter_taps == (1, 2, 3, 4)
  assert pre.model.adapter_reduction == 2
  sd = tr.contextblip_state_dict(model)
  ad = pre.params["vision_adapter"]
  for i in range(4):
    np.testing.assert_array_equal(ad[f"down_{i}"]["kernel"],
                                  sd[f"vision_adapter.down.{i}.fc.0.weight"].numpy().T)
  np.testing.assert_array_equal(ad["up"]["kernel"], sd["vision_adapter.up.fc.0.weight"].numpy().T)
  np.testing.assert_array_equal(
      pre.params["pretrained_blip"]["itm_head"]["kernel"],
      sd["pretrained_blip.itm_head.weight"].numpy().T)
  rep = to_flax(load_source(files["cb"]), vision_heads=4, text_heads=4).report
  assert rep.ignored == {"position_ids": 1}
  logged = []
  export_hf(pre.params, pre.model.blip, str(tmp_path / "hf"), log=logged.append)
  assert any("vision_adapter (ContextBLIP multi-scale adapter) is not representable in "
             "BlipForImageTextRetrieval and is left out" in s for s in logged)


def test_adapter_taps_and_delta_inferred_for_b16_shapes():
  arrays = {f"vision_adapter.down.{i}.fc.0.weight": np.zeros((384, 768)) for i in range(4)}
  arrays["vision_adapter.up.fc.0.weight"] = np.zeros((768, 1536))
  src = SourceState(arrays, {}, "cb.pth", "original")
  assert adapter_from_source(src, get_variant("B/16")) == {"taps": [3, 6, 9, 12], "reduction": 2}
  arrays = {f"vision_adapter.down.{i}.fc.0.weight": np.zeros((48, 768)) for i in range(2)}
  src = SourceState(arrays, {}, "cb.pth", "original")
  assert adapter_from_source(src, get_variant("B/16"), (4, 8)) == {"taps": [4, 8],
                                                                  "reduction": 16}


# --- strictness and atomic output --------------------------------------------------------

def test_unexpected_missing_and_misshaped_keys_are_all_named_and_nothing_written(model,
                                                                               tmp_path):
  sd = tr.original_state_dict(model)
  sd["visual_encoder.extra_gate"] = torch.zeros(3)
  del sd["text_encoder.encoder.layer.1.output.dense.bias"]
  k = "text_encoder.encoder.layer.1.intermediate.dense.weight"      # [64, 32]
  sd[k] = sd[k].T.contiguous()
  src = tr.save_original(sd, str(tmp_path / "src" / "bad.pth"))
  out = str(tmp_path / "out" / "ckpt")
  os.makedirs(os.path.dirname(out))
  with pytest.raises(ConversionError) as err:
    convert(src, out, vision_heads=4, text_heads=4)
  msg = str(err.value)
  assert "unexpected source keys (1)" in msg and "visual_encoder.extra_gate" in msg
  assert "missing source keys (1)" in msg
  assert "text_encoder.encoder.layer.1.output.dense.bias" in msg
  assert "pretrained_blip/text_encoder/encoder/layer_1/output/bias" in msg
  assert "mis-shaped (1)" in msg and f"{k} [32, 64] -> " in msg and "expects [32, 64]" in msg
  assert _siblings(out) == []


def test_failed_write_leaves_nothing_behind(files, tmp_path, monkeypatch):
  from contextblip_jax.storage import paths   # every file copy of a parameter dir goes here
  def broken_copy(*a, **k):
    raise OSError("disk full (simulated)")
  monkeypatch.setattr(paths.shutil, "copyfile", broken_copy)
  out = str(tmp_path / "ckpt")
  with pytest.raises(OSError, match="disk full"):
    convert(files["hf"], out)
  assert _siblings(out) == []


def test_existing_output_needs_overwrite(files, tmp_path):
  out = str(tmp_path / "ckpt")
  os.makedirs(out)
  with pytest.raises(FileExistsError, match="already exists"):
    convert(files["hf"], out)
  assert load_param_dir(convert(files["hf"], out, overwrite=True)).model.blip.vision.width == 32


class _Payload:
  """Pickles as a call to os.system: loading it with a plain unpickler runs the command."""
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_pickles_are_refused_and_nothing_runs(tmp_path, capsys):
  marker = tmp_path / "PWNED"
  zipped = str(tmp_path / "evil.pth")
  torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 8),
                        "x": _Payload(marker)}}, zipped)
  legacy = str(tmp_path / "evil_legacy.pth")
  with open(legacy, "wb") as f:
    pickle.dump({"model": _Payload(marker)}, f)
  for path in (zipped, legacy):
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*weights_only") as err:
      convert(path, str(tmp_path / "out"))
    assert "nothing in it was executed" in str(err.value)
    assert main(["--src", path, "--out", str(tmp_path / "out")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
  assert not (tmp_path / "out").exists()
  torch.load(zipped, weights_only=False)       # the payload is live: an unsafe load runs it
  assert marker.exists()


# --- position embeddings -----------------------------------------------------------------

@pytest.mark.parametrize("g0,g1", [(14, 24), (24, 14), (4, 6), (6, 3), (24, 32)])
def test_bicubic_matches_torch_interpolate(g0, g1):
  x = np.random.default_rng(g0 * 100 + g1).normal(size=(g0, g0, 6))
  def torch_resize(a):
    t = torch.from_numpy(a).permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=(g1, g1), mode="bicubic", align_corners=False)
    return t[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(resize_bicubic(x, (g1, g1)), torch_resize(x), rtol=0, atol=1e-12)
  x32 = x.astype(np.float32)           # torch float32 accumulates in float32: ~1e-6 at |x|~3
  np.testing.assert_allclose(resize_bicubic(x32, (g1, g1)), torch_resize(x32), rtol=0,
                             atol=1e-5)


def test_resample_pos_embed_keeps_cls_and_identity_at_same_grid():
  pos = np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  out = resample_pos_embed(pos, 24)
  assert out.shape == (1, 1 + 24 * 24, 8)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])
  assert resample_pos_embed(pos, 14) is pos


def test_image_size_mismatch_without_request_is_an_error(model, tmp_path):
  import json
  hf = tr.save_hf_dir(model, str(tmp_path / "hf"))
  with open(os.path.join(hf, "config.json")) as f:
    cfg = json.load(f)
  cfg["vision_config"]["image_size"] = 48
  with open(os.path.join(hf, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ConversionError, match="disagrees with vision_model.embeddings"):
    convert(hf, str(tmp_path / "out"))


# --- HF config policy --------------------------------------------------------------------

def _hf_dict(**vision):
  return {"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"],
          "vision_config": {"hidden_size": 768, **vision},
          "text_config": {"num_attention_heads": 12}}


def test_hf_vision_eps_policy():
  cfg, notes = config_from_hf(_hf_dict())                      # hub config: eps omitted
  assert cfg.vision.layer_norm_eps == 1e-6
  assert any("config.json has 1e-05" in n for n in notes)
  assert cfg.text.hidden_dropout == 0.1 and cfg.vision.image_size == 384
  cfg, _ = config_from_hf(_hf_dict(), "config")
  assert cfg.vision.layer_norm_eps == 1e-5 and cfg.text.hidden_dropout == 0.0
  assert config_from_hf(_hf_dict(layer_norm_eps=1e-6))[0].vision.layer_norm_eps == 1e-6


def test_hf_text_heads_from_config_or_hf_default():
  assert config_from_hf(_hf_dict())[0].text.num_heads == 12
  d = _hf_dict()
  del d["text_config"]["num_attention_heads"]
  cfg, notes = config_from_hf(d)
  assert cfg.text.num_heads == 8 and any("HF default 8" in n for n in notes)


def test_hf_config_errors():
  with pytest.raises(ConversionError, match="hidden_act"):
    config_from_hf(_hf_dict(hidden_act="gelu_new"))
  d = _hf_dict()
  d["text_config"]["is_decoder"] = False
  with pytest.raises(ConversionError, match="is_decoder"):
    config_from_hf(d)
  with pytest.raises(ConversionError, match="not a BlipForImageTextRetrieval"):
    config_from_hf({"model_type": "clip"})


# --- formats and CLI ---------------------------------------------------------------------

def test_format_detection_errors(files, tmp_path):
  assert load_source(files["hf"]).format == "hf"
  assert load_source(files["orig"]).format == "original"
  with pytest.raises(ConversionError, match="not a Hugging Face model directory"):
    load_source(str(tmp_path))
  with pytest.raises(ConversionError, match="needs a model directory"):
    load_source(files["orig"], "hf")
  with pytest.raises(ConversionError, match="needs a checkpoint file"):
    load_source(files["hf"], "original")
  hf_file = os.path.join(files["hf"], "model.safetensors")
  with pytest.raises(ConversionError, match="Hugging Face keys"):
    load_source(hf_file)
  with pytest.raises(FileNotFoundError):
    load_source(str(tmp_path / "nope.pth"))


def test_cli_convert_and_export_with_stage_lines(files, tmp_path, capsys):
  out = str(tmp_path / "ckpt")
  assert main(["--src", files["orig"], "--out", out, "--format", "original",
               "--vision-heads", "4", "--text-heads", "4", "--image-size", "40"]) == 0
  lines = capsys.readouterr().out
  for stage in ("[1/4] load", "[2/4] map", "[3/4] check", "[4/4] write"):
    assert stage in lines
  assert "ignored groups: momentum_encoders 4" in lines
  assert load_param_dir(out).model.blip.vision.image_size == 40
  hf_out = str(tmp_path / "hf_out")
  assert main(["export", "--checkpoint", out, "--out", hf_out]) == 0
  assert "[4/4] write" in capsys.readouterr().out
  assert sorted(os.listdir(hf_out)) == ["config.json", "contextblip_jax_export.json",
                                        "model.safetensors"]
  assert main(["--src", files["orig"], "--out", str(tmp_path / "x")]) == 2   # width 32 heads
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "cannot infer vision heads" in err
  assert not (tmp_path / "x").exists()
  assert main(["--src", files["orig"], "--out", str(tmp_path / "y"), "--image-size", "36",
               "--vision-heads", "4", "--text-heads", "4"]) == 2
  assert "not a multiple of the patch size" in capsys.readouterr().err


def test_cli_export_from_a_stage2_workdir_loads_in_transformers_and_matches(tmp_path, capsys):
  """A fine-tuning stage-2 workdir (adapter, TMIM, prediction layer, context encoder) exports
  its BLIP part; the left-out groups are named; transformers loads it with our weights and
  outputs; converting it back gives the BLIP parameters exactly."""
  import jax
  import jax.numpy as jnp
  from transformers import BlipForImageTextRetrieval
  from contextblip_jax.models.blip import Blip
  from tests.helpers.loops import make_export
  work = make_export(tmp_path / "finetune2", "finetune2", seed=5, tree="all", step=3)
  hf_out = str(tmp_path / "hf_out")
  assert main(["export", "--checkpoint", work, "--out", hf_out]) == 0
  lines = capsys.readouterr().out
  assert f"[1/4] load: {os.path.join(work, 'export')} (stage finetune2 step 3;" in lines
  assert ("vision_adapter (ContextBLIP multi-scale adapter) is not representable in "
          "BlipForImageTextRetrieval and is left out") in lines
  assert ("groups without a Hugging Face counterpart, left out: context_encoder, "
          "decoder_pos_embed, mask_embed, prediction_layer, recon_head, text_adapter, "
          "visual_decoder") in lines
  pd = load_param_dir(work)
  back, info = BlipForImageTextRetrieval.from_pretrained(hf_out, output_loading_info=True)
  back.eval()
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  want, got = to_state_dict(pd.params, pd.model.blip), back.state_dict()
  assert set(want) <= set(got)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
  again = load_param_dir(convert(hf_out, str(tmp_path / "again")))
  assert set(again.params) == {"pretrained_blip"}
  flat_a, flat_b = _flat(again.params), _flat({"pretrained_blip": pd.params["pretrained_blip"]})
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  pixels, ids, mask = tr.sample_inputs(batch=2, image_size=32, length=8)
  with torch.no_grad():
    hf = back(input_ids=tr.with_enc(ids), pixel_values=pixels, attention_mask=mask,
              use_itm_head=True).itm_score.numpy()
  m, p = Blip(pd.model.blip), {"params": pd.params["pretrained_blip"]}
  with jax.default_matmul_precision("highest"):
    embeds = m.apply(p, tr.nhwc(pixels), method=Blip.encode_image).last_hidden_state
    ours = m.apply(p, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), embeds,
                   method=Blip.itm)
  np.testing.assert_allclose(np.asarray(ours), hf, rtol=0, atol=1e-5)


def test_cli_subprocess_hf_conversion_never_imports_torch(files, tmp_path):
  out = str(tmp_path / "ckpt")
  code = ("import sys; from weight_convert.__main__ import main; "
          f"rc = main(['--src', {files['hf']!r}, '--out', {out!r}]); "
          "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[4/4] write" in proc.stdout
  assert load_param_dir(out).model.blip.text.num_heads == 4


def test_cli_help_documents_both_modes(capsys):
  with pytest.raises(SystemExit) as exc:
    main(["--help"])
  assert exc.value.code == 0
  text = capsys.readouterr().out
  assert "--src PATH --out DIR" in text and "export --checkpoint DIR --out HF_DIR" in text


# --- the scanned layout ------------------------------------------------------------------

def test_cli_scan_layers_writes_the_stacked_tree_and_exports_the_same(files, tmp_path):
  """`--scan-layers` on a ContextBLIP checkpoint (adapter included): model.json records the
  layout, the tree is the unscanned conversion stacked, export gives the same state dict."""
  from contextblip_jax.models import layout
  plain, stacked = str(tmp_path / "plain"), str(tmp_path / "stacked")
  heads = ["--vision-heads", "4", "--text-heads", "4"]
  assert main(["--src", files["cb"], "--out", plain] + heads) == 0
  assert main(["--src", files["cb"], "--out", stacked, "--scan-layers"] + heads) == 0
  a, b = load_param_dir(plain), load_param_dir(stacked)
  assert b.model.scan_layers and not a.model.scan_layers and b.model.use_adapter
  assert b.model == a.model.with_layers(scan_layers=True)
  fa, fb = _flat(layout.to_layout(a.params, True)), _flat(b.params)
  assert fa.keys() == fb.keys()
  assert fb["pretrained_blip/text_encoder/encoder/layer/crossattention/key/kernel"].shape[0] == 2
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
  sa, sb = to_state_dict(a.params, a.model.blip), to_state_dict(b.params, b.model.blip)
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
