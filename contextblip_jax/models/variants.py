"""The one table of architecture sizes (`tiny`, `B/16`) for BLIP and the ContextBLIP heads.

Every module is configured by these frozen (hashable) dataclasses, so a variant can be passed
as a static argument to `jax.jit` and stored in a checkpoint directory as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """BLIP ViT (pre-norm, fused qkv, CLS-inclusive position embedding)."""
  image_size: int = 224      # input resolution (square)
  patch_size: int = 16       # patch side in pixels
  width: int = 768           # token width D
  depth: int = 12            # number of blocks
  num_heads: int = 12        # attention heads (head_dim = width // num_heads)
  mlp_dim: int = 3072        # hidden size of the block MLP
  layer_norm_eps: float = 1e-6  # BLIP uses 1e-6 (HF default 1e-5 differs)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """BLIP text encoder (post-LN BERT with a cross-attention sublayer in every layer)."""
  vocab_size: int = 30524    # bert-base-uncased + [DEC] + [ENC]
  hidden_size: int = 768     # token width
  num_layers: int = 12       # encoder layers
  num_heads: int = 12        # attention heads
  intermediate_size: int = 3072  # FFN width
  max_position_embeddings: int = 512  # learned absolute positions
  layer_norm_eps: float = 1e-12  # BERT LayerNorm eps
  hidden_dropout: float = 0.1    # dropout after embeddings and each sublayer
  attention_dropout: float = 0.1  # dropout on attention probabilities
  encoder_width: int = 768   # width of the image tokens cross-attended to
  add_cross_attention: bool = True  # a cross-attention sublayer in every layer


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """BLIP_Base: ViT + text encoder + ITM head + ITC projections."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  embed_dim: int = 256       # ITC projection width

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BlipConfig":
    unknown = set(d) - {"vision", "text", "embed_dim"}
    if unknown:
      raise ValueError(f"Unknown BlipConfig keys: {sorted(unknown)}")
    return cls(vision=VisionConfig(**d.get("vision", {})),
               text=TextConfig(**d.get("text", {})),
               embed_dim=d.get("embed_dim", 256))

  def replace(self, **kw) -> "BlipConfig":
    return dataclasses.replace(self, **kw)


def _tiny(image_size: int = 32) -> BlipConfig:
  return BlipConfig(
      vision=VisionConfig(image_size=image_size, patch_size=8, width=32, depth=4,
                          num_heads=4, mlp_dim=64),
      text=TextConfig(vocab_size=30524, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=64, encoder_width=32),
      embed_dim=16)


def _base(image_size: int = 224) -> BlipConfig:
  return BlipConfig(vision=VisionConfig(image_size=image_size), text=TextConfig(), embed_dim=256)


# name -> factory(image_size) ; the image size is a separate argument so that `B/16` covers the
# 224 px pre-train checkpoints and the 384 px retrieval checkpoints alike.
VARIANTS = {
    "tiny": (_tiny, 32),
    "B/16": (_base, 224),
}


def get_variant(name: str, image_size: int | None = None) -> BlipConfig:
  """Returns the BlipConfig of a named variant, e.g. `get_variant("B/16", 384)`."""
  if name not in VARIANTS:
    raise ValueError(f"Unknown model variant {name!r}; known: {sorted(VARIANTS)}")
  factory, default_size = VARIANTS[name]
  return factory(image_size or default_size)
