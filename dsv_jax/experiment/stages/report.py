"""The `report` stage: every table and figure of the paper, in one file.

The work lives in `dsv_jax.experiment.report` (sub-runs, sections, the
reproduction table); this module gives the registry the stage's spec.
"""

from dsv_jax.experiment.report import (
  INPUTS,
  SECTIONS,
  run_report,
  stage_hash,
)

NAME = "report"
UPSTREAM = INPUTS
CKPT_DIRS = ()
# What a finished stage leaves (`workdir.output_problem`).
OUTPUTS = ("report/results.json", "report/report.md")
run = run_report

__all__ = [
  "CKPT_DIRS",
  "NAME",
  "OUTPUTS",
  "SECTIONS",
  "UPSTREAM",
  "run",
  "stage_hash",
]
