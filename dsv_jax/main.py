"""Command line: `python -m dsv_jax.main --config CONFIG --workdir DIR`.

Also installed as the console script `dsv`. Flags:
  --config   a config file with `get_config(arg)`, e.g.
             `configs/digits.py` or `configs/digits.py:tiny`; override
             fields with `--config.train.steps=100` (an unknown key or a
             wrong type fails at once, naming the key).
  --workdir  where checkpoints and outputs go; re-running the same command
             resumes an interrupted run.
  --stage    which stage to run (default: the config's `stage`, "all").
"""

import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dsv_jax.experiment import registry

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/digits.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output/resume directory.")
_STAGE = flags.DEFINE_enum(
  "stage",
  None,
  [*registry.STAGES, "all"],
  "Stage to run; default: config.stage.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info(
    "JAX %s, process %d/%d, devices: %s",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
  )
  results = registry.run(_CONFIG.value, _WORKDIR.value, _STAGE.value)
  for stage, res in results.items():
    summary = ", ".join(
      f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
      for k, v in res.items()
    )
    print(f"[{stage}] {summary}", flush=True)


class _DropLibraryChatter(std_logging.Filter):
  """Keeps Orbax's per-save INFO lines out of the progress output."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or (
      f"{os.sep}orbax{os.sep}" not in record.pathname
    )


def run_main():
  """Entry point of the `dsv` console script."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  app.run(main)


if __name__ == "__main__":
  run_main()
