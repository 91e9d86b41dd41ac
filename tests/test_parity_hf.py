"""Numerical parity of converted weights with transformers `BlipForImageTextRetrieval` (tiny).

A random tiny HF model (vision eps 1e-6, 4 heads, dropout 0, eval mode) is written as a HF
directory (safetensors) and as an original-format `.pth` (with ignored-group extras); both are
converted with the project's converter, the two parameter trees must be identical, and then
our Flax BLIP is compared with HF block by block in float32 ('highest' matmul precision, CPU):
vision embeddings, every block, post-LN; text embeddings, every layer in multimodal and text
mode, cross-attention probabilities; ITM probabilities ([ENC] and [CLS] paths); ITC sims.
A padded text exercises the masks. Max abs differences are printed (`pytest -s`).
Also: position-embedding resampling against HF `interpolate_pos_encoding`, and the export
round trip (our params -> HF directory -> transformers loads it -> identical outputs).
The same HF directory converted in the scanned layout (`scan_layers`) is the stacked tree,
matches HF at the same tolerance, and exports to the same state dict.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BlipForImageTextRetrieval

from tests.helpers import torch_reference as tr
from contextblip_jax.models import layers, layout
from contextblip_jax.models.bert import SELF_MASK_VALUE
from contextblip_jax.models.blip import Blip
from contextblip_jax.storage.param_dir import load_param_dir
from weight_convert import convert, export_hf, to_state_dict

TOL = 1e-5


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """HF model, inputs, and the params converted from both source formats."""
  d = tmp_path_factory.mktemp("parity")
  model = tr.build_hf_model(tr.hf_config(), seed=0)
  tr.save_hf_dir(model, str(d / "hf"))
  tr.save_original(tr.original_state_dict(model), str(d / "orig.pth"))
  from_hf = load_param_dir(convert(str(d / "hf"), str(d / "from_hf")))
  from_orig = load_param_dir(convert(str(d / "orig.pth"), str(d / "from_orig"),
                                      vision_heads=4, text_heads=4))
  pixels, ids, mask = tr.sample_inputs(batch=2, image_size=32, length=8)
  return dict(model=model, from_hf=from_hf, from_orig=from_orig, pixels=pixels, ids=ids,
              mask=mask, dir=d)


def _report(name, diffs):
  print(f"\n{name}: max abs diff per comparison")
  for k, v in diffs.items():
    print(f"  {k:40s} {v:.3e}")
  worst = max(diffs, key=diffs.get)
  assert diffs[worst] < TOL, f"{worst}: {diffs[worst]:.3e} >= {TOL}"


def _diff(ours, theirs) -> float:
  ours, theirs = np.asarray(ours), theirs.detach().numpy()
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max())


def test_both_formats_give_identical_params_and_config(ref):
  a, b = ref["from_hf"], ref["from_orig"]
  assert a.model.blip.vision == b.model.blip.vision
  assert a.model.blip.text == b.model.blip.text
  assert a.model.blip.embed_dim == b.model.blip.embed_dim
  fa = flax.traverse_util.flatten_dict(a.params, sep="/")
  fb = flax.traverse_util.flatten_dict(b.params, sep="/")
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@functools.partial(jax.jit, static_argnums=0)
def _vision_states(m, p, px):
  """Our ViT step by step: (embeddings, [each block output], encode_image with taps)."""
  def run(mod, px):
    x, blocks = mod.visual_encoder.embed(px), []
    emb = x
    for block in mod.visual_encoder.blocks:
      x = block(x)
      blocks.append(x)
    return emb, blocks, mod.encode_image(px, return_taps=True)
  return m.apply(p, px, method=run)


def test_vision_blockwise(ref):
  pre, model = ref["from_hf"], ref["model"]
  m, p = Blip(pre.model.blip), {"params": pre.params["pretrained_blip"]}
  px = tr.nhwc(ref["pixels"])
  with torch.no_grad():
    hf = model.vision_model(ref["pixels"], output_hidden_states=True)
    post_ln = model.vision_model.post_layernorm
    hf_taps = [post_ln(h) for h in hf.hidden_states[1:]]
  emb, blocks, out = _vision_states(m, p, px)
  diffs = {"embeddings": _diff(emb, hf.hidden_states[0])}
  for i, x in enumerate(blocks):
    diffs[f"block {i} output"] = _diff(x, hf.hidden_states[i + 1])
  for i, tap in enumerate(out.taps):
    diffs[f"tap {i} = post_LN(block {i})"] = _diff(tap, hf_taps[i])
  diffs["post-LN last_hidden_state"] = _diff(out.last_hidden_state, hf.last_hidden_state)
  _report("vision", diffs)


def _text_layers(m, p, ids, mask, image_embeds):
  """Our text encoder layer by layer -> (embeddings, [layer outputs], [cross probs])."""
  bias = layers.padding_bias(mask, SELF_MASK_VALUE)
  def run(mod, ids):
    h = emb = mod.text_encoder.embeddings(ids)
    outs, crosses = [], []
    for lyr in mod.text_encoder.encoder.layer:
      h, cross = lyr(h, bias, image_embeds, None)
      outs.append(h)
      crosses.append(cross)
    return emb, outs, crosses
  return m.apply(p, ids, method=run)


def test_text_blockwise_multimodal_and_text_mode(ref):
  pre, model = ref["from_hf"], ref["model"]
  m, p = Blip(pre.model.blip), {"params": pre.params["pretrained_blip"]}
  ids, mask = ref["ids"], ref["mask"]
  assert (mask == 0).any(), "the sample must contain padding to exercise the masks"
  image_embeds = m.apply(p, tr.nhwc(ref["pixels"]), method=Blip.encode_image).last_hidden_state
  with torch.no_grad():
    hf_img = model.vision_model(ref["pixels"]).last_hidden_state
    hf_mm = model.text_encoder(
        input_ids=ids, attention_mask=mask, encoder_hidden_states=hf_img,
        encoder_attention_mask=torch.ones(hf_img.shape[:2], dtype=torch.long),
        output_hidden_states=True, output_attentions=True)
    hf_txt = model.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
  depth, diffs = pre.model.blip.text.num_layers, {}
  j_ids, j_mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
  emb, outs, crosses = _text_layers(m, p, j_ids, j_mask, image_embeds)
  diffs["embeddings"] = _diff(emb, hf_mm.hidden_states[0])
  for i in range(depth):
    diffs[f"multimodal layer {i}"] = _diff(outs[i], hf_mm.hidden_states[i + 1])
    diffs[f"cross-attention probs layer {i}"] = _diff(crosses[i], hf_mm.cross_attentions[i])
  full = m.apply(p, j_ids, j_mask, image_embeds,
                 return_cross_attentions=True, replace_with_enc=False, method=Blip.multimodal)
  diffs["multimodal last_hidden_state"] = _diff(full.last_hidden_state, hf_mm.last_hidden_state)
  for i, c in enumerate(full.cross_attentions):
    diffs[f"multimodal() cross probs layer {i}"] = _diff(c, hf_mm.cross_attentions[i])
  _, outs, _ = _text_layers(m, p, j_ids, j_mask, None)
  for i in range(depth):
    diffs[f"text-mode layer {i}"] = _diff(outs[i], hf_txt.hidden_states[i + 1])
  _report("text", diffs)


def test_itm_probabilities_enc_and_cls_paths(ref):
  pre, model = ref["from_hf"], ref["model"]
  m, p = Blip(pre.model.blip), {"params": pre.params["pretrained_blip"]}
  ids, mask, pixels = ref["ids"], ref["mask"], ref["pixels"]
  image_embeds = m.apply(p, tr.nhwc(pixels), method=Blip.encode_image).last_hidden_state
  j_ids, j_mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
  diffs = {}
  for name, hf_ids, replace in (("[ENC] (ours replaces [CLS])", tr.with_enc(ids), True),
                                ("[CLS] (replace_with_enc=False)", ids, False)):
    with torch.no_grad():
      hf_logits = model(input_ids=hf_ids, pixel_values=pixels, attention_mask=mask,
                        use_itm_head=True).itm_score
    logits = m.apply(p, j_ids, j_mask, image_embeds, replace_with_enc=replace, method=Blip.itm)
    diffs[f"ITM logits {name}"] = _diff(logits, hf_logits)
    diffs[f"ITM prob {name}"] = _diff(jax.nn.softmax(logits, -1)[:, 1], hf_logits.softmax(-1)[:, 1])
  with torch.no_grad():
    enc_vs_cls = model(input_ids=tr.with_enc(ids), pixel_values=pixels, attention_mask=mask
                       ).itm_score - model(input_ids=ids, pixel_values=pixels,
                                           attention_mask=mask).itm_score
  assert float(enc_vs_cls.abs().max()) > 1e-4, "[ENC] vs [CLS] must matter in this test"
  _report("ITM", diffs)


def test_itc_similarities(ref):
  pre, model = ref["from_hf"], ref["model"]
  m, p = Blip(pre.model.blip), {"params": pre.params["pretrained_blip"]}
  ids, mask, pixels = ref["ids"], ref["mask"], ref["pixels"]
  with torch.no_grad():
    hf_sim = model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                   use_itm_head=False).itm_score                     # [B_img, B_txt]
  image_embeds = m.apply(p, tr.nhwc(pixels), method=Blip.encode_image).last_hidden_state
  img = m.apply(p, image_embeds, method=Blip.image_features)
  txt = m.apply(p, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()),
                method=Blip.text_features)
  _report("ITC", {"ITC similarity": _diff(img @ txt.T, hf_sim)})


def test_resampled_pos_embed_matches_hf_interpolate_pos_encoding(ref, tmp_path):
  """Converted at 48 px (4x4 -> 6x6 grid) vs HF's bicubic interpolate_pos_encoding at 48 px."""
  pre = load_param_dir(convert(str(ref["dir"] / "hf"), str(tmp_path / "r48"), image_size=48))
  assert pre.model.blip.vision.image_size == 48
  assert pre.params["pretrained_blip"]["visual_encoder"]["pos_embed"].shape == (1, 37, 32)
  pixels = tr.sample_inputs(batch=2, image_size=48, seed=3)[0]
  m, p = Blip(pre.model.blip), {"params": pre.params["pretrained_blip"]}
  ours = m.apply(p, tr.nhwc(pixels), method=Blip.encode_image).last_hidden_state
  with torch.no_grad():
    hf = ref["model"].vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
  _report("resampled 32 -> 48 px", {"vision last_hidden_state": _diff(ours, hf)})


