"""Stages of a DSV experiment over one workdir: `run(config, workdir)`.

Each stage reads its inputs from the workdir, writes its outputs there, and
records its completion in `workdir/stages/<stage>.json` together with the
hash of the config sections it depends on. The `all` stage runs every stage
in order and skips those already finished with the same config (a changed
config re-runs them). Interrupted stages resume from their checkpoints.

Workdir layout (train stage):
  ckpt/train/<step>/       Orbax checkpoints of the training state
  classifier/              the trained classifier (Orbax arrays + meta.json)
  train_metrics.jsonl      one JSON row per logged training step
  stages/train.json        completion record: config hash and results

Everything here is importable from a notebook: `run_train(config, workdir)`.
"""

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import logging

from dsv_jax import checkpoints, data, models, train
from dsv_jax.types import ApplyFn, Params

STAGES = ("train",)
# Config sections each stage's outputs depend on (for its completion hash).
_STAGE_SECTIONS = {"train": ("seed", "data", "model", "train")}


def config_hash(config: ml_collections.ConfigDict, stage: str) -> str:
  """A short hash of the config sections that `stage` depends on."""
  d = config.to_dict()
  relevant = {k: d[k] for k in _STAGE_SECTIONS[stage]}
  blob = json.dumps(relevant, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the key, on config values no stage could run with."""

  def need(cond: bool, key: str, msg: str) -> None:
    if not cond:
      raise ValueError(f"Config key {key}: {msg}")

  for section in ("data", "model", "train"):
    need(section in config, section, "missing section.")
  need(
    config.stage in (*STAGES, "all"),
    "stage",
    f"{config.stage!r} is not one of {(*STAGES, 'all')}.",
  )
  need(
    config.model.name in models.MODELS,
    "model.name",
    f"{config.model.name!r} is not one of {models.MODELS}.",
  )
  need(
    config.model.norm in models.NORMS,
    "model.norm",
    f"{config.model.norm!r} is not one of {models.NORMS}.",
  )
  need(
    config.model.pool in models.POOLS,
    "model.pool",
    f"{config.model.pool!r} is not one of {models.POOLS}.",
  )
  for key in ("width", "depth"):
    need(config.model[key] >= 1, f"model.{key}", "must be >= 1.")
  for key in ("steps", "batch_size", "log_every"):
    need(config.train[key] >= 1, f"train.{key}", "must be >= 1.")
  for key in ("eval_every", "ckpt_every", "max_shift"):
    need(config.train[key] >= 0, f"train.{key}", "must be >= 0.")
  need(config.train.learning_rate > 0, "train.learning_rate", "must be > 0.")
  need(config.train.weight_decay >= 0, "train.weight_decay", "must be >= 0.")
  need(config.data.max_train >= 0, "data.max_train", "must be >= 0.")


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
  """The dataset a config names (never downloads)."""
  return data.load_dataset(
    config.data.name,
    data_dir=config.data.data_dir or None,
    seed=config.seed,
    max_train=config.data.max_train or None,
  )


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Constructor arguments of `config.model` for `models.build_model`."""
  m = config.model
  if m.name == "convnet":
    return {"width": m.width, "depth": m.depth, "norm": m.norm, "pool": m.pool}
  if m.name == "resnet18":
    return {"width": m.width, "norm": m.norm}
  return {"hidden": (m.width,) * m.depth}


def _build(name: str, kwargs: dict, info: data.DatasetInfo, seed: int):
  return models.build_model(
    name,
    image_shape=info.image_shape,
    num_classes=info.num_classes,
    key=jax.random.key(seed),
    **kwargs,
  )


def _stage_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "stages", f"{stage}.json")


def stage_record(workdir: str, stage: str) -> dict[str, Any] | None:
  """The completion record of `stage` in `workdir`, or None if unfinished."""
  path = _stage_path(workdir, stage)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _mark_done(workdir: str, stage: str, digest: str, results: dict) -> None:
  os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
  record = {"config_hash": digest, "finished": time.time(), "results": results}
  tmp = _stage_path(workdir, stage) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp, _stage_path(workdir, stage))  # Atomic: never half written.


def _jsonl_writer(path: str, *, keep_through_step: int) -> Callable:
  """Appends rows to `path`, first dropping rows past `keep_through_step`.

  After a resume from step s, rows logged after s by the interrupted run
  are logged again, so they are dropped to keep one row per step.
  """
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [r for r in map(json.loads, f) if r["step"] <= keep_through_step]
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)

  def write(row: dict) -> None:
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")

  return write


