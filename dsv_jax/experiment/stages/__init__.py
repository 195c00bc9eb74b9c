"""One module per stage, each with the same face (`FACE`):

  NAME, SECTIONS (config sections read), UPSTREAM (stages whose outputs it
  reads), CKPT_DIRS (its folders under ckpt/), OUTPUTS (what a finished
  stage leaves), stage_hash(config, workdir) (what its record is keyed by)
  and run(config, workdir) -> results.

The order and the `all` loop are in `dsv_jax.experiment.registry`.
"""

# What every stage module exports (its `__all__`, with any names of its own).
FACE = (
  "CKPT_DIRS",
  "NAME",
  "OUTPUTS",
  "SECTIONS",
  "UPSTREAM",
  "run",
  "stage_hash",
)
