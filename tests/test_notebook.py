"""examples/quickstart.ipynb runs top to bottom on CPU (nbclient, a fresh ipykernel) and its
outputs say what it claims: ITM probabilities, the stage-1 run, API scores equal to the
evaluation loop's, the figures. The committed notebook carries no outputs."""

import json
import os
import re
import time

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, "examples", "quickstart.ipynb")


def _read():
  with open(NOTEBOOK, encoding="utf-8") as f:
    return nbformat.read(f, as_version=4)


def test_notebook_is_committed_clean():
  nb = _read()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  # a markdown cell before every step
  kinds = [c.cell_type for c in nb.cells]
  assert kinds[0] == "markdown" and all(
      kinds[i - 1] == "markdown" for i, k in enumerate(kinds) if k == "code")


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_runs_top_to_bottom(tmp_path):
  nb = _read()
  env_before = os.environ.get("XLA_FLAGS")
  # A plain CPU process, as a user's: not the test session's 8 forced devices.
  os.environ["XLA_FLAGS"] = ""
  try:
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - t0
  finally:
    if env_before is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = env_before
  print(f"examples/quickstart.ipynb executed in {seconds:.1f} s")
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  out = "\n".join(_text(c) for c in code)

  # step 3: ten ITM probabilities, each in (0, 1)
  probs = json.loads(re.search(r"^itm_prob (\[.*\])$", out, re.M).group(1))
  assert len(probs) == 10 and all(0.0 < p < 1.0 for p in probs), probs
  assert len(set(probs)) > 1, probs          # the images are told apart
  # step 4: the stage ran and exported
  assert "[finetune1] 4/4" in out and "stage1_valid all" in out and "'export'" in out
  # step 5: the API's stage-1 scores are the evaluation loop's
  diff = float(re.search(r"score difference: (\S+)$", out, re.M).group(1))
  assert diff < 1e-4, diff
  assert re.search(r"^accuracy \d+/12 ", out, re.M)
  # step 6: the bar chart and the mask figure are displayed
  images = [o for o in code[-1].outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2, [o.output_type for o in code[-1].outputs]