def run_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the classifier of `config`, resuming an interrupted run.

  Returns:
    A dict with validation and test accuracy/loss, wall time and steps.
  """
  validate_config(config)
  workdir = os.path.abspath(workdir)
  digest = config_hash(config, "train")
  ds = load_data(config)
  logging.info(
    "Data %s: train %d, validation %d, test %d, images %s, %d classes.",
    ds.info.name,
    len(ds.train["label"]),
    len(ds.validation["label"]),
    len(ds.test["label"]),
    ds.info.image_shape,
    ds.info.num_classes,
  )
  kwargs = model_kwargs(config)
  model = _build(config.model.name, kwargs, ds.info, config.seed)
  fm = models.functional(model)
  logging.info(
    "Model %s %s: %d parameters.",
    config.model.name,
    kwargs,
    models.num_params(fm.params),
  )

  ckpt_dir = os.path.join(workdir, "ckpt", "train")
  ckptr = checkpoints.RunCheckpointer(ckpt_dir)
  resume_step = ckptr.latest_step()
  if resume_step is not None:
    meta = ckptr.read_meta(resume_step)
    if meta.get("config_hash") != digest:
      ckptr.close()
      raise ValueError(
        f"{ckpt_dir} holds an interrupted training run of a different config "
        f"(hash {meta.get('config_hash')}, this config {digest}). Resume it "
        "with its original config, use a fresh --workdir, or delete "
        f"{ckpt_dir} to start over."
      )
  on_metrics = _jsonl_writer(
    os.path.join(workdir, "train_metrics.jsonl"),
    keep_through_step=resume_step or 0,
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
  ckptr.close()
  train_time = time.perf_counter() - t0
  evaluate = train.make_eval_fn(fm)
  val = evaluate(state.params, state.model_state, ds.validation)
  test = evaluate(state.params, state.model_state, ds.test)
  results = {
    "steps": config.train.steps,
    "resumed_from_step": resume_step or 0,
    "train_time_s": train_time,
    "train_accuracy_last_batch": last.get("accuracy"),
    "val_accuracy": val["accuracy"],
    "val_loss": val["loss"],
    "test_accuracy": test["accuracy"],
    "test_loss": test["loss"],
    "num_params": models.num_params(state.params),
  }
  checkpoints.save_classifier(
    os.path.join(workdir, "classifier"),
    {"params": state.params, "model_state": state.model_state},
    {
      "model": {"name": config.model.name, "kwargs": kwargs},
      "seed": config.seed,
      "dataset": ds.info.to_dict(),
      "config_hash": digest,
      "results": results,
    },
  )
  logging.info(
    "Trained in %.1f s: validation accuracy %.4f, test accuracy %.4f.",
    train_time,
    val["accuracy"],
    test["accuracy"],
  )
  _mark_done(workdir, "train", digest, results)
  return results


class Classifier(NamedTuple):
  """A trained classifier loaded from disk, ready for the DeepKKT code."""

  apply_fn: ApplyFn  # (params, images) -> logits, evaluation mode.
  params: Params
  functional: models.FunctionalModel
  info: data.DatasetInfo
  meta: dict[str, Any]


def load_classifier(path: str) -> Classifier:
  """Loads a classifier from a workdir or a `classifier/` directory.

  Raises:
    FileNotFoundError: no classifier there (the message says to run the
      `train` stage first).
    ValueError: the stored arrays do not fit the recorded architecture.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "classifier")):
    path = os.path.join(path, "classifier")
  meta = checkpoints.load_classifier_meta(path)
  info = data.DatasetInfo.from_dict(meta["dataset"])
  model = _build(
    meta["model"]["name"], meta["model"]["kwargs"], info, meta["seed"]
  )
  fm = models.functional(model)
  arrays = checkpoints.load_classifier_arrays(
    path, {"params": fm.params, "model_state": fm.state}
  )
  fm = fm._replace(params=arrays["params"], state=arrays["model_state"])
  state = arrays["model_state"]

  def apply_fn(params, x):
    return fm.eval_apply(params, state, x)

  return Classifier(apply_fn, arrays["params"], fm, info, meta)


_RUNNERS = {"train": run_train}


def run(
  config: ml_collections.ConfigDict, workdir: str, stage: str | None = None
) -> dict[str, dict]:
  """Runs `stage` (default `config.stage`; `all` = every stage in order).

  Under `all`, a stage already finished with the same config is skipped;
  one finished with another config is redone from scratch. A single named
  stage always runs (resuming its own checkpoint if interrupted).

  Returns:
    `{stage: results}` for the stages run or skipped.
  """
  validate_config(config)
  stage = stage or config.stage
  if stage not in (*STAGES, "all"):
    raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}.")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  todo = STAGES if stage == "all" else (stage,)
  out = {}
  for name in todo:
    record = stage_record(workdir, name)
    digest = config_hash(config, name)
    if record is not None and stage == "all":
      if record["config_hash"] == digest:
        logging.info("Stage %s already finished; skipping.", name)
        out[name] = record["results"]
        continue
      logging.info("Config of stage %s changed: redoing it.", name)
      shutil.rmtree(os.path.join(workdir, "ckpt", name), ignore_errors=True)
    elif record is not None and record["config_hash"] != digest:
      shutil.rmtree(os.path.join(workdir, "ckpt", name), ignore_errors=True)
    logging.info("Stage %s: starting in %s.", name, workdir)
    out[name] = _RUNNERS[name](config, workdir)
  return out


__all__ = [
  "STAGES",
  "Classifier",
  "config_hash",
  "load_classifier",
  "load_data",
  "run",
  "run_train",
  "stage_record",
  "validate_config",
]
