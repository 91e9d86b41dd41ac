"""Flax modules: BLIP backbone (vit, bert, blip) and the ContextBLIP additions."""
