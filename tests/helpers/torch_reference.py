"""PyTorch reference helpers shared by the converter and parity tests (tests only).

Builds random-weight transformers `BlipForImageTextRetrieval` models from explicit configs
(vision LayerNorm eps 1e-6 and text heads set, dropout 0) and writes them as a HF directory,
an original Salesforce-format `.pth` (keys renamed back by `hf_key_to_original`, written here
independently of the converter's table, plus keys from the groups the converter must ignore)
or a ContextBLIP checkpoint (`pretrained_blip.` prefix, adapter keys).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from transformers import BlipConfig as HFBlipConfig
from transformers import BlipForImageTextRetrieval

VOCAB_SIZE = 30524
ENC_TOKEN_ID = 30523


def hf_config(*, image_size=32, patch_size=8, vision_width=32, vision_depth=4, vision_heads=4,
              vision_mlp=64, text_width=32, text_layers=2, text_heads=4, text_mlp=64,
              max_positions=64, embed_dim=16, vision_eps=1e-6) -> HFBlipConfig:
  """A HF BlipConfig with every BLIP-relevant field explicit (defaults: the tiny variant)."""
  return HFBlipConfig(
      vision_config=dict(hidden_size=vision_width, num_hidden_layers=vision_depth,
                         num_attention_heads=vision_heads, intermediate_size=vision_mlp,
                         image_size=image_size, patch_size=patch_size,
                         layer_norm_eps=vision_eps, attention_dropout=0.0),
      text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=text_width,
                       num_hidden_layers=text_layers, num_attention_heads=text_heads,
                       intermediate_size=text_mlp, max_position_embeddings=max_positions,
                       encoder_hidden_size=vision_width, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0),
      image_text_hidden_size=embed_dim)


def base_hf_config(image_size: int = 224) -> HFBlipConfig:
  """BLIP-base (ViT-B/16 + BERT-base, 12 heads each, eps 1e-6)."""
  return hf_config(image_size=image_size, patch_size=16, vision_width=768, vision_depth=12,
                   vision_heads=12, vision_mlp=3072, text_width=768, text_layers=12,
                   text_heads=12, text_mlp=3072, max_positions=512, embed_dim=256)


@torch.no_grad()
def build_hf_model(config: HFBlipConfig, seed: int = 0, std: float = 0.05
                   ) -> BlipForImageTextRetrieval:
  """Eval-mode model with every parameter redrawn (HF's vision init is ~1e-10, too trivial):
  weights N(0, std), biases N(0, std), LayerNorm weights 1 + N(0, 0.1)."""
  torch.manual_seed(seed)
  model = BlipForImageTextRetrieval(config).eval()
  for name, p in model.named_parameters():
    if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight"):
      p.copy_(1.0 + 0.1 * torch.randn_like(p))
    else:
      p.copy_(std * torch.randn_like(p))
  return model


_HF_TO_ORIGINAL = (   # the inverse of rename_key in convert_blip_original_pytorch_to_hf.py
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.",
     r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.",
     r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
)


def hf_key_to_original(key: str) -> str:
  for pattern, repl in _HF_TO_ORIGINAL:
    if re.search(pattern, key):
      return re.sub(pattern, repl, key)
  return key              # text_encoder.*, itm_head, vision_proj, text_proj are identical


def original_state_dict(model: BlipForImageTextRetrieval, extras: bool = True
                        ) -> dict[str, torch.Tensor]:
  """The model's weights under Salesforce BLIP names, plus (extras) keys of every group a
  pre-train/retrieval checkpoint holds that the converter must ignore."""
  sd = {hf_key_to_original(k): v.clone() for k, v in model.state_dict().items()}
  if not extras:
    return sd
  g = torch.Generator().manual_seed(1)
  d = sd["vision_proj.weight"].shape[0]
  word = sd["text_encoder.embeddings.word_embeddings.weight"]
  sd["text_decoder.bert.embeddings.word_embeddings.weight"] = word.clone()
  sd["text_decoder.cls.predictions.bias"] = torch.zeros(word.shape[0])
  for k in ("visual_encoder.cls_token", "visual_encoder.blocks.0.attn.qkv.weight"):
    sd[k.replace("visual_encoder.", "visual_encoder_m.", 1)] = sd[k] + 1.0
  sd["text_encoder_m.embeddings.LayerNorm.weight"] = torch.ones(word.shape[1])
  sd["vision_proj_m.weight"] = torch.randn(sd["vision_proj.weight"].shape, generator=g)
  sd["temp"] = torch.tensor(0.07)
  sd["image_queue"] = torch.randn(d, 8, generator=g)
  sd["text_queue"] = torch.randn(d, 8, generator=g)
  sd["idx_queue"] = torch.zeros(1, 8, dtype=torch.long)
  sd["ptr_queue"] = torch.zeros(1, dtype=torch.long)
  sd["text_encoder.embeddings.position_ids"] = torch.arange(
      sd["text_encoder.embeddings.position_embeddings.weight"].shape[0])[None]
  return sd


def contextblip_state_dict(model: BlipForImageTextRetrieval, num_taps: int = 4,
                           reduction: int = 2, seed: int = 2) -> dict[str, torch.Tensor]:
  """A ContextBLIP checkpoint without TMIM (contextual_new.py Adapter_BLIP): BLIP_Base under
  `pretrained_blip.` and the multi-scale adapter (`vision_adapter.down.{i}.fc.0.weight`
  [D/delta, D], `up.fc.0.weight` [D, n*D/delta]). Checkpoints of every stage, TMIM modules
  included, are built in tests/test_weight_convert_stages.py."""
  g = torch.Generator().manual_seed(seed)
  sd = {f"pretrained_blip.{k}": v for k, v in original_state_dict(model, extras=False).items()}
  sd["pretrained_blip.text_encoder.embeddings.position_ids"] = torch.arange(8)[None]
  d = sd["pretrained_blip.visual_encoder.cls_token"].shape[-1]
  r = d // reduction
  for i in range(num_taps):
    sd[f"vision_adapter.down.{i}.fc.0.weight"] = torch.randn(r, d, generator=g)
  sd["vision_adapter.up.fc.0.weight"] = torch.randn(d, num_taps * r, generator=g)
  return sd


def save_hf_dir(model: BlipForImageTextRetrieval, path: str) -> str:
  model.save_pretrained(path)          # config.json + model.safetensors
  return path


def save_original(state: dict[str, torch.Tensor], path: str, wrap: str | None = "model",
                  **top_level) -> str:
  """torch.save({'model': state, **top_level}) (or the bare state when wrap is None)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  torch.save({wrap: state, **top_level} if wrap else state, path)
  return path


def sample_inputs(batch: int = 2, image_size: int = 32, length: int = 8, seed: int = 0):
  """(pixels [B, 3, S, S] torch, input_ids [B, T] ([CLS] ... [SEP] [PAD]...), mask [B, T]).

  Row 0 is padded (mask zeros at the end); the last row fills the whole length."""
  g = torch.Generator().manual_seed(seed)
  pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
  ids = torch.zeros(batch, length, dtype=torch.long)
  mask = torch.zeros(batch, length, dtype=torch.long)
  for b in range(batch):
    n = max(3, length - 3 * (batch - 1 - b))                # real tokens incl. [CLS], [SEP]
    ids[b, 0], ids[b, n - 1] = 101, 102
    ids[b, 1:n - 1] = torch.randint(1000, 30000, (n - 2,), generator=g)
    mask[b, :n] = 1
  return pixels, ids, mask


def with_enc(ids: torch.Tensor) -> torch.Tensor:
  out = ids.clone()
  out[:, 0] = ENC_TOKEN_ID
  return out


def nhwc(pixels: torch.Tensor) -> np.ndarray:
  return pixels.permute(0, 2, 3, 1).numpy()
