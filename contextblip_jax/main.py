"""`python -m contextblip_jax.main`: the command line of every stage (see `run/cli.py`)."""

from absl import app

from contextblip_jax.run.cli import main

if __name__ == "__main__":
  app.run(main)