def test_export_round_trip_loads_in_transformers_with_same_outputs(ref, tmp_path):
  pre, model = ref["from_orig"], ref["model"]
  out = export_hf(pre.params, pre.model.blip, str(tmp_path / "exported"))
  back, info = BlipForImageTextRetrieval.from_pretrained(out, output_loading_info=True)
  back.eval()
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  assert back.config.vision_config.layer_norm_eps == 1e-6
  assert back.config.text_config.num_attention_heads == 4
  want = model.state_dict()
  for k, v in back.state_dict().items():
    torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
  ids, mask, pixels = ref["ids"], ref["mask"], ref["pixels"]
  with torch.no_grad():
    for head in (True, False):
      a = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=head)
      b = back(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=head)
      assert torch.equal(a.itm_score, b.itm_score)
  again = load_param_dir(convert(out, str(tmp_path / "again")))
  fa = flax.traverse_util.flatten_dict(again.params, sep="/")
  fb = flax.traverse_util.flatten_dict(pre.params, sep="/")
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ------------------------------------------------------------------ scanned layers

@pytest.fixture(scope="module")
def scanned(ref):
  """The HF directory converted in the scanned layout (models/layout.py)."""
  return load_param_dir(convert(str(ref["dir"] / "hf"), str(ref["dir"] / "from_hf_scanned"),
                                scan_layers=True))


