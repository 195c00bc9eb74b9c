"""The `synthesize` stage: DSVs synthesized by inverting the classifier.

Candidates start from noise, real images (k-shot) or another data set
(0-shot) with the recipe of their init (`common.synthesis_recipe`); x and
lambda are optimised with the DeepKKT objective (Algorithm 1), sharded over
the devices and resumable from `ckpt/synthesize`. Writes `synthesize/`:
the DSV set, grid.png, metrics.jsonl and curves.png. Optionally starts with a
low-resolution phase (`synth.lowres_size`, `ckpt/synthesize_lowres`).
"""

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dsv_jax import checkpoints, distributed, parallel, synthesize, viz
from dsv_jax.experiment import common, stages, synthesis_loop
from dsv_jax.experiment import workdir as wd

NAME = "synthesize"
SECTIONS = ("seed", "data", "model", "train", "kkt", "synth")
UPSTREAM = ("train",)
CKPT_DIRS = ("synthesize", "synthesize_lowres")
# What a finished stage leaves (`workdir.output_problem`).
OUTPUTS = ("synthesize/dsv.npz",)


def stage_hash(
  config: ml_collections.ConfigDict, workdir: str, init: str | None = None
) -> str:
  """The hash of a synthesis from `init` (default `synth.init`): the recipe
  it runs (`common.synthesis_recipe`) and the classifier it inverts."""
  return common.synthesis_hash(config, workdir, SECTIONS, init)


