"""Input data: IMAGECODE and pre-training-pair readers, TFDS builders, augmentations, Grain
pipelines, and the embedded synthetic stand-in dataset.

Modules (import the one you need; nothing heavy is imported here):

  imagecode       IMAGECODE reader: flat examples + per-set grouping, phenomenon tags, checks.
  pairs           BLIP/COCO/VG `[{"image", "caption"}]` pre-training pairs reader.
  augment         RandomResizedCrop / flip / RandAugment (BLIP semantics), train transforms.
  pipeline        Grain pipelines: pre-training pairs, IMAGECODE training, IMAGECODE evaluation.
  tfds_imagecode  TFDS (array_record, no TensorFlow) builder for IMAGECODE.
  tfds_pairs      TFDS (array_record, no TensorFlow) builder for pre-training pairs.
  tfds_storage    Building those datasets into, and reading them from, local disk or gs://.
  synthetic       Seeded synthetic dataset in the exact IMAGECODE layout + pairs (CLI: -m).
  benchmark       Prints generation time and pipeline throughput (python -m ...benchmark).
  prepare         Raw downloads -> the layout the configs read, + TFDS datasets (CLI: -m).
"""