def test_scanned_conversion_is_the_stacked_unscanned_conversion(ref, scanned):
  assert scanned.model.scan_layers and not ref["from_hf"].model.scan_layers
  assert scanned.model == ref["from_hf"].model.with_layers(scan_layers=True)
  want = layout.to_layout(ref["from_hf"].params, True)
  fa = flax.traverse_util.flatten_dict(scanned.params, sep="/")
  fb = flax.traverse_util.flatten_dict(want, sep="/")
  assert fa.keys() == fb.keys()
  assert "pretrained_blip/visual_encoder/blocks/attn/qkv/kernel" in fa
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_scanned_layers_match_hf(ref, scanned):
  """Scanned model vs transformers: taps (post-LN of every block), final states, per-layer
  cross-attention probabilities, ITM (uncached and from the cached image K/V), ITC."""
  model = ref["model"]
  m, p = Blip(scanned.model.blip), {"params": scanned.params["pretrained_blip"]}
  ids, mask, pixels = ref["ids"], ref["mask"], ref["pixels"]
  j_ids, j_mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
  with torch.no_grad():
    hf = model.vision_model(pixels, output_hidden_states=True)
    hf_taps = [model.vision_model.post_layernorm(h) for h in hf.hidden_states[1:]]
    hf_mm = model.text_encoder(
        input_ids=tr.with_enc(ids), attention_mask=mask, encoder_hidden_states=hf.last_hidden_state,
        encoder_attention_mask=torch.ones(hf.last_hidden_state.shape[:2], dtype=torch.long),
        output_attentions=True)
    hf_itm = model(input_ids=tr.with_enc(ids), pixel_values=pixels, attention_mask=mask,
                   use_itm_head=True).itm_score
    hf_sim = model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                   use_itm_head=False).itm_score

  @jax.jit
  def run(p, px):
    def f(mod):
      vision = mod.encode_image(px, return_taps=True)
      e = vision.last_hidden_state
      mm = mod.multimodal(j_ids, j_mask, e, return_cross_attentions=True)
      cached = mod.itm_cached(j_ids, j_mask, mod.image_cross_kv(e))
      sim = mod.image_features(e) @ mod.text_features(j_ids, j_mask).T
      return vision, mm, mod.itm(j_ids, j_mask, e), cached, sim
    return m.apply(p, method=f)
  vision, mm, itm, cached, sim = run(p, tr.nhwc(pixels))
  diffs = {f"tap {i}": _diff(t, hf_taps[i]) for i, t in enumerate(vision.taps)}
  diffs["vision last_hidden_state"] = _diff(vision.last_hidden_state, hf.last_hidden_state)
  diffs["multimodal last_hidden_state"] = _diff(mm.last_hidden_state, hf_mm.last_hidden_state)
  assert len(mm.cross_attentions) == len(hf_mm.cross_attentions)
  for i, c in enumerate(mm.cross_attentions):
    diffs[f"cross probs layer {i}"] = _diff(c, hf_mm.cross_attentions[i])
  diffs["ITM logits"] = _diff(itm, hf_itm)
  diffs["ITM logits from cached K/V"] = _diff(cached, hf_itm)
  diffs["ITC similarity"] = _diff(sim, hf_sim)
  _report("scanned layers", diffs)


