"""notebooks/quickstart.ipynb executes top to bottom (tiny config)."""

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  assert "test accuracy" in text and "residual" in text
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
