"""The experiment layer: stages over a workdir, run by config.

  registry.py        the stages in order, with their config sections and
                     upstream stages; `run(config, workdir, stage)`
  workdir.py         stage records, the one config hash, resume checks, the
                     metrics writer, the workdir lock
  common.py          config checks, data, the classifier, synthesis settings
                     and candidates, the judges, the DSV-set writer
  synthesis_loop.py  the sharded, resumable synthesis loop
  stages/<name>.py   one module per stage: `run(config, workdir)`
  report/            the report stage: sub-runs and caches (`cache`),
                     sections and figures (`sections`), the KKT baseline
                     run, the README's reproduction table

The library (`dsv_jax.kkt`, `select`, `synthesize`, ...) never imports this
package. Nothing is imported here, so importing one module stays light.
"""
