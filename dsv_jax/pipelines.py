"""Stages of a DSV experiment over one workdir: `run(config, workdir)`.

Each stage reads its inputs from the workdir, writes its outputs there, and
records its completion in `workdir/stages/<stage>.json` together with the
hash of the config sections it depends on. The `all` stage runs every stage
in order and skips those already finished with the same config (a changed
config re-runs them). Interrupted stages resume from their checkpoints.

Workdir layout:
  ckpt/train/<step>/       Orbax checkpoints of the training state
  classifier/              the trained classifier (Orbax arrays + meta.json)
  train_metrics.jsonl      one JSON row per logged training step
  ckpt/synthesize/<step>/  Orbax checkpoints of the whole synthesis state
  synthesize/              dsv.npz + dsv_orbax/ (the DSV set, `artifacts`),
                           grid.png (one row per class), metrics.jsonl (every
                           loss term, mean entropy, active count), curves.png
  edit/                    strip.png + edit.npz (real image -> other class)
  interpolate/             strip.png + interpolate.npz (delta sweep a -> b)
  stages/<stage>.json      completion record: config hash and results

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
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dsv_jax import (
  artifacts,
  augment,
  checkpoints,
  data,
  models,
  parallel,
  select,
  synthesize,
  train,
  viz,
)
from dsv_jax.types import ApplyFn, Params

# The order of `all`: every stage reads only what earlier ones wrote.
STAGES = (
  "train",
  "select",
  "synthesize",
  "edit",
  "interpolate",
  "retrain",
  "report",
)
# Config sections each stage's outputs depend on (for its completion hash).
_TRAIN_SECTIONS = ("seed", "data", "model", "train")
_STAGE_SECTIONS = {
  "train": _TRAIN_SECTIONS,
  "synthesize": (*_TRAIN_SECTIONS, "kkt", "synth"),
  "edit": (*_TRAIN_SECTIONS, "kkt", "synth", "edit"),
  "interpolate": (*_TRAIN_SECTIONS, "kkt", "synth", "interpolate"),
  "select": (*_TRAIN_SECTIONS, "select"),
  "retrain": (*_TRAIN_SECTIONS, "kkt", "synth", "select", "retrain"),
  # The report runs its own sub-experiments and depends on everything.
  "report": (
    *_TRAIN_SECTIONS,
    "kkt",
    "synth",
    "select",
    "edit",
    "interpolate",
    "retrain",
    "baseline",
    "report",
  ),
}


# Keys that change only progress output and checkpoint frequency, never a
# result: left out of the hashes, so changing them neither redoes a finished
# stage under `all` nor discards an interrupted stage's checkpoint.
_PROGRESS_KEYS = ("log_every", "ckpt_every", "eval_every")

# Options added after runs existed, at the value that reproduces the
# behaviour from before them: left out of the hashes at that value, so a
# new option does not redo hours of finished stages that it cannot change.
_NEUTRAL_DEFAULTS = {
  ("kkt", "norm_center"): "mean",
  # `synthesis_recipe` leaves these at their neutral values: the hash of a
  # synthesis depends on the recipe it runs, not on the other init's.
  ("synth", "image_steps"): 0,
  ("synth", "image_lr_x"): 0.0,
  ("synth", "image_priors"): True,
}
# Stages that synthesise, and the init whose recipe they run (None: the
# config's synth.init); their hashes are of `synthesis_recipe`.
_RECIPE_INIT = {
  "synthesize": None,
  "retrain": None,
  "edit": "real",
  "interpolate": "real",
}
IMAGE_INITS = ("real", "other")


def synthesis_recipe(
  config: ml_collections.ConfigDict, init: str | None = None
) -> ml_collections.ConfigDict:
  """The config a synthesis from `init` (default `synth.init`) runs with.

  Candidates that start from images (`IMAGE_INITS`; editing and
  interpolation start from real images too) run `synth.image_steps` steps
  at `synth.image_lr_x` (0: `synth.steps` / `synth.lr_x`), without the TV
  and norm priors unless `synth.image_priors`. The copy returned has the
  effective values in `synth.steps`, `synth.lr_x`, `kkt.beta_tv` and
  `kkt.beta_norm`, and the `image_*` keys at their neutral values.
  """
  init = init or config.synth.init
  out = ml_collections.ConfigDict(config.to_dict())
  sy = out.synth
  if init in IMAGE_INITS:
    sy.steps = sy.image_steps or sy.steps
    sy.lr_x = sy.image_lr_x or sy.lr_x
    if not sy.image_priors:
      out.kkt.beta_tv = 0.0
      out.kkt.beta_norm = 0.0
  sy.image_steps, sy.image_lr_x, sy.image_priors = 0, 0.0, True
  return out


def config_hash(config: ml_collections.ConfigDict, stage: str) -> str:
  """A short hash of the config sections that `stage` depends on."""
  if stage in _RECIPE_INIT and "synth" in config:
    config = synthesis_recipe(config, _RECIPE_INIT[stage])
  d = config.to_dict()
  relevant = {
    k: (
      {
        kk: v
        for kk, v in d[k].items()
        if kk not in _PROGRESS_KEYS
        and _NEUTRAL_DEFAULTS.get((k, kk), object()) != v
      }
      if isinstance(d.get(k), dict)
      else d.get(k)
    )
    for k in _STAGE_SECTIONS[stage]
  }
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
  need(config.train.finish_steps >= 0, "train.finish_steps", "must be >= 0.")
  need(config.train.finish_tol >= 0, "train.finish_tol", "must be >= 0.")
  need(
    not (config.train.finish_steps and config.train.weight_decay == 0),
    "train.finish_steps",
    "needs train.weight_decay > 0 (no stationary point without it).",
  )
  need(
    config.train.lr_schedule in train.SCHEDULES,
    "train.lr_schedule",
    f"{config.train.lr_schedule!r} is not one of {train.SCHEDULES}.",
  )
  need(config.data.max_train >= 0, "data.max_train", "must be >= 0.")
  if "synth" in config:
    sy, k = config.synth, config.kkt
    need(sy.init in INITS, "synth.init", f"{sy.init!r} not in {INITS}.")
    need(
      sy.dual in synthesize.DUALS,
      "synth.dual",
      f"{sy.dual!r} not in {synthesize.DUALS}.",
    )
    need(
      sy.optimizer in OPTIMIZERS,
      "synth.optimizer",
      f"{sy.optimizer!r} not in {OPTIMIZERS}.",
    )
    for key in ("num_per_class", "steps", "log_every"):
      need(sy[key] >= 1, f"synth.{key}", "must be >= 1.")
    for key in ("ckpt_every", "num_devices"):
      need(sy[key] >= 0, f"synth.{key}", "must be >= 0.")
    for key in ("lr_x", "lr_lambda"):
      need(sy[key] > 0, f"synth.{key}", "must be > 0.")
    for key in ("image_steps", "image_lr_x"):
      need(sy[key] >= 0, f"synth.{key}", f"must be >= 0 (0: synth.{key[6:]}).")
    need(0 <= sy.delta <= 1, "synth.delta", "must lie in [0, 1].")
    need(
      sy.lambda_low <= sy.lambda_high,
      "synth.lambda_low",
      "must be <= synth.lambda_high.",
    )
    for key in ("eta", "beta_primal", "beta_stationarity", "beta_tv"):
      need(k[key] >= 0, f"kkt.{key}", "must be >= 0.")
    need(k.beta_norm >= 0, "kkt.beta_norm", "must be >= 0.")
    need(
      k.norm_center in NORM_CENTERS,
      "kkt.norm_center",
      f"must be one of {NORM_CENTERS}.",
    )


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
  _check_resumable(ckptr, ckpt_dir, digest, "training")
  resume_step = ckptr.latest_step()
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
  ckptr.close()
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
    "resumed_from_step": resume_step or 0,
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
  checkpoints.save_classifier(
    os.path.join(workdir, "classifier"),
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
  _mark_done(workdir, "train", digest, results)
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
  ckptr = checkpoints.RunCheckpointer(ckpt_dir)
  _check_resumable(ckptr, ckpt_dir, digest, "finishing")
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
  ckptr.close()
  out["params"] = params
  out.update({f"finish_{k}": v for k, v in info.items()})
  return out


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


# ----------------------------------------------------------------------------
# Synthesis, editing, interpolation.

INITS = ("noise", "real", "other")
NORM_CENTERS = ("mean", "min")
OPTIMIZERS = ("adam", "sgd")


def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
  return optax.adam(lr) if name == "adam" else optax.sgd(lr)


def synth_kwargs(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> dict[str, Any]:
  """Keyword arguments of `synthesize.make_synthesizer` from a config."""
  sy, k = config.synth, config.kkt
  return {
    "x_tx": _optimizer(sy.optimizer, sy.lr_x),
    "lambda_tx": _optimizer(sy.optimizer, sy.lr_lambda),
    "eta": k.eta,
    "beta_primal": k.beta_primal,
    "beta_stationarity": k.beta_stationarity,
    "beta_tv": k.beta_tv,
    "beta_norm": k.beta_norm,
    "norm_center": info.pixel_min if k.norm_center == "min" else 0.0,
    "gated": k.gated,
    "distance": k.distance,
    "method": k.method,
    "chunk_size": k.chunk_size or None,
    "dual": sy.dual,
    "lambda_init": (sy.lambda_low, sy.lambda_high),
    "augment_fn": augment.make_augment(
      translate=sy.aug_translate,
      crop=sy.aug_crop,
      flip=sy.aug_flip,
      cutout=sy.aug_cutout,
      noise=sy.aug_noise,
    ),
    "pixel_min": info.pixel_min,
    "pixel_max": info.pixel_max,
  }


def _classifier_for(config, workdir) -> "Classifier":
  return load_classifier(config.synth.classifier or workdir)


def synthesis_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The synthesize stage's key: its candidates, and every run that must
  start from the same candidates (the KKT baseline, the sweeps)."""
  return jax.random.fold_in(jax.random.key(config.seed), 3)