def _lowres_phase(config, workdir, digest, clf, key, x0, targets, mesh):
  """`synth.lowres_steps` steps on `synth.lowres_size` images that the
  classifier sees upsampled; returns them upsampled, the start of the
  full-resolution phase. Resumable from `ckpt/synthesize_lowres`."""
  sy, info = config.synth, clf.info
  low = (sy.lowres_size, sy.lowres_size, info.image_shape[2])
  # Noise is drawn at the low resolution (downsampling would average it
  # away); images are downsampled.
  low_clf = clf._replace(info=dataclasses.replace(info, image_shape=low))
  x_low = common.initial_candidates(config, low_clf, key)[0]
  if x_low.shape[1:] != low:
    x_low = np.asarray(synthesis_loop.resize(x_low, low))
  synth = synthesize.make_synthesizer(
    synthesis_loop.upsampling(clf.apply_fn, info.image_shape),
    **common.synth_kwargs(config, info),
  )
  logging.info(
    "Low-resolution phase: %d steps at %dx%d.", sy.lowres_steps, *low[:2]
  )
  ckpt_dir = os.path.join(workdir, "ckpt", "synthesize_lowres")
  with wd.resumable(ckpt_dir, digest, "low-resolution synthesis") as ckptr:
    state, n, _, _ = synthesis_loop.run_synthesis_loop(
      synth,
      clf.params,
      jax.random.fold_in(key, 5),
      x_low,
      targets,
      steps=sy.lowres_steps,
      mesh=mesh,
      checkpointer=ckptr,
      ckpt_every=sy.ckpt_every,
      ckpt_meta={"config_hash": digest},
      log_every=sy.log_every,
      name="synthesize (low resolution)",
    )
  x = synthesis_loop.resize(parallel.to_host(state.x)[:n], info.image_shape)
  return np.asarray(x, np.float32)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Synthesises DSVs with the trained classifier.

  Uses the classifier of the `train` stage in `workdir` (or the path in
  `config.synth.classifier`), resumes an interrupted run from
  `ckpt/synthesize`, and writes the DSV set, a PNG grid, metrics.jsonl and
  curves into `workdir/synthesize/`.

  Returns:
    A dict with survival, source accuracy, entropy, timing and steps.
  """
  common.validate_config(config)
  config = common.synthesis_recipe(config)
  workdir = checkpoints.abspath(workdir)
  digest = stage_hash(config, workdir)
  clf = common.classifier_for(config, workdir)
  info, sy = clf.info, config.synth
  key = common.synthesis_key(config)
  x0, targets, source, index = common.initial_candidates(config, clf, key)
  synth = synthesize.make_synthesizer(
    clf.apply_fn, **common.synth_kwargs(config, info)
  )
  mesh = parallel.make_mesh(sy.num_devices or None)
  if sy.lowres_size:
    x0 = _lowres_phase(config, workdir, digest, clf, key, x0, targets, mesh)
  out_dir = os.path.join(workdir, "synthesize")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  ckpt_dir = os.path.join(workdir, "ckpt", "synthesize")
  with wd.resumable(ckpt_dir, digest, "synthesis") as ckptr:
    on_metrics = wd.metrics_writer(
      os.path.join(out_dir, "metrics.jsonl"), ckptr
    )
    logging.info(
      "Synthesising %d candidates (%s init, %d steps, lr_x %g, TV %g, norm %g) "
      "on %d device(s).",
      len(targets),
      sy.init,
      sy.steps,
      sy.lr_x,
      config.kkt.beta_tv,
      config.kkt.beta_norm,
      parallel.num_shards(mesh),
    )
    t0 = time.perf_counter()
    state, n, resumed, _ = synthesis_loop.run_synthesis_loop(
      synth,
      clf.params,
      key,
      x0,
      targets,
      steps=sy.steps,
      mesh=mesh,
      checkpointer=ckptr,
      ckpt_every=sy.ckpt_every,
      ckpt_meta={"config_hash": digest},
      log_every=sy.log_every,
      on_metrics=on_metrics,
    )
  wall = time.perf_counter() - t0
  # Candidates are sharded over every process's devices: gathered whole.
  x = parallel.to_host(state.x)[:n]
  active = parallel.to_host(state.active)[:n]
  lambdas = parallel.to_host(synth.lambdas_fn(state))[:n]
  labels = np.asarray(synthesize.target_labels(targets))
  desc = common.save_described_dsv(
    out_dir,
    clf,
    images=x,
    targets=targets,
    lambdas=lambdas,
    active=active,
    source=source,
    source_index=index,
    config_hash=digest,
    extra={"seed": config.seed, "init": sy.init, "steps": sy.steps},
  )
  distributed.primary_only(viz.class_grid)(
    os.path.join(out_dir, "grid.png"),
    x,
    labels,
    info,
    max_per_class=min(sy.num_per_class, 10),
    mark=active,
    classes=common.resolve_classes(sy.classes, info, "synth.classes"),
    title=(
      f"DSVs ({sy.init} init, {sy.steps} steps, "
      f"{'primal only' if config.kkt.beta_stationarity == 0 else 'DeepKKT'}"
      "; red: disqualified)"
    ),
  )
  distributed.barrier("dsv_jax: synthesis metrics written")  # By process 0.
  with epath.Path(out_dir, "metrics.jsonl").open() as f:
    rows = [json.loads(line) for line in f]
  distributed.primary_only(viz.plot_curves)(
    os.path.join(out_dir, "curves.png"),
    rows,
    keys=[
      k
      for k in (
        "total",
        "stationarity",
        "primal",
        "stationarity_aug",
        "primal_aug",
        "tv",
        "norm",
        "entropy",
        "num_active",
        "accuracy",
        "lambda_mean",
      )
      if k in rows[0]
    ],
    title="synthesis",
  )
  correct = desc["prediction"] == labels
  results = {
    "num_candidates": n,
    "steps": sy.steps,
    "lowres_steps": sy.lowres_steps,
    "resumed_from_step": resumed,
    "survival": float(active.mean()),
    "num_active": int(active.sum()),
    "source_accuracy_survivors": (
      float(correct[active].mean()) if active.any() else 0.0
    ),
    "entropy_first": rows[0]["entropy"],
    "entropy_last": float(desc["entropy"][active].mean())
    if active.any()
    else 0.0,
    "stationarity_last": rows[-1]["stationarity"],
    "synth_time_s": wall,
    "candidate_steps_per_s": n * (sy.steps - resumed) / wall,
    "num_devices": parallel.num_shards(mesh),
  }
  if active.any():
    results.update(common.judge_dsvs(config, clf, x[active], labels[active]))
  logging.info("Synthesis done: %s", results)
  wd.mark_done(workdir, "synthesize", digest, results)
  return results


__all__ = list(stages.FACE)
