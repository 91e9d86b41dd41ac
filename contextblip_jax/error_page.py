"""`python -m contextblip_jax.error_page`: an error-analysis HTML page for one evaluation's
predictions (see `evaluation/error_page.py`)."""

import sys

from contextblip_jax.evaluation.error_page import main

if __name__ == "__main__":
  sys.exit(main())
