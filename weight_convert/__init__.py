"""Weight conversion between PyTorch BLIP / ContextBLIP checkpoints and our Flax parameters.

Import (`convert`): an original Salesforce BLIP `.pth` (model_base.pth, model_base_14M.pth,
model_base_retrieval_coco.pth; ContextBLIP checkpoints with `pretrained_blip.` keys and the
multi-scale adapter; the authors' pre-training, stage-1 and stage-2 checkpoints with their TMIM
modules, prediction layer and context encoder) or a Hugging Face `BlipForImageTextRetrieval`
directory -> a converted
parameter directory (`contextblip_jax.storage.param_dir`: params/, model.json, vocab.txt,
provenance.json -- the format training stages export too).
Export (`export_hf`, `export_checkpoint`): the BLIP part of our parameters (a converted
directory or any stage's export) -> a HF directory (config.json + model.safetensors) that
`BlipForImageTextRetrieval.from_pretrained` loads; (`export_authors`) every group -> one
checkpoint file in the authors' layout of its stage, which `convert` reads back.

Both directions use the one table in `weight_convert/mapping.py`. Loading is safe
(safetensors, or `torch.load(weights_only=True)`); torch is imported only to read torch files.
Command line: `python -m weight_convert --help`.

Public API:
  convert(src, out, fmt="auto", image_size=None, **options) -> str        (converter.py)
  load_source(path, fmt="auto") -> SourceState                            (loaders.py)
  to_flax(source, image_size=None, **options) -> Converted                (converter.py)
  export_hf(params, config, out) -> str; export_checkpoint(ckpt_dir, out)  (export_hf.py)
  to_state_dict(params, config, fmt="hf") -> dict[str, np.ndarray]         (export_hf.py)
  export_authors(ckpt_dir, out_file); to_authors_state_dict(params, model)  (export_hf.py)
  resample_pos_embed(pos_embed, new_grid) -> np.ndarray                   (resample.py)
"""

from weight_convert.converter import (Converted, MappingReport, abstract_params, convert,
                                      map_source, source_config, to_flax)
from weight_convert.export_hf import (export_authors, export_checkpoint, export_hf,
                                      to_authors_state_dict, to_state_dict)
from weight_convert.loaders import (ConversionError, SourceState, UnsafeCheckpointError,
                                    detect_format, load_source)
from weight_convert.resample import resample_pos_embed

__all__ = [
    "ConversionError", "Converted", "MappingReport", "SourceState", "UnsafeCheckpointError",
    "abstract_params", "convert", "detect_format", "export_authors", "export_checkpoint",
    "export_hf", "to_authors_state_dict",
    "load_source", "map_source", "resample_pos_embed", "source_config", "to_flax",
    "to_state_dict",
]
