"""`python -m contextblip_jax.results PATH ...`: a run's evaluation outputs as the paper's
tables (see `evaluation/paper_table.py`)."""

import sys

from contextblip_jax.evaluation.paper_table import main

if __name__ == "__main__":
  sys.exit(main())
