"""The `train` stage: the classifier whose DSVs the later stages find.

Trains `config.model` on `config.data` with `config.train` (resuming from
`ckpt/train`), runs the finishing phase (full-batch L-BFGS to a stationary
point, resuming from `ckpt/train_finish`), and writes `classifier/` (Orbax
arrays + meta.json, swapped in whole) and `train_metrics.jsonl`. With a
classifier from elsewhere (`model.source`, `sources`) it only records that.
"""

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dsv_jax import checkpoints, distributed, models, parallel, select, train
from dsv_jax.experiment import common, sources, stages
from dsv_jax.experiment import workdir as wd

NAME = "train"
SECTIONS = ("seed", "data", "model", "train")
UPSTREAM = ()
CKPT_DIRS = ("train", "train_finish")
# What a finished stage leaves (`workdir.output_problem`); none with a
# classifier from elsewhere (`sources`), where the stage trains nothing.
OUTPUTS = ("classifier/meta.json", "classifier/arrays/_METADATA")


def stage_hash(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The hash the stage records (`workdir.config_hash`): its sections."""
  del workdir  # The classifier's recipe is all it depends on.
  return wd.config_hash(config, SECTIONS)


def _save_classifier_atomically(workdir: str, arrays, meta) -> None:
  # Written beside and swapped in, so a crash mid-write never leaves a
  # classifier/ whose arrays and meta.json disagree.
  # With several processes, all of them write the Orbax arrays; process 0
  # alone moves folders, between barriers. On an object store (gs://) a
  # rename is a copy and a delete, so there the swap is not atomic.
  final = os.path.join(workdir, "classifier")
  tmp, old = final + ".tmp", final + ".old"
  if distributed.is_primary():
    for path in (tmp, old):
      epath.Path(path).rmtree(missing_ok=True)
  distributed.barrier("dsv_jax: classifier tmp cleared")
  checkpoints.save_classifier(tmp, arrays, meta)
  distributed.barrier("dsv_jax: classifier saved")
  if distributed.is_primary():
    if epath.Path(final).is_dir():
      epath.Path(final).replace(old)
    epath.Path(tmp).replace(final)
    epath.Path(old).rmtree(missing_ok=True)
  distributed.barrier("dsv_jax: classifier in place")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the classifier of `config`, resuming an interrupted run.

  Returns:
    A dict with validation and test accuracy/loss, wall time and steps.
  """
  common.validate_config(config)
  workdir = checkpoints.abspath(workdir)
  digest = stage_hash(config, workdir)
  if sources.is_external(config):
    # Nothing to train: later stages take the classifier from the source.
    results = sources.describe(config)
    logging.info("Classifier from model.source=%s: not training.", results)
    wd.mark_done(workdir, "train", digest, results)
    return results
  ds = common.load_data(config)
  logging.info(
    "Data %s: train %d, validation %d, test %d, images %s, %d classes.",
    ds.info.name,
    len(ds.train["label"]),
    len(ds.validation["label"]),
    len(ds.test["label"]),
    ds.info.image_shape,
    ds.info.num_classes,
  )
  kwargs = common.model_kwargs(config)
  model = common.build_model(config.model.name, kwargs, ds.info, config.seed)
  fm = models.functional(model)
  logging.info(
    "Model %s %s: %d parameters.",
    config.model.name,
    kwargs,
    models.num_params(fm.params),
  )

  ckpt_dir = os.path.join(workdir, "ckpt", "train")
  with wd.resumable(ckpt_dir, digest, "training") as ckptr:
    resume_step = ckptr.latest_step()
    on_metrics = wd.metrics_writer(
      os.path.join(workdir, "train_metrics.jsonl"), ckptr
    )
    t0 = time.perf_counter()
    state, last = train.train_classifier(
      fm,
      ds.train,
      jax.random.fold_in(jax.random.key(config.seed), 1),
      steps=config.train.steps,
      batch_size=config.train.batch_size,
      learning_rate=config.train.learning_rate,
      weight_decay=config.train.weight_decay,
      lr_schedule=config.train.lr_schedule,
      flip=config.train.flip,
      max_shift=config.train.max_shift,
      eval_split=ds.validation,
      eval_every=config.train.eval_every,
      log_every=config.train.log_every,
      checkpointer=ckptr,
      ckpt_every=config.train.ckpt_every,
      ckpt_meta={"config_hash": digest},
      on_metrics=on_metrics,
    )
  if distributed.is_distributed():
    # The state is replicated over every process's devices; the finishing
    # phase and the evaluations run the same host-driven programs on each
    # process, on its own devices, so they take it as numpy.
    state = parallel.to_host(state)
  finish = _finish(config, workdir, digest, fm, state, ds)
  state = state._replace(params=finish.pop("params"))
  train_time = time.perf_counter() - t0
  evaluate = train.make_eval_fn(fm)
  splits = {"train": ds.train, "val": ds.validation, "test": ds.test}
  evals = {
    name: evaluate(state.params, state.model_state, split)
    for name, split in splits.items()
  }
  results = {
    "steps": config.train.steps,
    "resumed_from_step": last.get("resumed_from_step", resume_step or 0),
    "train_time_s": train_time,
    "train_accuracy_last_batch": last.get("accuracy"),
    "num_params": models.num_params(state.params),
    "max_entropy": float(np.log(ds.info.num_classes)),
    **finish,
  }
  # Accuracy and loss of every split, and the classifier's health (mean
  # entropy, margin and logit scale) on its own training images, the
  # validation and the test split.
  for name, ev in evals.items():
    for key, value in ev.items():
      results[f"{name}_{key}"] = value
  _save_classifier_atomically(
    workdir,
    {"params": state.params, "model_state": state.model_state},
    {
      "model": {"name": config.model.name, "kwargs": kwargs},
      "seed": config.seed,
      "dataset": ds.info.to_dict(),
      "config_hash": digest,
      # The recipe the stationarity anchors of selection need.
      "train": {
        "weight_decay": config.train.weight_decay,
        "num_train": len(ds.train["label"]),
      },
      "results": results,
    },
  )
  logging.info(
    "Trained in %.1f s: validation accuracy %.4f, test accuracy %.4f; "
    "health on training images: entropy %.3f (max %.3f), margin %.3f, "
    "logit std %.3f.",
    train_time,
    results["val_accuracy"],
    results["test_accuracy"],
    results["train_entropy"],
    results["max_entropy"],
    results["train_margin"],
    results["train_logit_std"],
  )
  warning = train.health_warning(results["train_entropy"], ds.info.num_classes)
  if warning:
    logging.warning("%s", warning)
  wd.mark_done(workdir, "train", digest, results)
  return results


def _finish(config, workdir, digest, fm, state, ds) -> dict[str, Any]:
  """The train stage's finishing phase (`train.finish_full_batch`).

  Optimises the leaves a lambda can represent (`select.represented_leaves`:
  scale-invariant ones have no stationary point under weight decay) to a
  stationary point of the un-augmented training objective. Returns the
  finished ``params`` and the record entries (prefixed ``finish_``).
  """
  t = config.train

  def apply_fn(p, x):
    return fm.eval_apply(p, state.model_state, x)

  rep = select.represented_leaves(
    apply_fn,
    state.params,
    ds.train["image"],
    ds.train["label"],
  )
  out = {
    "params": state.params,
    "represented_excluded": list(rep.groups),
    "represented_excluded_share": rep.excluded_share,
  }
  if not t.finish_steps:
    return out
  ckpt_dir = os.path.join(workdir, "ckpt", "train_finish")
  with wd.resumable(ckpt_dir, digest, "finishing") as ckptr:
    logging.info(
      "Finishing phase: full-batch L-BFGS on %d training images over every "
      "leaf but %s (up to %d iterations, target relative gradient %g).",
      len(ds.train["label"]),
      list(rep.groups) or "none",
      t.finish_steps,
      t.finish_tol,
    )
    params, info = train.finish_full_batch(
      apply_fn,
      state.params,
      ds.train["image"],
      ds.train["label"],
      weight_decay=t.weight_decay,
      steps=t.finish_steps,
      mask=rep.mask,
      tol=t.finish_tol,
      checkpointer=ckptr,
      ckpt_every=t.ckpt_every and max(1, t.ckpt_every // 10),
      ckpt_meta={"config_hash": digest},
      log_every=max(1, t.log_every // 10),
    )
  out["params"] = params
  out.update({f"finish_{k}": v for k, v in info.items()})
  return out


__all__ = list(stages.FACE)
