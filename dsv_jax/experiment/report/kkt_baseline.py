"""The KKT-reconstruction baseline run (Haim et al. 2022, Buzaglo et al.
2023) for the report's few-shot table: `dsv_jax.baseline`'s reconstructor
from the synthesize stage's candidates, sharded and resumable.
"""

import os
import time

import ml_collections
import numpy as np
import optax
from absl import logging

from dsv_jax import (
  baseline,
  checkpoints,
  distributed,
  parallel,
  synthesize,
  viz,
)
from dsv_jax.experiment import common, synthesis_loop
from dsv_jax.experiment import workdir as wd

SECTIONS = ("seed", "data", "model", "train", "synth", "baseline")


def stage_hash(config: ml_collections.ConfigDict) -> str:
  """The run's hash (`workdir.config_hash`): its sections, the
  classifier it reconstructs from (`synth.classifier`) and the units of
  `baseline`'s lambda (a checkpoint in raw units must not resume)."""
  return wd.config_hash(
    config,
    SECTIONS,
    {
      "classifier": wd.classifier_digest(config.synth.classifier),
      "lambda_units": "share_of_total",
    },
  )


def run_baseline(
  config: ml_collections.ConfigDict, workdir: str, out_dir: str
) -> dict:
  """Runs the reconstruction baseline and writes its DSV set to `out_dir`.

  Starts from the very candidates the synthesize stage starts from
  (`common.initial_candidates`, same key; soft targets reduced to
  their argmax), with `config.baseline`'s optimisation settings, resuming
  from ``workdir/ckpt/baseline`` if interrupted.

  Returns:
    A dict with the fraction of candidates the source model classifies as
    their target, their mean entropy and margin, the final stationarity
    residual, timing and steps.
  """
  common.validate_config(config)
  workdir, out_dir = checkpoints.abspath(workdir), checkpoints.abspath(out_dir)
  bl = config.baseline
  for key in ("steps", "log_every"):
    if bl[key] < 1:
      raise ValueError(f"Config key baseline.{key}: must be >= 1.")
  for key in ("lr_x", "lr_lambda"):
    if bl[key] <= 0:
      raise ValueError(f"Config key baseline.{key}: must be > 0.")
  digest = stage_hash(config)
  clf = common.classifier_for(config, workdir)
  info = clf.info
  key = common.synthesis_key(config)
  x0, targets, source, index = common.initial_candidates(config, clf, key)
  labels = np.asarray(synthesize.target_labels(targets), np.int32)
  recon = baseline.make_reconstructor(
    clf.apply_fn,
    x_tx=optax.adam(bl.lr_x),
    lambda_tx=optax.adam(bl.lr_lambda),
    lambda_min=bl.lambda_min,
    beta_lambda=bl.beta_lambda,
    lambda_init=(bl.lambda_low, bl.lambda_high),
    pixel_min=info.pixel_min,
    pixel_max=info.pixel_max,
  )
  ckpt_dir = os.path.join(workdir, "ckpt", "baseline")
  with wd.resumable(ckpt_dir, digest, "baseline") as ckptr:
    mesh = parallel.make_mesh(config.synth.num_devices or None)
    t0 = time.perf_counter()
    state, n, resumed, rows = synthesis_loop.run_synthesis_loop(
      recon,
      clf.params,
      key,
      x0,
      labels,
      steps=bl.steps,
      mesh=mesh,
      checkpointer=ckptr,
      ckpt_every=bl.ckpt_every,
      ckpt_meta={"config_hash": digest},
      log_every=bl.log_every,
      name="baseline",
    )
  wall = time.perf_counter() - t0
  # Sharded over every process's devices: gathered whole on each.
  x = parallel.to_host(state.x)[:n]
  active = parallel.to_host(state.active)[:n]
  desc = common.save_described_dsv(
    out_dir,
    clf,
    images=x,
    targets=labels,
    lambdas=parallel.to_host(recon.lambdas_fn(state))[:n],
    active=active,
    source=source,
    source_index=index,
    config_hash=digest,
    extra={
      "seed": config.seed,
      "init": config.synth.init,
      "steps": bl.steps,
      "method": "haim_buzaglo_margin",
    },
  )
  distributed.primary_only(viz.class_grid)(
    os.path.join(out_dir, "grid.png"),
    x,
    labels,
    info,
    max_per_class=min(config.synth.num_per_class, 10),
    title=f"Haim/Buzaglo reconstruction ({config.synth.init} init, "
    f"{bl.steps} steps)",
  )
  results = {
    "num_candidates": n,
    "steps": bl.steps,
    "resumed_from_step": resumed,
    "target_fraction": float(np.mean(desc["prediction"] == labels)),
    "entropy_mean": float(desc["entropy"].mean()),
    "margin_mean": float(desc["margin"].mean()),
    "stationarity_last": rows[-1]["stationarity"] if rows else float("nan"),
    "time_s": wall,
  }
  logging.info("Baseline reconstruction done: %s", results)
  return results


__all__ = ["SECTIONS", "run_baseline", "stage_hash"]