def _initial_candidates(config, clf, key):
  """(x0, targets, source, source_index) of the synthesize stage."""
  sy, info = config.synth, clf.info
  c = info.num_classes
  labels = synthesize.class_targets(sy.num_per_class, c)
  n = len(labels)
  init_key = jax.random.fold_in(key, 2)
  if sy.init == "noise":
    x0 = np.asarray(
      synthesize.noise_init(init_key, n, info.image_shape, scale=sy.noise_scale)
    )
    index = np.full(n, -1, np.int32)
  elif sy.init == "real":
    ds = load_data(config)
    x0, index = synthesize.real_init(init_key, ds.train, labels)
  else:
    other = data.load_dataset(
      sy.other_dataset,
      data_dir=sy.other_data_dir or None,
      seed=config.seed,
      max_train=max(1000, n),
    )
    x0, index = synthesize.other_init(
      init_key, other.train["image"], n, src_info=other.info, dst_info=info
    )
  if sy.delta > 0:
    targets = np.asarray(
      synthesize.blend_targets(labels, (labels + 1) % c, sy.delta, c)
    )
  else:
    targets = labels
  source = np.full(n, sy.init)
  return np.asarray(x0, np.float32), targets, source, index


def _shardings(tree, mesh, n):
  """P("data") for leaves with leading axis n, P() for the rest."""
  batch = parallel.batch_sharding(mesh)
  rep = parallel.replicated_sharding(mesh)
  return jax.tree.map(
    lambda a: batch if jnp.ndim(a) >= 1 and jnp.shape(a)[0] == n else rep,
    tree,
  )


