"""The `report` stage: every table and figure of the paper, in one file.

The work lives in `dsv_jax.experiment.report` (sub-runs, sections, the
reproduction table); this module gives the registry the stage's spec.
"""

from dsv_jax.experiment import report, stages

NAME = "report"
SECTIONS = report.SECTIONS
UPSTREAM = report.INPUTS
CKPT_DIRS = ()
# What a finished stage leaves (`workdir.output_problem`).
OUTPUTS = ("report/results.json", "report/report.md")
stage_hash = report.stage_hash
run = report.run_report

__all__ = list(stages.FACE)
