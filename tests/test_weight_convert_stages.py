"""The authors' ContextBLIP checkpoints of every stage through weight_convert.

State dicts are built in exactly the layouts the authors' code saves (github.com/LHL3341/
ContextBLIP), from small torch modules written here after their layers:
  pretrain  main.py torch.save({'model': Adapter_BLIP.state_dict(), ...}) with
            models/multiscale_adapter.py Adapter_BLIP (mask_rate > 0): pretrained_blip (BLIP_Base),
            vision_adapter (MultiLevelAdapter), visual_decoder (med.BertModel without embeddings
            but with their position_ids buffer), decoder_pos_embed, recon_head, mask_embed,
            text_adapter (Adapter: fc.0 / fc.2)
  stage1    finetune_notf.py torch.save({'epoch', 'model_state_dict', 'optimizer_state_dict'})
            of ContextualBLIP: blip (contextual_new.Adapter_BLIP) + prediction_layer
  stage2    finetune_context.py, the same wrapper: blip (the stage-1 module), transformer
            (2 x extras_.BertLayer), positional_emb
Neither fine-tuning script wraps the model in DataParallel and pre-training saves
`model_without_ddp`, so no `module.` prefix appears (a uniform one is still accepted).
BLIP_Base's weights come from a random tiny transformers BLIP renamed to Salesforce keys.
"""

import json
import math
import os

import flax
import jax
import numpy as np
import pytest
import torch
from torch import nn

from contextblip_jax.models.contextblip import ContextBlip
from contextblip_jax.storage.param_dir import load_param_dir
from tests.helpers import torch_reference as tr
from weight_convert import (ConversionError, convert, load_source, to_flax,
                            to_authors_state_dict)
from weight_convert.__main__ import main

D = 32                 # tiny width (vision = text), tr.hf_config()
PATCHES, PATCH_PX = 16, 8 * 8 * 3
TAPS, DELTA = 4, 2
DEC_LAYERS, CTX_LAYERS, HEADS, K = 2, 2, 8, 10
MAX_POS = 64


# ------------------------------------------------------------------ the authors' layers

class LayerNorm(nn.Module):
  """volta BertLayerNorm (TF style, eps inside the sqrt): weight / bias."""
  def __init__(self, d, eps=1e-12):
    super().__init__()
    self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
    self.eps = eps

  def forward(self, x):
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return self.weight * (x - u) / torch.sqrt(s + self.eps) + self.bias


class SelfAttention(nn.Module):
  def __init__(self, d, heads, kv_width=None):
    super().__init__()
    self.heads = heads
    self.query = nn.Linear(d, d)
    self.key = nn.Linear(kv_width or d, d)
    self.value = nn.Linear(kv_width or d, d)

  def forward(self, x, mask):
    b, n, d = x.shape
    split = lambda t: t.view(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + mask
    ctx = scores.softmax(-1) @ v
    return ctx.permute(0, 2, 1, 3).reshape(b, n, d)


class SelfOutput(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.dense, self.LayerNorm = nn.Linear(d, d), LayerNorm(d)

  def forward(self, h, x):
    return self.LayerNorm(self.dense(h) + x)


class Attention(nn.Module):
  def __init__(self, d, heads, kv_width=None):
    super().__init__()
    self.self = SelfAttention(d, heads, kv_width)
    self.output = SelfOutput(d)

  def forward(self, x, mask):
    return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
  def __init__(self, d, ff):
    super().__init__()
    self.dense = nn.Linear(d, ff)

  def forward(self, x):
    x = self.dense(x)
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))     # volta / BERT exact gelu


class Output(nn.Module):
  def __init__(self, d, ff):
    super().__init__()
    self.dense, self.LayerNorm = nn.Linear(ff, d), LayerNorm(d)

  def forward(self, h, x):
    return self.LayerNorm(self.dense(h) + x)


