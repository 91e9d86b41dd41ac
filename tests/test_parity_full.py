"""Full-size (BLIP-base, ViT-B/16 + BERT-base) parity with transformers, at 224 and 384 px.

Slow (~4 minutes on 2 cores, 6.3 GB peak memory): `.venv/bin/python -m pytest -m slow -s
tests/test_parity_full.py`. A random-init HF `BlipForImageTextRetrieval` (12 heads, vision eps
1e-6, dropout 0, weights N(0, 0.02)) is converted with the project's converter - at 224 px from
an original-format `.pth` (the model_base.pth path, heads inferred as width // 64), at 384 px
from a HF directory (the hub ITM-coco path) - and compared in float32 with 'highest' matmul
precision: ITM probability ([ENC] at position 0), ITC similarities, final image embeddings,
multimodal and text-mode text states. Max abs differences are printed.

Measured (2 cores, this project's machine): ITM prob <= 1.2e-7, ITC sim <= 1.6e-7, image
embeds <= 5.2e-6, text states <= 7.2e-6 (values up to |7|, i.e. ~1e-6 relative).
Tolerances: 1e-6 for the probabilities/similarities and 2e-5 for the O(1..10) hidden states:
12 float32 layers summed in different orders (XLA vs MKL GEMMs) put the states at ~5e-6 here,
and another CPU's BLAS kernels may add a little; any mapping error gives O(0.1-1).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers import torch_reference as tr
from contextblip_jax.models.blip import Blip
from contextblip_jax.storage.param_dir import load_param_dir
from weight_convert import convert

TOLS = {"itm": 1e-6, "sim": 1e-6, "image_embeds": 2e-5, "mm": 2e-5, "txt": 2e-5}


@functools.partial(jax.jit, static_argnums=0)
def _ours(m, p, pixels, ids, mask):
  def run(mod, pixels, ids, mask):
    image_embeds = mod.encode_image(pixels).last_hidden_state
    mm = mod.multimodal(ids, mask, image_embeds)                         # [ENC] at 0
    txt = mod.text_encoder(ids, mask, mode="text").last_hidden_state
    sim = mod.image_features(image_embeds) @ mod.text_features(ids, mask).T
    return dict(image_embeds=image_embeds, itm=jax.nn.softmax(mod.itm_from_states(
        mm.last_hidden_state), -1)[:, 1], mm=mm.last_hidden_state, txt=txt, sim=sim)
  return m.apply(p, pixels, ids, mask, method=run)


@torch.no_grad()
def _theirs(model, pixels, ids, mask):
  enc = tr.with_enc(ids)
  vis = model.vision_model(pixels).last_hidden_state
  ones = torch.ones(vis.shape[:2], dtype=torch.long)
  mm = model.text_encoder(input_ids=enc, attention_mask=mask, encoder_hidden_states=vis,
                          encoder_attention_mask=ones).last_hidden_state
  txt = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
  itm = model(input_ids=enc, pixel_values=pixels, attention_mask=mask).itm_score
  sim = model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
              use_itm_head=False).itm_score
  return dict(image_embeds=vis, itm=itm.softmax(-1)[:, 1], mm=mm, txt=txt, sim=sim)


@pytest.mark.slow
@pytest.mark.parametrize("image_size,fmt", [(224, "original"), (384, "hf")])
def test_blip_base_parity(image_size, fmt, tmp_path):
  model = tr.build_hf_model(tr.base_hf_config(image_size), seed=image_size, std=0.02)
  if fmt == "hf":
    src = tr.save_hf_dir(model, str(tmp_path / "hf"))
  else:
    src = tr.save_original(tr.original_state_dict(model), str(tmp_path / "model_base.pth"))
  pre = load_param_dir(convert(src, str(tmp_path / "converted"), log=print))
  assert pre.model.blip.vision.num_heads == 12 and pre.model.blip.text.num_heads == 12
  assert pre.model.blip.vision.layer_norm_eps == 1e-6
  pixels, ids, mask = tr.sample_inputs(batch=2, image_size=image_size, length=30, seed=1)
  theirs = _theirs(model, pixels, ids, mask)
  del model
  ours = _ours(Blip(pre.model.blip), {"params": pre.params["pretrained_blip"]},
               tr.nhwc(pixels), jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
  print(f"\nBLIP-base {image_size} px ({fmt} source): max abs diff")
  diffs = {}
  for k in ("itm", "sim", "image_embeds", "mm", "txt"):
    a, b = np.asarray(ours[k]), theirs[k].numpy()
    assert a.shape == b.shape, (k, a.shape, b.shape)
    diffs[k] = float(np.abs(a - b).max())
    print(f"  {k:14s} {diffs[k]:.3e}   (|ref| max {np.abs(b).max():.3g})")
  print(f"  ITM probabilities: ours {np.asarray(ours['itm'])} HF {theirs['itm'].numpy()}")
  assert all(diffs[k] < TOLS[k] for k in diffs), (diffs, TOLS)
