"""ContextBLIP in JAX/Flax: image retrieval from contextual descriptions on top of BLIP."""

__version__ = "0.1.0"
