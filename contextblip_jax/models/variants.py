"""The one table of architecture sizes (`tiny`, `B/16`) for BLIP and the ContextBLIP heads.

Every module is configured by these frozen (hashable) dataclasses, so a variant can be passed
as a static argument to `jax.jit` and stored in a checkpoint directory as JSON.

Besides the sizes, VisionConfig and TextConfig carry how their stack of identical blocks runs
(models/layout.py): `scan_layers` (the parameter layout: one scanned subtree with a leading
layer axis, or one subtree per block) and `remat` (a rematerialisation policy name). A BLIP
uses one layout for the ViT and the text encoder (`BlipConfig.with_layers` sets both); dicts
saved without these fields read as the unscanned layout without remat. `attention_impl`
('explicit' | 'xla' | 'cudnn', models/layers.py) chooses the kernel of the attention that needs
no probabilities; like remat it changes no parameter, and a run sets it from its own config
(`BlipConfig.with_attention`), whatever a saved dict says.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from contextblip_jax.models.layers import check_attention_impl
from contextblip_jax.models.layout import check_remat


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
  scan_layers: bool = False  # blocks under one nn.scan, params stacked [depth, ...]
  remat: str = "none"        # per-block remat policy (models/layout.py REMAT_POLICIES)
  attention_impl: str = "explicit"  # 'explicit' | 'xla' | 'cudnn' (layers.ATTENTION_IMPLS)

  def __post_init__(self):
    check_remat(self.remat)
    check_attention_impl(self.attention_impl)

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
  scan_layers: bool = False  # layers under one nn.scan, params stacked [num_layers, ...]
  remat: str = "none"        # per-layer remat policy (models/layout.py REMAT_POLICIES)
  attention_impl: str = "explicit"  # 'explicit' | 'xla' | 'cudnn' (layers.ATTENTION_IMPLS)

  def __post_init__(self):
    check_remat(self.remat)
    check_attention_impl(self.attention_impl)


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """BLIP_Base: ViT + text encoder + ITM head + ITC projections."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  embed_dim: int = 256       # ITC projection width

  def __post_init__(self):
    if self.vision.scan_layers != self.text.scan_layers:
      raise ValueError("the ViT and the text encoder must use the same layout (scan_layers)")

  @property
  def scan_layers(self) -> bool:
    """Whether the blocks are scanned (parameters stacked): the layout of the tree."""
    return self.vision.scan_layers

  def with_layers(self, scan_layers: bool | None = None, remat: str | None = None
                  ) -> "BlipConfig":
    """This config with the ViT's and text encoder's `scan_layers` / `remat` set (None keeps)."""
    kw = {k: v for k, v in (("scan_layers", scan_layers), ("remat", remat)) if v is not None}
    return self.replace(vision=dataclasses.replace(self.vision, **kw),
                        text=dataclasses.replace(self.text, **kw))

  def with_attention(self, impl: str) -> "BlipConfig":
    """This config with the ViT's and text encoder's `attention_impl` set (ATTENTION_IMPLS)."""
    return self.replace(vision=dataclasses.replace(self.vision, attention_impl=impl),
                        text=dataclasses.replace(self.text, attention_impl=impl))

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