def run_synthesis_loop(
  synth: synthesize.Synthesizer,
  key: jax.Array,
  x0: np.ndarray,
  targets: np.ndarray,
  *,
  steps: int,
  mesh=None,
  checkpointer: checkpoints.RunCheckpointer | None = None,
  ckpt_every: int = 0,
  ckpt_meta: dict | None = None,
  log_every: int = 100,
  on_metrics: Callable[[dict], None] | None = None,
  name: str = "synthesize",
):
  """Runs a synthesis sharded over `mesh`, resuming from `checkpointer`.

  Candidates are padded to a multiple of the mesh size (padding rows start
  inactive), sharded ``P("data")`` with the classifier replicated, and the
  step is jitted once with donated state.

  Returns:
    ``(state, n, resumed_from_step, rows)``: the final state (padded), the
    number of real candidates, the step resumed from (0: none) and the
    logged metrics rows.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  n = len(targets)
  (x0p, tp), valid = parallel.pad_to_multiple(
    (jnp.asarray(x0), jnp.asarray(targets)), parallel.num_shards(mesh)
  )
  m = x0p.shape[0]
  synthesize.check_images(x0)
  state = synth.init_fn(jax.random.fold_in(key, 0), x0p, tp, active=valid)
  state_sh = _shardings(state, mesh, m)
  state = jax.device_put(state, state_sh)
  tp = parallel.shard_batch(tp, mesh)
  resumed = 0
  if checkpointer is not None:
    restored = checkpointer.restore(state)
    if restored is not None:
      resumed, state, _ = restored
      state = jax.device_put(state, state_sh)
      logging.info("Resumed %s from step %d of %d.", name, resumed, steps)
  step_key = jax.random.fold_in(key, 1)
  step_fn = jax.jit(
    synth.step_fn,
    in_shardings=(state_sh, parallel.batch_sharding(mesh), None),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )
  rows = []
  t0, s0 = time.perf_counter(), resumed
  for step in range(resumed + 1, steps + 1):
    state, metrics = step_fn(state, tp, step_key)
    if step % log_every == 0 or step == steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      now = time.perf_counter()
      rate = (step - s0) / (now - t0)
      row = {
        "step": step,
        "steps_per_s": rate,
        "candidate_steps_per_s": rate * n,
        **metrics,
      }
      t0, s0 = now, step
      logging.info(
        "%s step %d/%d: %s",
        name,
        step,
        steps,
        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"),
      )
      rows.append(row)
      if on_metrics is not None:
        on_metrics(row)
    if checkpointer is not None and (
      (ckpt_every and step % ckpt_every == 0) or step == steps
    ):
      checkpointer.save(step, state, ckpt_meta or {})
  return state, n, resumed, rows


def run_synthesize(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Synthesises DSVs with the trained classifier.

  Uses the classifier of the `train` stage in `workdir` (or the path in
  `config.synth.classifier`), resumes an interrupted run from
  `ckpt/synthesize`, and writes the DSV set, a PNG grid, metrics.jsonl and
  curves into `workdir/synthesize/`.

  Returns:
    A dict with survival, source accuracy, entropy, timing and steps.
  """
  validate_config(config)
  config = synthesis_recipe(config)
  workdir = os.path.abspath(workdir)
  digest = config_hash(config, "synthesize")
  clf = _classifier_for(config, workdir)
  info, sy = clf.info, config.synth
  key = synthesis_key(config)
  x0, targets, source, index = _initial_candidates(config, clf, key)
  synth = synthesize.make_synthesizer(
    clf.apply_fn, clf.params, **synth_kwargs(config, info)
  )
  mesh = parallel.make_mesh(sy.num_devices or None)
  out_dir = os.path.join(workdir, "synthesize")
  os.makedirs(out_dir, exist_ok=True)
  ckpt_dir = os.path.join(workdir, "ckpt", "synthesize")
  ckptr = checkpoints.RunCheckpointer(ckpt_dir)
  _check_resumable(ckptr, ckpt_dir, digest, "synthesis")
  on_metrics = _jsonl_writer(
    os.path.join(out_dir, "metrics.jsonl"),
    keep_through_step=ckptr.latest_step() or 0,
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
  state, n, resumed, _ = run_synthesis_loop(
    synth,
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
  ckptr.close()
  wall = time.perf_counter() - t0
  x = np.asarray(state.x)[:n]
  active = np.asarray(state.active)[:n]
  lambdas = np.asarray(synth.lambdas_fn(state))[:n]
  labels = np.asarray(synthesize.target_labels(targets))
  desc = save_described_dsv(
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
  viz.class_grid(
    os.path.join(out_dir, "grid.png"),
    x,
    labels,
    info,
    max_per_class=min(sy.num_per_class, 10),
    mark=active,
    title=f"DSVs ({sy.init} init, {sy.steps} steps; red: disqualified)",
  )
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  viz.plot_curves(
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
    results.update(judge_dsvs(config, clf, x[active], labels[active]))
  logging.info("Synthesis done: %s", results)
  _mark_done(workdir, "synthesize", digest, results)
  return results


# Classical judges fitted per training split (data config and seed name
# it): a report fits them once, not once per synthesis sub-run (25 s each
# on Fashion-MNIST, 2 cores).
_CLASSICAL_JUDGES: dict[str, dict[str, Any]] = {}


def classical_judges(
  config: ml_collections.ConfigDict, ds: data.Dataset
) -> dict[str, Any]:
  """`judges.fit_classical` on `ds` (= `load_data(config)`), cached."""
  from dsv_jax import judges

  key = json.dumps(
    {"data": config.data.to_dict(), "seed": config.seed},
    sort_keys=True,
    default=str,
  )
  if key not in _CLASSICAL_JUDGES:
    _CLASSICAL_JUDGES[key] = judges.fit_classical(
      ds.train["image"], ds.train["label"], ds.info
    )
  return _CLASSICAL_JUDGES[key]


def judge_dsvs(
  config: ml_collections.ConfigDict,
  clf: "Classifier",
  images: np.ndarray,
  labels: np.ndarray,
) -> dict[str, float]:
  """Classical agreement and nearest-real distances of DSVs (`judges`).

  Judges fitted on the real training split; the distances, in raw pixels
  and in the classifier's penultimate features, are compared with those of
  the validation images (``*_real``). Empty when the training data is not
  available (a classifier from elsewhere): the judges need real data.
  """
  from dsv_jax import coreset, judges

  try:
    ds = load_data(config)
  except FileNotFoundError as e:
    logging.info("No training data for the classical judges: %s", e)
    return {}
  fm = clf.functional
  agreement = judges.classical_agreement(
    classical_judges(config, ds), images, labels, ds.info
  )
  dist = judges.nearest_real_distance(
    images,
    labels,
    ds.train["image"],
    ds.train["label"],
    ds.info,
    reference_images=ds.validation["image"],
    reference_labels=ds.validation["label"],
    features_fn=lambda xs: coreset.features_of(
      lambda p, xx: fm.eval_features(p, fm.state, xx), clf.params, xs
    ),
  )
  out = {f"classical_agreement_{k}": v for k, v in agreement.items()}
  out["classical_agreement"] = out.pop("classical_agreement_mean")
  out.update({f"nn_distance_{k}": v for k, v in dist.items()})
  return out


def save_described_dsv(
  out_dir: str,
  clf: "Classifier",
  *,
  images: np.ndarray,
  targets: np.ndarray,
  lambdas: np.ndarray,
  source: np.ndarray | str,
  source_index: np.ndarray,
  config_hash: str,
  active: np.ndarray | None = None,
  extra: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
  """Writes a stage's DSV set with the classifier's diagnostics of each row.

  Synthesis, selection and the baseline all save their sets this way, so
  confidence/entropy/margin always come from the classifier that produced
  them. Returns those diagnostics (`synthesize.describe`, as numpy).
  """
  desc = jax.tree.map(
    np.asarray, synthesize.describe(clf.apply_fn, clf.params, images, targets)
  )
  n = len(images)
  dsv = artifacts.DSVSet(
    images=images,
    targets=targets,
    lambdas=lambdas,
    active=np.ones(n, bool) if active is None else active,
    source=np.full(n, source) if isinstance(source, str) else source,
    source_index=source_index,
    confidence=desc["confidence"],
    entropy=desc["entropy"],
    margin=desc["margin"],
  )
  artifacts.save_dsv(
    out_dir,
    dsv,
    dataset=clf.info.name,
    mean=clf.info.mean,
    std=clf.info.std,
    config_hash=config_hash,
    extra=extra,
  )
  return desc


def _check_resumable(ckptr, ckpt_dir, digest, what):
  step = ckptr.latest_step()
  if step is None:
    return
  meta = ckptr.read_meta(step)
  if meta.get("config_hash") != digest:
    ckptr.close()
    raise ValueError(
      f"{ckpt_dir} holds an interrupted {what} run of a different config "
      f"(hash {meta.get('config_hash')}, this config {digest}). Resume it "
      "with its original config, use a fresh --workdir, or delete "
      f"{ckpt_dir} to start over."
    )


def _real_images(config, labels, key):
  ds = load_data(config)
  return synthesize.real_init(key, ds.train, labels)


def run_edit(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Edits one real image per class towards class ``(c + shift) % C``.

  Writes `edit/strip.png` (each original beside its edit, titled with the
  source model's prediction) and `edit/edit.npz`.

  Returns:
    A dict with the fraction of edits the source model classifies as the
    requested target.
  """
  validate_config(config)
  config = synthesis_recipe(config, "real")
  workdir = os.path.abspath(workdir)
  digest = config_hash(config, "edit")
  clf = _classifier_for(config, workdir)
  info, ed = clf.info, config.edit
  c = info.num_classes
  key = jax.random.fold_in(jax.random.key(config.seed), 4)
  src = np.arange(c, dtype=np.int32)
  images, index = _real_images(config, src, jax.random.fold_in(key, 2))
  new = ((src + ed.shift) % c).astype(np.int32)
  synth = synthesize.make_synthesizer(
    clf.apply_fn, clf.params, **synth_kwargs(config, info)
  )
  state, n, _, _ = run_synthesis_loop(
    synth, key, images, new, steps=ed.steps, log_every=ed.steps, name="edit"
  )
  edited = np.asarray(state.x)[:n]
  pred_before = np.asarray(jnp.argmax(clf.apply_fn(clf.params, images), -1))
  pred_after = np.asarray(jnp.argmax(clf.apply_fn(clf.params, edited), -1))
  out_dir = os.path.join(workdir, "edit")
  os.makedirs(out_dir, exist_ok=True)
  both = np.stack([images, edited], 1).reshape(-1, *images.shape[1:])
  names = info.class_names
  titles = []
  for i in range(n):
    titles += [f"{names[pred_before[i]]}", f"->{names[pred_after[i]]}"]
  viz.strip(
    os.path.join(out_dir, "strip.png"),
    both,
    info,
    titles=titles,
    title=f"editing: class c -> c+{ed.shift} (source-model predictions)",
  )
  np.savez(
    os.path.join(out_dir, "edit.npz"),
    original=images,
    edited=edited,
    source_index=index,
    original_label=src,
    target=new,
    prediction=pred_after,
  )
  results = {
    "num_edits": n,
    "steps": ed.steps,
    "target_reached": float(np.mean(pred_after == new)),
  }
  _mark_done(workdir, "edit", digest, results)
  return results


def run_interpolate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Sweeps delta from class a to class b with soft targets (Sec. 5.2).

  Every delta in ``linspace(0, 1, num_deltas)`` gets a candidate with
  target ``(1 - delta) y_a + delta y_b``; all start from the same real
  image of class a. Writes `interpolate/strip.png` (titled with the source
  model's probability of class b) and `interpolate/interpolate.npz`.

  Returns:
    A dict with the probability of class b at each delta.
  """
  validate_config(config)
  config = synthesis_recipe(config, "real")
  workdir = os.path.abspath(workdir)
  digest = config_hash(config, "interpolate")
  clf = _classifier_for(config, workdir)
  info, it = clf.info, config.interpolate
  c = info.num_classes
  if not (0 <= it.class_a < c and 0 <= it.class_b < c):
    raise ValueError(
      f"Config key interpolate.class_a/class_b: must lie in [0, {c})."
    )
  key = jax.random.fold_in(jax.random.key(config.seed), 5)
  image, index = _real_images(
    config, np.array([it.class_a], np.int32), jax.random.fold_in(key, 2)
  )
  deltas = np.linspace(0.0, 1.0, it.num_deltas).astype(np.float32)
  targets = np.asarray(
    synthesize.blend_targets(
      np.full(it.num_deltas, it.class_a),
      np.full(it.num_deltas, it.class_b),
      deltas,
      c,
    )
  )
  x0 = np.repeat(image, it.num_deltas, axis=0)
  synth = synthesize.make_synthesizer(
    clf.apply_fn, clf.params, **synth_kwargs(config, info)
  )
  state, n, _, _ = run_synthesis_loop(
    synth,
    key,
    x0,
    targets,
    steps=it.steps,
    log_every=it.steps,
    name="interpolate",
  )
  x = np.asarray(state.x)[:n]
  probs = np.asarray(jax.nn.softmax(clf.apply_fn(clf.params, x), -1))
  out_dir = os.path.join(workdir, "interpolate")
  os.makedirs(out_dir, exist_ok=True)
  viz.strip(
    os.path.join(out_dir, "strip.png"),
    x,
    info,
    titles=[
      f"d={d:.2f} p_b={p:.2f}"
      for d, p in zip(deltas, probs[:, it.class_b], strict=True)
    ],
    title=(
      f"interpolation {info.class_names[it.class_a]} -> "
      f"{info.class_names[it.class_b]}"
    ),
  )
  np.savez(
    os.path.join(out_dir, "interpolate.npz"),
    images=x,
    deltas=deltas,
    targets=targets,
    probs=probs,
    start_index=index,
  )
  results = {
    "deltas": deltas.tolist(),
    "prob_b": probs[:, it.class_b].tolist(),
    "prob_a": probs[:, it.class_a].tolist(),
    "steps": it.steps,
  }
  _mark_done(workdir, "interpolate", digest, results)
  return results


def _runner(stage: str) -> Callable[[ml_collections.ConfigDict, str], dict]:
  """The function running `stage`.

  The stages of later modules import this one for its helpers, so they are
  imported here on demand rather than at module import (no import cycle).
  """
  if stage == "select":
    from dsv_jax import select_stage

    return select_stage.run_select
  if stage == "retrain":
    from dsv_jax import retrain_stage

    return retrain_stage.run_retrain
  if stage == "report":
    from dsv_jax import report

    return report.run_report
  return {
    "train": run_train,
    "synthesize": run_synthesize,
    "edit": run_edit,
    "interpolate": run_interpolate,
  }[stage]


# Checkpoint folders (under ckpt/) of each stage, where not just its name.
_STAGE_CKPTS = {"train": ("train", "train_finish")}


def _clear_checkpoints(workdir: str, stage: str) -> None:
  for name in _STAGE_CKPTS.get(stage, (stage,)):
    shutil.rmtree(os.path.join(workdir, "ckpt", name), ignore_errors=True)


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
      _clear_checkpoints(workdir, name)
    elif record is not None and record["config_hash"] != digest:
      _clear_checkpoints(workdir, name)
    logging.info("Stage %s: starting in %s.", name, workdir)
    out[name] = _runner(name)(config, workdir)
  return out


__all__ = [
  "IMAGE_INITS",
  "INITS",
  "STAGES",
  "Classifier",
  "config_hash",
  "load_classifier",
  "load_data",
  "run",
  "run_edit",
  "run_interpolate",
  "run_synthesis_loop",
  "run_synthesize",
  "run_train",
  "stage_record",
  "synth_kwargs",
  "synthesis_recipe",
  "validate_config",
]
