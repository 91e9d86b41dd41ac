"""Command line for weight conversion (see `python -m weight_convert --help`).

  python -m weight_convert --src model_base.pth --out ckpt/blip_base
  python -m weight_convert --src hf/blip-itm-base-coco --out ckpt/itm384 --format hf
  python -m weight_convert --src Salesforce/blip-itm-base-coco --out ckpt/itm384  # hub id
  python -m weight_convert --src model_base_retrieval_coco.pth --out ckpt/r224 --image-size 224
  python -m weight_convert export --checkpoint ckpt/blip_base --out hf/blip_base
  python -m weight_convert export --checkpoint runs/finetune2 --out hf/finetune2_blip
  python -m weight_convert --src 0.25_4_2d_3106.pth --out ckpt/pretrain       # authors' stages:
  python -m weight_convert --src 4_0.25_0.3719_17.pt --out ckpt/stage1        # detected from
  python -m weight_convert --src CONTEXTUAL_blip_best_....pt --out ckpt/stage2  # the keys
  python -m weight_convert export --checkpoint ckpt/stage2 --out stage2.pth --format authors

`convert` writes a parameter directory (contextblip_jax.storage.param_dir: params/, model.json,
vocab.txt, provenance.json), the same format a training stage exports. `export` reads any
parameter directory or stage workdir and writes its BLIP part; groups that Hugging Face cannot
hold (the vision adapter, TMIM, fine-tuning heads) are named in the output and left out.
`export --format authors` writes every group as one checkpoint file in the layout of the
authors' code instead (pre-training / stage 1 / stage 2, chosen by the groups present).

One progress line per stage (load, map, check, write). On bad input (a missing or unsafe
file, a checkpoint that does not fit, NaN / integer tensors, an output directory `--overwrite`
may not replace) one line `error: ...` on stderr and exit status 2, and no output directory is
left behind; the traceback only with --verbose (or CONTEXTBLIP_VERBOSE=1). `--overwrite`
replaces only a directory this command wrote (a parameter directory for convert, an export
with its `contextblip_jax_export.json` marker for export) that neither is nor holds the source.
"""

from __future__ import annotations

import argparse
import sys

from contextblip_jax.storage import cli_errors
from contextblip_jax.storage.checkpoints import silence_shutdown_noise
from weight_convert.converter import convert
from weight_convert.export_hf import export_authors, export_checkpoint
from weight_convert.hub import resolve_source
from weight_convert.loaders import ConversionError

_USAGE = """
  python -m weight_convert [convert] --src PATH --out DIR [--format auto|original|hf]
                                     [--image-size N] [--vision-heads N] [--text-heads N]
                                     [--hf-config blip|config] [--adapter-taps 3,6,9,12]
                                     [--no-tmim] [--decoder-heads N] [--context-heads N]
                                     [--overwrite]
  python -m weight_convert export --checkpoint DIR --out HF_DIR|FILE [--format hf|authors]
                                  [--overwrite]"""

_EPILOG = """\
modes:
  convert (default)  PyTorch -> Flax: --src PATH --out DIR (a parameter directory:
                     params/, model.json, vocab.txt, provenance.json)
  export             Flax -> Hugging Face: --checkpoint DIR --out HF_DIR
                     (a converted directory, a stage workdir or its export/ -> config.json +
                     model.safetensors that transformers BlipForImageTextRetrieval loads;
                     the BLIP part only: a vision adapter, TMIM groups and fine-tuning heads
                     are named in the output and left out); --format authors: one .pth
                     (or .safetensors) file in the authors' ContextBLIP layout, every group)
The authors' checkpoints: a pre-training checkpoint ({"model": ...}: pretrained_blip.*,
vision_adapter.*, TMIM modules), a stage-1 one ({"model_state_dict": ...}: blip.*,
prediction_layer.*) and a stage-2 one ({"model_state_dict": ...}: blip.blip.*,
blip.prediction_layer.*, transformer.*, positional_emb.weight) convert with the same command;
the stage is detected from the keys and every module it holds is converted.
Run `python -m weight_convert convert --help` or `... export --help` for each mode's options.
"""


