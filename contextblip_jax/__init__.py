"""ContextBLIP in JAX/Flax: image retrieval from contextual descriptions on top of BLIP.

The Python API (`contextblip_jax/evaluation/api.py`, imported on first use, so that
`import contextblip_jax` stays light):

  model = contextblip_jax.load("ckpt/blip_base")      # any parameter directory or stage workdir
  model.score("a dog on a beach", ["a.jpg", "b.jpg"])  # ITM probability, ITC similarity
  model.rank(texts, image_sets)                        # scores [D, K] per set, batched
  model.encode_images(images)                          # image tokens and ITC features
"""

__version__ = "0.1.0"

_API_NAMES = ("Model", "Scores", "Ranking", "ImageFeatures")


def load(path, **options):
  """Loads a parameter directory (converted BLIP, a stage's export/) or a stage workdir for
  scoring; returns a `Model` with `score`, `rank` and `encode_images`. Options and examples:
  `contextblip_jax.evaluation.api.load`."""
  from contextblip_jax.evaluation import api  # pylint: disable=g-import-not-at-top
  return api.load(path, **options)


def __getattr__(name):
  if name in _API_NAMES:
    from contextblip_jax.evaluation import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'contextblip_jax' has no attribute {name!r}")