def test_scanned_export_equals_unscanned_export(ref, scanned):
  a = to_state_dict(scanned.params, scanned.model.blip)
  b = to_state_dict(ref["from_hf"].params, ref["from_hf"].model.blip)
  assert a.keys() == b.keys() == ref["model"].state_dict().keys() - {
      k for k in ref["model"].state_dict() if k.endswith("position_ids")}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------ attention paths

def test_fused_and_explicit_attention_paths_match_hf(ref):
  """The multimodal text encoder with attention_impl 'xla' (models/bert.py BertAttention):
  explicit float32 softmax (cross-attention probabilities asked for), jax.nn.dot_product_attention
  (not asked for; also in every self-attention and the ViT), and the fused path from cached
  image keys/values, each against HF. The other tests here run the default 'explicit'."""
  pre, model = ref["from_hf"], ref["model"]
  m, p = Blip(pre.model.blip.with_attention("xla")), {"params": pre.params["pretrained_blip"]}
  ids, mask, pixels = ref["ids"], ref["mask"], ref["pixels"]
  j_ids, j_mask = jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())
  with torch.no_grad():
    hf_img = model.vision_model(pixels).last_hidden_state
    hf = model.text_encoder(
        input_ids=ids, attention_mask=mask, encoder_hidden_states=hf_img,
        encoder_attention_mask=torch.ones(hf_img.shape[:2], dtype=torch.long)).last_hidden_state

  @jax.jit
  def run(p, px):
    def f(mod):
      e = mod.encode_image(px).last_hidden_state
      explicit = mod.multimodal(j_ids, j_mask, e, return_cross_attentions=True,
                                replace_with_enc=False)
      fused = mod.multimodal(j_ids, j_mask, e, replace_with_enc=False)
      cached = mod.multimodal_cached(j_ids, j_mask, mod.image_cross_kv(e),
                                     replace_with_enc=False)
      return explicit, fused, cached
    return m.apply(p, method=f)
  explicit, fused, cached = run(p, tr.nhwc(pixels))
  assert explicit.cross_attentions and not fused.cross_attentions
  _report("attention paths", {
      "explicit softmax (probabilities returned)": _diff(explicit.last_hidden_state, hf),
      "dot_product_attention": _diff(fused.last_hidden_state, hf),
      "dot_product_attention, cached K/V": _diff(cached.last_hidden_state, hf)})
