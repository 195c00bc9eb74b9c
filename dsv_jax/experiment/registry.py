"""The stages of a DSV experiment and the loop that runs them.

`run(config, workdir, stage)` runs one stage or, for `all`, every stage in
`STAGES` order: each reads only what earlier ones wrote. Under `all` a
stage finished under the same hash (`workdir.config_hash`: its config
sections, its inputs' records, the classifier's content, the package
version) is skipped, one finished under another is redone from scratch. A
single named stage always runs, resuming its own checkpoint if it was
interrupted under the same hash. One process owns a workdir at a time.
"""

import contextlib
import logging as std_logging
import os
from collections.abc import Iterator
from types import MappingProxyType, ModuleType

import ml_collections
from absl import logging
from etils import epath

from dsv_jax import checkpoints, distributed
from dsv_jax.experiment import common, sources
from dsv_jax.experiment import workdir as wd
from dsv_jax.experiment.stages import (
  edit,
  interpolate,
  report,
  retrain,
  select,
  synthesize,
  train,
)

# The order of `all`.
_MODULES = (train, select, synthesize, edit, interpolate, retrain, report)
STAGES = tuple(m.NAME for m in _MODULES)
STAGE_MODULES = MappingProxyType({m.NAME: m for m in _MODULES})


def _check_order() -> None:
  # Every stage's inputs come before it: `all` never reads a missing input.
  for i, m in enumerate(_MODULES):
    missing = set(m.UPSTREAM) - set(STAGES[:i])
    if missing:
      raise AssertionError(f"stage {m.NAME} runs before {sorted(missing)}")


_check_order()


def stage_hash(config: ml_collections.ConfigDict, workdir: str, stage: str):
  """The hash `stage` records in `workdir` under `config`."""
  return STAGE_MODULES[stage].stage_hash(config, checkpoints.abspath(workdir))


def _is_current(module: ModuleType, record: dict, config, digest: str) -> bool:
  if record["config_hash"] != digest:
    return False
  is_current = getattr(module, "is_current", None)
  return is_current is None or is_current(record, config)


def _record_or_none(workdir: str, name: str, redo_damaged: bool):
  """The stage's record; a damaged one, under `all`, as none (redone)."""
  try:
    return wd.stage_record(workdir, name)
  except ValueError as e:
    if not redo_damaged:
      raise
    logging.warning("%s Redoing the stage.", e)
    return None


def damaged_outputs(
  module: ModuleType, record: dict, config, workdir: str
) -> str | None:
  """What is wrong with the outputs of `module`'s finished stage, or None.

  Nothing to check for a stage that skipped (no data here) or a `train`
  stage that trained nothing (a classifier from elsewhere).
  """
  if "skipped" in record["results"] or (
    module.NAME == "train" and sources.is_external(config)
  ):
    return None
  # Process 0 looks; every process then takes the same branch.
  return distributed.primary_value(
    f"outputs of {module.NAME}",
    lambda: wd.output_problem(workdir, module.OUTPUTS),
  )


class LibraryChatterFilter(std_logging.Filter):
  """Keeps Orbax's per-save INFO lines and JAX's backend probing ("Unable
  to initialize backend 'tpu'" on every CPU machine) out of the progress
  output; warnings always pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return f"{os.sep}orbax{os.sep}" not in record.pathname and not (
      record.pathname.endswith("xla_bridge.py")
    )


@contextlib.contextmanager
def _progress(show: bool | None) -> Iterator[None]:
  # absl logs INFO only once its flags are parsed (the CLI); from a script
  # or a notebook every progress line would be dropped. Raise the verbosity
  # for the run, without the libraries' chatter, and restore it after.
  before = logging.get_verbosity()
  chatter = LibraryChatterFilter()
  absl_logger = std_logging.getLogger("absl")
  if show or (show is None and before < logging.INFO):
    logging.set_verbosity(logging.INFO)
    absl_logger.addFilter(chatter)
  try:
    yield
  finally:
    logging.set_verbosity(before)
    absl_logger.removeFilter(chatter)


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  stage: str | None = None,
  *,
  progress: bool | None = None,
) -> dict[str, dict]:
  """Runs `stage` (default `config.stage`; `all` = every stage in order).

  Progress (stage starts, training, selection, synthesis and retraining
  steps) is logged to stderr, which scripts and notebooks show; `progress`
  None keeps a verbosity set at INFO or above, False leaves it as it is.

  Returns:
    `{stage: results}` for the stages run or skipped.

  Raises:
    ValueError: an unknown stage or a bad config value (naming the key).
    workdir.WorkdirLocked: another process is running in `workdir`.
  """
  common.validate_config(config)
  if config.stage not in (*STAGES, "all"):
    raise ValueError(
      f"Config key stage: {config.stage!r} is not one of {(*STAGES, 'all')}."
    )
  if stage is not None and stage not in (*STAGES, "all"):
    raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}.")
  stage = stage or config.stage
  workdir = checkpoints.abspath(workdir)
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a folder.")
  todo = STAGES if stage == "all" else (stage,)
  out = {}
  with wd.lock(workdir), _progress(progress):
    for name in todo:
      module = STAGE_MODULES[name]
      record = _record_or_none(workdir, name, stage == "all")
      digest = module.stage_hash(config, workdir)
      if record is not None and stage == "all":
        current = _is_current(module, record, config, digest)
        damage = current and damaged_outputs(module, record, config, workdir)
        if current and not damage:
          logging.info("Stage %s already finished; skipping.", name)
          out[name] = record["results"]
          continue
        if damage:
          # Its checkpoints stand: the stage resumes from its last one.
          logging.warning(
            "Stage %s finished, but %s: redoing it.", name, damage
          )
        elif record["config_hash"] != digest:
          logging.info("Config of stage %s changed: redoing it.", name)
          wd.clear_checkpoints(workdir, module.CKPT_DIRS)
        else:
          logging.info("Stage %s: extending the finished run.", name)
      elif record is not None and record["config_hash"] != digest:
        wd.clear_checkpoints(workdir, module.CKPT_DIRS)
      logging.info("Stage %s: starting in %s.", name, workdir)
      out[name] = module.run(config, workdir)
  return out


__all__ = [
  "STAGES",
  "STAGE_MODULES",
  "LibraryChatterFilter",
  "run",
  "stage_hash",
]
