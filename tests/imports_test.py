"""Importing the library stays light and leaves global state alone.

Each test runs a fresh interpreter (``sys.executable -c``) on this
checkout, so modules imported by other tests of the session cannot hide
an import.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What the DeepKKT core must not pull in: checkpointing, plotting, dataset
# builders, scikit-learn and absl's command-line machinery.
HEAVY = (
  "matplotlib",
  "orbax",
  "orbax.checkpoint",
  "absl.app",
  "absl.flags",
  "tensorflow_datasets",
  "tensorflow",
  "sklearn",
)


def run_python(code: str, **env: str | None) -> dict:
  """Runs ``code`` in a fresh interpreter on this checkout; its last line
  of output, parsed as JSON."""
  environ = dict(os.environ)
  environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [environ.get("PYTHONPATH")])]
  )
  for key, value in env.items():
    if value is None:
      environ.pop(key, None)
    else:
      environ[key] = value
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=environ,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["dsv_jax", "dsv_jax.kkt", "dsv_jax.select"])
def test_core_import_loads_no_heavy_dependency(module):
  out = run_python(
    "import importlib, json, sys\n"
    f"mod = importlib.import_module({module!r})\n"
    "print(json.dumps({\n"
    "  'file': mod.__file__,\n"
    f"  'loaded': [m for m in {HEAVY!r} if m in sys.modules],\n"
    "}))\n"
  )
  assert pathlib.Path(out["file"]).is_relative_to(ROOT)
  assert out["loaded"] == []


@pytest.mark.parametrize(
  "module", ["dsv_jax.synthesize", "dsv_jax.train", "dsv_jax.retrain"]
)
def test_training_modules_load_no_checkpointing_or_plotting(module):
  # These log through absl.logging (which imports absl.flags) via optax and
  # train; checkpointing, plotting and dataset builders stay out.
  heavy = [m for m in HEAVY if not m.startswith("absl")]
  out = run_python(
    "import importlib, json, sys\n"
    f"importlib.import_module({module!r})\n"
    f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n"
  )
  assert out == []


def test_package_names_load_lazily():
  out = run_python(
    "import json, sys\n"
    "import dsv_jax\n"
    "before = 'dsv_jax.kkt' in sys.modules\n"
    "same = dsv_jax.deepkkt_loss is dsv_jax.kkt.deepkkt_loss\n"
    "print(json.dumps({\n"
    "  'before': before,\n"
    "  'same': same,\n"
    "  'factory': dsv_jax.make_deepkkt_loss.__module__,\n"
    "  'dsv_set': dsv_jax.DSVSet.__module__,\n"
    "  'all_resolve': all(hasattr(dsv_jax, n) for n in dsv_jax.__all__),\n"
    "  'listed': sorted(set(dsv_jax.__all__) - set(dir(dsv_jax))),\n"
    "}))\n"
  )
  assert out == {
    "before": False,
    "same": True,
    "factory": "dsv_jax.kkt",
    "dsv_set": "dsv_jax.artifacts",
    "all_resolve": True,
    "listed": [],
  }


VIZ_SCRIPT = """
import json, sys, types
import numpy as np
import matplotlib

before = matplotlib.get_backend()
from dsv_jax import viz

after_import = matplotlib.get_backend()
info = types.SimpleNamespace(
  num_classes=2, class_names=["a", "b"], denormalize=lambda x: x
)
images = np.random.default_rng(0).random((4, 5, 5, 1))
viz.class_grid(PATH, images, np.array([0, 1, 0, 1]), info, title="t")
viz.strip(PATH + ".strip.png", images, info, titles=list("wxyz"))
rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
viz.plot_curves(PATH + ".curves.png", rows)
print(json.dumps({
  "backends": [before, after_import, matplotlib.get_backend()],
  "pyplot": "matplotlib.pyplot" in sys.modules,
}))
"""


def test_viz_keeps_the_matplotlib_backend(tmp_path):
  # A notebook's inline backend must survive importing and using viz; "svg"
  # stands in for it (a non-Agg backend that works headless).
  path = tmp_path / "grid.png"
  out = run_python(f"PATH = {str(path)!r}\n" + VIZ_SCRIPT, MPLBACKEND="svg")
  assert out["backends"] == ["svg", "svg", "svg"]
  assert not out["pyplot"]
  for name in ("grid.png", "grid.png.strip.png", "grid.png.curves.png"):
    assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
