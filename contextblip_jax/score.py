"""`python -m contextblip_jax.score`: score one description against images (see
`evaluation/scorer.py`)."""

import sys

from contextblip_jax.evaluation.scorer import main

if __name__ == "__main__":
  sys.exit(main())
