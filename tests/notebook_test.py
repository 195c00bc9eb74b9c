"""notebooks/quickstart.ipynb executes top to bottom (tiny config) and
prints the tiny pipeline's numbers."""

import json
import os
import re

import nbformat
import numpy as np
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny pipeline's results, which report_test checks the CLI against.
REFERENCE = os.path.join(REPO, "tests", "data", "tiny_reference.json")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  # The kernel inherits the environment: the tiny config, and conftest's
  # fake devices and compile settings.
  monkeypatch.setenv("DSV_NOTEBOOK_TINY", "1")
  path = os.path.join(REPO, "notebooks", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  ).execute()
  outputs = [
    o.get("text", "")
    for cell in nb.cells
    if cell.cell_type == "code"
    for o in cell.get("outputs", [])
  ]
  text = "".join(outputs)
  # Its numbers are the stages' on the same tiny config (printed rounded:
  # the tolerances are those of report_test's reference comparison).
  with open(REFERENCE) as f:
    ref = json.load(f)
  retrain = ref["retrain"]
  for pattern, want in [
    (r"'test_accuracy': ([\d.]+)", ref["train"]["test_accuracy"]),
    (
      r"\|\| / \|\|theta\*\|\| = ([\d.]+)",
      ref["select"]["residual_uniform_all"],
    ),
    (r"residual ([\d.]+) of", ref["select"]["residual"]),
    (
      r"'source_accuracy_survivors': ([\d.]+)",
      ref["synthesize"]["source_accuracy_survivors"],
    ),
    (
      r"classical agreement: ([\d.]+)",
      ref["synthesize"]["classical_agreement"],
    ),
    (
      r"DSVs +\(20 images\): test accuracy ([\d.]+) \+- [\d.]+%",
      retrain["dsv_mean"],
    ),
    (
      r"DSVs +\(20 images\): test accuracy [\d.]+ \+- ([\d.]+)%",
      retrain["dsv_std"],
    ),
  ]:
    found = re.search(pattern, text)
    assert found, pattern
    got = float(found.group(1)) / (100 if pattern.endswith("%") else 1)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=5e-3, err_msg=pattern)
  # The Python API's progress reaches the notebook (stderr stream).
  assert "Stage train: starting" in text and "train step" in text
  images = [
    o
    for cell in nb.cells
    for o in cell.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert len(images) == 2  # The selected and the synthesized grids.
  # The run's temporary folder does not outlive the notebook.
  removed = [ln for ln in text.splitlines() if ln.startswith("removed ")]
  assert removed and not os.path.exists(removed[0].split()[1])