def _taps(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m weight_convert", epilog=_EPILOG, usage=_USAGE,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert BLIP / ContextBLIP / Hugging Face BLIP weights to contextblip_jax "
                  "parameters, or export them back to Hugging Face.")
  sub = parser.add_subparsers(dest="mode", metavar="{convert,export}")
  conv = sub.add_parser("convert", help="PyTorch checkpoint -> parameter directory")
  conv.add_argument("--src", required=True,
                    help="original .pth/.safetensors file, HF BlipForImageTextRetrieval dir, or a "
                         "hub id (Salesforce/blip-itm-base-coco; read from the HF cache, "
                         "HF_HUB_OFFLINE honoured; weight_convert/hub.py)")
  conv.add_argument("--out", required=True, help="output directory (must not exist)")
  conv.add_argument("--format", default="auto", choices=("auto", "original", "hf"),
                    help="source format (auto: a directory is 'hf', a file is 'original')")
  conv.add_argument("--image-size", type=int, default=None,
                    help="target resolution; position embeddings are resampled bicubically "
                         "(CLS kept, as BLIP's interpolate_pos_embed) if it differs")
  conv.add_argument("--vision-heads", type=int, default=None,
                    help="original format: ViT heads (default width // 64)")
  conv.add_argument("--text-heads", type=int, default=None,
                    help="original format: text-encoder heads (default width // 64)")
  conv.add_argument("--hf-config", default="blip", choices=("blip", "config"),
                    help="HF format: 'blip' uses vision LayerNorm eps 1e-6 and text dropout "
                         "0.1 as BLIP (hub configs say 1e-5 / 0.0); 'config' takes "
                         "config.json literally")
  conv.add_argument("--adapter-taps", type=_taps, default=None,
                    help="ContextBLIP adapter: 1-based tapped ViT blocks, e.g. 3,6,9,12 "
                         "(default evenly spaced)")
  conv.add_argument("--scan-layers", action="store_true",
                    help="write the scanned layout (blocks stacked [L, ...]; recorded in "
                         "model.json); runs convert either layout to their config's on load")
  conv.add_argument("--no-tmim", dest="tmim", action="store_false",
                    help="leave a pre-training checkpoint's TMIM modules out (default: convert)")
  conv.add_argument("--decoder-heads", type=int, default=None,
                    help="TMIM decoder heads (default 8, as the reference)")
  conv.add_argument("--context-heads", type=int, default=None,
                    help="stage-2 context encoder heads (default 8, as the reference)")
  conv.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out parameter directory (never the source or "
                         "a directory holding it)")
  conv.add_argument("--verbose", action="store_true", help="print the traceback on an error")
  exp = sub.add_parser("export", help="parameter directory -> Hugging Face directory (BLIP "
                                      "part)")
  exp.add_argument("--checkpoint", required=True,
                   help="parameter directory (written by `convert` or a training stage's "
                        "export/) or a stage workdir")
  exp.add_argument("--out", required=True,
                   help="HF output directory, or the authors' checkpoint file (must not exist)")
  exp.add_argument("--format", default="hf", choices=("hf", "authors"),
                   help="hf: BlipForImageTextRetrieval directory (BLIP part); authors: one "
                        "file in the authors' ContextBLIP layout with every group (.pth via "
                        "torch.save, or .safetensors)")
  exp.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --out (never the checkpoint read)")
  exp.add_argument("--verbose", action="store_true", help="print the traceback on an error")
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] not in ("convert", "export", "-h", "--help"):
    argv.insert(0, "convert")
  args = build_parser().parse_args(argv)
  if args.mode is None:
    build_parser().print_help()
    return 2
  log = lambda s: print(s, flush=True)  # noqa: E731
  silence_shutdown_noise()
  try:
    if args.mode == "export" and args.format == "authors":
      export_authors(args.checkpoint, args.out, overwrite=args.overwrite, log=log)
    elif args.mode == "export":
      export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, log=log)
    else:
      convert(resolve_source(args.src, log), args.out, args.format, args.image_size,
              vision_heads=args.vision_heads, text_heads=args.text_heads,
              hf_config=args.hf_config, adapter_taps=args.adapter_taps,
              scan_layers=args.scan_layers, tmim=args.tmim, decoder_heads=args.decoder_heads,
              context_heads=args.context_heads, overwrite=args.overwrite, log=log)
  except (ConversionError, OSError, ValueError, KeyError) as e:
    return cli_errors.report(e, verbose=args.verbose)
  return 0


if __name__ == "__main__":
  sys.exit(main())