class BertLayer(nn.Module):
  """extras_.BertLayer (fp32, as the reference); with `cross` the med.py decoder layer's names."""
  def __init__(self, d, heads, ff, cross=False):
    super().__init__()
    self.attention = Attention(d, heads)
    if cross:
      self.crossattention = Attention(d, heads, kv_width=D)
    self.intermediate = Intermediate(d, ff)
    self.output = Output(d, ff)

  def forward(self, x, mask):
    a = self.attention(x, mask)
    return self.output(self.intermediate(a), a)


class Sampler(nn.Module):
  """DownSampler / UpSampler: fc = Sequential(Linear(bias=False), ReLU)."""
  def __init__(self, d_in, d_out):
    super().__init__()
    self.fc = nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.ReLU())


class MultiLevelAdapter(nn.Module):
  def __init__(self):
    super().__init__()
    self.down = nn.ModuleList([Sampler(D, D // DELTA) for _ in range(TAPS)])
    self.up = Sampler(TAPS * D // DELTA, D)


class TextAdapter(nn.Module):
  def __init__(self):
    super().__init__()
    self.fc = nn.Sequential(nn.Linear(D, D // 2, bias=False), nn.ReLU(),
                            nn.Linear(D // 2, D, bias=False), nn.ReLU())


class DecoderEmbeddings(nn.Module):
  """med.BertEmbeddings with word/position embeddings and LayerNorm set to None: the buffer."""
  def __init__(self):
    super().__init__()
    self.register_buffer("position_ids", torch.arange(MAX_POS).expand((1, -1)))


class Encoder(nn.Module):
  def __init__(self, layers):
    super().__init__()
    self.layer = nn.ModuleList(layers)


class VisualDecoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.embeddings = DecoderEmbeddings()
    self.encoder = Encoder([BertLayer(D, HEADS, 64, cross=True) for _ in range(DEC_LAYERS)])


class AdapterBlipModules(nn.Module):
  """The attributes of Adapter_BLIP besides pretrained_blip (added from the BLIP state dict):
  multiscale_adapter.py's (tmim=True) or contextual_new.py's (tmim=False)."""
  def __init__(self, tmim):
    super().__init__()
    self.vision_adapter = MultiLevelAdapter()
    if tmim:
      self.visual_decoder = VisualDecoder()
      self.decoder_pos_embed = nn.Embedding(PATCHES + 1, D)
      self.recon_head = nn.Linear(D, PATCH_PX)
      self.mask_embed = nn.Parameter(torch.randn(D))
      self.text_adapter = TextAdapter()


class ContextHead(nn.Module):
  """finetune_context.py ContextualBLIP without its frozen `blip`: transformer, positional_emb;
  `forward` is its forward after the features, with the stage-1 prediction layer."""
  def __init__(self):
    super().__init__()
    self.transformer = nn.ModuleList([BertLayer(D, HEADS, 64) for _ in range(CTX_LAYERS)])
    self.positional_emb = nn.Embedding(K, D)

  def forward(self, features, pos_mask, prediction_layer):
    x = features + self.positional_emb(torch.arange(features.shape[0])) * pos_mask
    x = x.unsqueeze(0)
    mask = torch.ones((1, 1, 1, features.shape[0]))
    for layer in self.transformer:
      x = layer(x, mask)
    return prediction_layer(x + features)


@torch.no_grad()
def _randomize(module, seed):
  g = torch.Generator().manual_seed(seed)
  for name, p in module.named_parameters():
    if "LayerNorm" in name and name.endswith("weight"):
      p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    else:
      p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return module


def _blip_state(blip_model):
  sd = tr.original_state_dict(blip_model, extras=False)
  sd["text_encoder.embeddings.position_ids"] = torch.arange(MAX_POS)[None]
  return sd


def _adapter_blip_state(blip_sd, modules):
  return {**{f"pretrained_blip.{k}": v for k, v in blip_sd.items()}, **modules.state_dict()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  blip_sd = _blip_state(tr.build_hf_model(tr.hf_config(), seed=0))
  pre = _randomize(AdapterBlipModules(tmim=True), 1)
  pretrain = _adapter_blip_state(blip_sd, pre)
  ft = _randomize(AdapterBlipModules(tmim=False), 2)
  prediction_layer = _randomize(nn.Linear(D, 1), 3)
  stage1 = {**{f"blip.{k}": v for k, v in _adapter_blip_state(blip_sd, ft).items()},
            **{f"prediction_layer.{k}": v for k, v in prediction_layer.state_dict().items()}}
  head = _randomize(ContextHead(), 4)
  stage2 = {**{f"blip.{k}": v for k, v in stage1.items()}, **head.state_dict()}
  optim = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 2e-6,
                                                                        "params": [0]}]}
  files = dict(
      pretrain=tr.save_original(pretrain, str(root / "0.25_4_2d_3106.pth"), wrap="model",
                                optimizer=optim, epoch=19),
      stage1=_save(root / "4_0.25_0.3719_17.pt", stage1, optim),
      stage2=_save(root / "CONTEXTUAL_blip_best_0.4.pt", stage2, optim))
  return dict(root=root, files=files, states=dict(pretrain=pretrain, stage1=stage1,
                                                  stage2=stage2),
              head=head.eval(), prediction_layer=prediction_layer, pre=pre)


def _save(path, state, optim):
  torch.save({"epoch": 17, "model_state_dict": state, "optimizer_state_dict": optim}, str(path))
  return str(path)


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _to_np(x):
  return x.detach().numpy()


# ------------------------------------------------------------------ every key, every leaf

GROUPS = {"pretrain": {"pretrained_blip", "vision_adapter", "text_adapter", "visual_decoder",
                       "decoder_pos_embed", "recon_head", "mask_embed"},
          "stage1": {"pretrained_blip", "vision_adapter", "prediction_layer"},
          "stage2": {"pretrained_blip", "vision_adapter", "prediction_layer", "context_encoder"}}
BUFFERS = {"pretrain": 2, "stage1": 1, "stage2": 1}   # position_ids buffers (ignored)


@pytest.mark.parametrize("stage", ["pretrain", "stage1", "stage2"])
def test_every_source_key_lands_once_and_every_leaf_is_filled(ckpts, stage):
  source = load_source(ckpts["files"][stage])
  assert source.layout == stage
  conv = to_flax(source, vision_heads=4, text_heads=4)
  rep, flat = conv.report, _flat(conv.params)
  assert set(conv.params) == GROUPS[stage]
  # one-to-one: every source tensor is used exactly once or is a named buffer
  assert rep.ignored == {"position_ids": BUFFERS[stage]}
  assert len(rep.used) == len(flat) == len(source.arrays) - BUFFERS[stage]
  assert not rep.missing and not rep.unexpected and not rep.misshaped
  # every leaf holds the values of a distinct source tensor (random values: no two alike)
  sig = lambda x: np.sort(np.asarray(x, np.float32).ravel()).tobytes()  # noqa: E731
  sigs = {}
  for key in rep.used:
    sigs.setdefault(sig(source.numpy(key)), []).append(key)
  assert all(len(v) == 1 for v in sigs.values())
  assert {sig(leaf) for leaf in flat.values()} == set(sigs)
  print(f"\n{stage}: {len(source.arrays)} source tensors, {len(rep.used)} converted, "
        f"{BUFFERS[stage]} position_ids buffers ignored; groups {sorted(conv.params)}")


def test_pretrain_tmim_modules_land_where_the_reference_reads_them(ckpts):
  conv = to_flax(load_source(ckpts["files"]["pretrain"]), vision_heads=4, text_heads=4)
  p, m, pre = conv.params, conv.model, ckpts["pre"]
  assert (m.decoder_layers, m.decoder_heads, m.text_adapter_reduction) == (DEC_LAYERS, 8, 2)
  layer = p["visual_decoder"]["encoder"]["layer_1"]
  ref = pre.visual_decoder.encoder.layer[1]
  np.testing.assert_array_equal(layer["crossattention"]["key"]["kernel"],
                                _to_np(ref.crossattention.self.key.weight).T)
  np.testing.assert_array_equal(layer["attention"]["LayerNorm"]["scale"],
                                _to_np(ref.attention.output.LayerNorm.weight))
  np.testing.assert_array_equal(layer["output_LayerNorm"]["bias"],
                                _to_np(ref.output.LayerNorm.bias))
  np.testing.assert_array_equal(p["decoder_pos_embed"]["embedding"],
                                _to_np(pre.decoder_pos_embed.weight))
  np.testing.assert_array_equal(p["recon_head"]["kernel"], _to_np(pre.recon_head.weight).T)
  np.testing.assert_array_equal(p["mask_embed"], _to_np(pre.mask_embed))
  for i in (0, 2):
    np.testing.assert_array_equal(p["text_adapter"][f"fc_{i}"]["kernel"],
                                  _to_np(pre.text_adapter.fc[i].weight).T)
  # left out on request: the TMIM keys become one named ignored group
  rep = to_flax(load_source(ckpts["files"]["pretrain"]), vision_heads=4, text_heads=4,
                tmim=False).report
  assert rep.ignored == {"contextblip_tmim": len(_flat(
      {k: p[k] for k in GROUPS["pretrain"] - {"pretrained_blip", "vision_adapter"}})),
      "position_ids": 2}


# ------------------------------------------------------------------ stage-2 forward vs torch

def test_stage2_forward_equals_the_torch_layers(ckpts):
  conv = to_flax(load_source(ckpts["files"]["stage2"]), vision_heads=4, text_heads=4)
  m = conv.model
  assert (m.context_layers, m.context_heads, m.num_candidates) == (CTX_LAYERS, HEADS, K)
  model = ContextBlip(m)
  rng = np.random.default_rng(0)
  feat = rng.normal(size=(2, K, D)).astype(np.float32)
  feat /= np.linalg.norm(feat, axis=-1, keepdims=True)
  is_video = np.array([1.0, 0.0], np.float32)
  ours = np.asarray(model.apply({"params": conv.params}, feat, is_video,
                                method=ContextBlip.stage2_logits))
  with torch.no_grad():
    ref = np.stack([ckpts["head"](torch.from_numpy(feat[g]),
                                  torch.full((K, 1), float(is_video[g])),
                                  ckpts["prediction_layer"])[0, :, 0].numpy()
                    for g in range(2)])
    ref1 = ckpts["prediction_layer"](torch.from_numpy(feat))[..., 0].numpy()
  ours1 = np.asarray(model.apply({"params": conv.params}, feat,
                                 method=ContextBlip.stage1_logits))
  diff, diff1 = float(np.abs(ours - ref).max()), float(np.abs(ours1 - ref1).max())
  print(f"\nstage-2 forward: largest |flax - torch| = {diff:.3g} (video and static set; "
        f"logits up to {np.abs(ref).max():.3g}); stage-1 head: {diff1:.3g}")
  assert np.abs(ref[0] - ref[1]).max() > 1e-2      # the position table matters for video
  assert diff < 1e-5 and diff1 < 1e-6


# ------------------------------------------------------------------ scoring and export back

def test_stage2_directory_scores_with_head_stage2_and_exports_back(ckpts, capsys):
  from contextblip_jax.run import evaluate
  from tests.helpers.loops import compilation_cache, make_data, tiny_eval_config
  root, src = ckpts["root"], ckpts["files"]["stage2"]
  assert main(["--src", src, "--out", str(root / "s2"), "--vision-heads", "4",
               "--text-heads", "4"]) == 0
  out = capsys.readouterr().out
  assert "stage2 checkpoint; stage modules head, context" in out
  pd = load_param_dir(str(root / "s2"))
  assert set(pd.params) == GROUPS["stage2"] and pd.model.context_heads == HEADS
  data = make_data(root)
  cfg = tiny_eval_config(data, str(root / "s2"), head="stage2")
  cfg.eval.max_sets = 2
  with compilation_cache():
    model, _, _, _ = evaluate.load_eval_params(cfg, str(root / "ev"))
    assert model.config.context_heads == HEADS       # the directory's, not the tiny config's 4
    rep = evaluate.run(cfg, str(root / "ev"))
  recs = [json.loads(x) for x in open(rep["files"]["predictions"])]
  assert rep["all"]["n"] == len(recs) > 0
  assert all(len(r["scores"]) == K and np.all(np.isfinite(r["scores"])) for r in recs)

  # export back to the authors' layout: the same keys, the same values, the same wrapper
  assert main(["export", "--checkpoint", str(root / "s2"), "--out", str(root / "back.pth"),
               "--format", "authors"]) == 0
  back = torch.load(str(root / "back.pth"), weights_only=True)
  assert set(back) == {"model_state_dict"}
  back, want = back["model_state_dict"], ckpts["states"]["stage2"]
  assert set(back) == set(want)
  for k, v in want.items():
    assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
  again = to_flax(load_source(str(root / "back.pth")), vision_heads=4, text_heads=4)
  for path, leaf in _flat(again.params).items():
    np.testing.assert_array_equal(leaf, _flat(jax.device_get(pd.params))[path], err_msg=path)


@pytest.mark.parametrize("stage", ["pretrain", "stage1"])
def test_pretrain_and_stage1_export_back_to_their_keys(ckpts, stage):
  conv = to_flax(load_source(ckpts["files"][stage]), vision_heads=4, text_heads=4)
  state, notes = to_authors_state_dict(conv.params, conv.model)
  want = ckpts["states"][stage]
  assert set(state) == set(want) and notes == []
  for k, v in want.items():
    np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)


# ------------------------------------------------------------------ errors

def test_missing_unexpected_and_misshaped_stage_keys_are_named_with_the_file(ckpts, tmp_path):
  sd = dict(ckpts["states"]["stage2"])
  del sd["transformer.1.output.LayerNorm.bias"]
  del sd["blip.blip.pretrained_blip.itm_head.bias"]
  sd["blip.blip.extra_gate"] = torch.zeros(3)
  sd["positional_emb.weight"] = torch.zeros(K, D + 1)
  src = _save(tmp_path / "bad.pt", sd, {})
  with pytest.raises(ConversionError) as err:
    convert(src, str(tmp_path / "out"), vision_heads=4, text_heads=4)
  msg = str(err.value)
  assert src in msg and "missing source keys (2)" in msg
  assert "transformer.1.output.LayerNorm.bias (for context_encoder/transformer_1/" in msg
  assert "blip.blip.pretrained_blip.itm_head.bias (for pretrained_blip/itm_head/bias)" in msg
  assert "unexpected source keys (1)" in msg and "blip.blip.extra_gate" in msg
  assert "mis-shaped (1)" in msg and "positional_emb.weight [10, 33]" in msg
  assert not os.path.exists(tmp_path / "out")
  # a uniform DDP prefix is removed; the stage is still detected
  ddp = {f"module.{k}": v for k, v in ckpts["states"]["stage1"].items()}
  src = _save(tmp_path / "ddp.pt", ddp, {})
  source = load_source(src)
  assert source.layout == "stage1" and source.prefix == "module."
  del source.arrays["prediction_layer.bias"]
  with pytest.raises(ConversionError, match=r"module\.prediction_layer\.bias \(for "
                                            r"prediction_layer/bias\)"):
    to_flax(source, vision_heads=4, text_heads=4)
