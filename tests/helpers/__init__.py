"""Helpers shared by the tests: random tiny checkpoints, loop configs, the PyTorch reference."""
