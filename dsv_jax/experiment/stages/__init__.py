"""One module per stage, each with the same face:

  NAME, SECTIONS (config sections read), UPSTREAM (stages whose outputs it
  reads), CKPT_DIRS (its folders under ckpt/), stage_hash(config, workdir)
  (what its record is keyed by) and run(config, workdir) -> results.

The order and the `all` loop are in `dsv_jax.experiment.registry`.
"""
