"""The `retrain` stage: fresh models trained on DSV sets and on random images.

For every DSV set in the workdir -- the synthesized one (`synthesize/`,
required) and the selected one (`select/`, when that stage ran) -- K fresh
models of the classifier's architecture are trained on the set's active
rows, and K more on random real training images with the same number of
images per class (the paper's "random" baseline, Tables 1-2). Every row uses
the same recipe (`config.retrain`), the same K initialisation seeds and the
same evaluation split, so rows differ only in their training images.

Outputs: `workdir/retrain/results.json` and the stage record. Importable:
`retrain_sets(config, clf, ds, sets)` retrains any named sets (used by the
report for its own rows). Every row records its `row_key`, so the report
reuses the rows it would otherwise train again (the DSV and selected sets).
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dsv_jax import artifacts, checkpoints, data, models, retrain, synthesize
from dsv_jax.experiment import common, sources, stages
from dsv_jax.experiment import workdir as wd

NAME = "retrain"
SECTIONS = ("seed", "data", "model", "train", "retrain")
UPSTREAM = ("train", "synthesize", "select")
CKPT_DIRS = ()
# What a finished stage leaves (`workdir.output_problem`).
OUTPUTS = ("retrain/results.json",)

EVAL_SPLITS = ("validation", "test")
# DSV sets the stage retrains on, by output folder; only `synthesize` is
# required (the select stage may not have run).
SET_DIRS = (("dsv", "synthesize"), ("select", "select"))


def validate_retrain_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the key, on `config.retrain` values that cannot run."""
  r = config.retrain
  for key in ("num_models", "steps", "batch_size", "log_every"):
    if r[key] < 1:
      raise ValueError(f"Config key retrain.{key}: must be >= 1.")
  if r.learning_rate <= 0:
    raise ValueError("Config key retrain.learning_rate: must be > 0.")
  if r.weight_decay < 0 or r.max_shift < 0:
    raise ValueError(
      "Config keys retrain.weight_decay and retrain.max_shift: must be >= 0."
    )
  if r.eval_split not in EVAL_SPLITS:
    raise ValueError(
      f"Config key retrain.eval_split: {r.eval_split!r} is not one of "
      f"{EVAL_SPLITS}."
    )
  if r.vectorize not in retrain.VECTORIZE:
    raise ValueError(
      f"Config key retrain.vectorize: {r.vectorize!r} is not one of "
      f"{retrain.VECTORIZE}."
    )


def model_fn_of(
  clf: common.Classifier, config: ml_collections.ConfigDict | None = None
) -> retrain.ModelFn:
  """``seed -> FunctionalModel``: fresh models of `clf`'s architecture, or
  of `config.model` for a classifier from a factory (`model.source`),
  whose architecture dsv_jax does not know."""
  if "model" in clf.meta:
    name, kwargs = clf.meta["model"]["name"], clf.meta["model"]["kwargs"]
  elif config is not None:
    name, kwargs = config.model.name, common.model_kwargs(config)
  else:
    raise ValueError(
      f"The classifier from {clf.meta.get('source')!r} records no "
      "architecture to retrain; pass the config naming one (model.name)."
    )

  def model_fn(seed: int) -> models.FunctionalModel:
    return models.functional(common.build_model(name, kwargs, clf.info, seed))

  return model_fn


def row_key(
  config: ml_collections.ConfigDict,
  images: np.ndarray,
  targets: np.ndarray,
  eval_split: str | None = None,
) -> str:
  """Digest of a retraining row: its images, targets, the model and data it
  trains and evaluates, its recipe and seed.

  Two rows with the same key train the same models on the same data and
  evaluate them on the same split (`eval_split`, default
  `retrain.eval_split`): one result serves both.
  """
  recipe = config.retrain.to_dict()
  recipe["eval_split"] = eval_split or recipe["eval_split"]
  return wd.array_digest(
    images,
    targets,
    extra={
      "recipe": recipe,
      "seed": config.seed,
      "model": config.model.to_dict(),
      "data": config.data.to_dict(),
    },
  )


def set_rows(
  dsv: artifacts.DSVSet, *, soft: bool
) -> tuple[np.ndarray, np.ndarray]:
  """``(images, targets)`` of the active rows of a DSV set.

  Targets are int labels (argmax of soft targets) unless `soft` is True and
  the set's targets are soft.
  """
  active = np.asarray(dsv.active, bool)
  if not active.any():
    raise ValueError("The DSV set has no active rows to retrain on.")
  targets = np.asarray(dsv.targets)[active]
  if targets.ndim == 2 and not soft:
    targets = np.argmax(targets, axis=-1).astype(np.int32)
  return np.asarray(dsv.images)[active], targets


def random_like(
  key: jax.Array, train_split: dict, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Random real training images with the per-class counts of `labels`."""
  labels = np.sort(np.asarray(labels, np.int32))
  images, _ = synthesize.real_init(key, train_split, labels)
  return images, labels


def retrain_sets(
  config: ml_collections.ConfigDict,
  clf: common.Classifier,
  ds: data.Dataset,
  sets: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, dict[str, Any]]:
  """Retrains on each named ``(images, targets)`` set with `config.retrain`.

  A set may also be K per-model sets (``images [K, N, H, W, C]``, targets
  ``[K, N]``, K = ``retrain.num_models``): model k trains on set k with the
  same seeds as every other row (e.g. K random draws).

  Returns:
    ``{name: row}``, each row with the per-model accuracies on
    ``config.retrain.eval_split``, their mean and std, images per class and
    wall time.
  """
  r = config.retrain
  split = ds.split(r.eval_split)
  model_fn = model_fn_of(clf, config)
  rows = {}
  for name, (images, targets) in sets.items():
    per_model = np.ndim(images) == 5
    labels = np.asarray(
      synthesize.target_labels(targets[0] if per_model else targets)
    )
    logging.info(
      "Retraining %d models on %s (%d images).", r.num_models, name, len(labels)
    )
    res = retrain.retrain(
      model_fn,
      images,
      targets,
      split["image"],
      split["label"],
      num_models=r.num_models,
      steps=r.steps,
      learning_rate=r.learning_rate,
      batch_size=r.batch_size,
      weight_decay=r.weight_decay,
      flip=r.flip,
      max_shift=r.max_shift,
      seed=config.seed + r.seed_offset,
      vectorize=r.vectorize,
      log_every=r.log_every,
    )
    rows[name] = {
      "num_images": int(len(labels)),
      "per_class": np.bincount(labels, minlength=clf.info.num_classes).tolist(),
      "targets": "soft" if np.ndim(targets) == 2 + per_model else "hard",
      "per_model_sets": bool(per_model),
      "accuracies": res.accuracies.tolist(),
      "mean": res.mean,
      "std": res.std,
      "final_loss_mean": float(res.final_losses.mean()),
      "time_s": res.time_s,
    }
    logging.info(
      "Retrained on %s: %s accuracy %.4f +- %.4f.",
      name,
      r.eval_split,
      res.mean,
      res.std,
    )
  return rows


def stage_hash(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The hash the stage records: the retraining recipe and the sets it
  retrains on (the synthesize and select records, the classifier)."""
  return wd.config_hash(
    config,
    SECTIONS,
    {
      "classifier": sources.classifier_digest(config, workdir),
      "synthesize": wd.record_digest(workdir, "synthesize"),
      "select": wd.record_digest(workdir, "select"),
    },
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Retrains on the workdir's DSV sets and on random real images.

  Rows: ``dsv`` (synthesize/), ``select`` (select/, if present), and for
  each ``random_<name>``: random training images with the same per-class
  counts (drawn with a fixed key from ``config.seed``).

  Returns:
    A flat summary ``{"eval_split", "steps", "<row>_mean", "<row>_std"}``;
    the full record ``{"eval_split", "recipe", "rows": {name: row}}`` (see
    `retrain_sets`) goes to ``workdir/retrain/results.json``.
  """
  common.validate_config(config)
  validate_retrain_config(config)
  workdir = checkpoints.abspath(workdir)
  digest = stage_hash(config, workdir)
  r = config.retrain
  ds = common.try_load_data(config)
  if ds is None:
    return common.skipped(
      NAME, f"retraining needs the {config.data.name} data, not here."
    )
  clf = common.classifier_for(config, workdir)
  key = jax.random.fold_in(jax.random.key(config.seed), 6)
  sets, sources = {}, {}
  for i, (name, sub) in enumerate(SET_DIRS):
    path = os.path.join(workdir, sub)
    if name != "dsv" and not epath.Path(path, artifacts.NPZ).exists():
      continue
    dsv, _ = artifacts.load_dsv(path)
    images, targets = set_rows(dsv, soft=r.soft_targets)
    labels = np.asarray(synthesize.target_labels(targets))
    sets[name] = (images, targets)
    sets[f"random_{name}"] = random_like(
      jax.random.fold_in(key, i), ds.train, labels
    )
    sources[name] = path
  rows = retrain_sets(config, clf, ds, sets)
  for name, (images, targets) in sets.items():
    rows[name]["key"] = row_key(config, images, targets)
  for name, path in sources.items():
    rows[name]["source_dir"] = path
  results = {
    "eval_split": r.eval_split,
    "recipe": {
      k: r[k]
      for k in (
        "num_models",
        "steps",
        "learning_rate",
        "batch_size",
        "weight_decay",
        "flip",
        "max_shift",
      )
    }
    | {"seed": config.seed + r.seed_offset},
    "rows": rows,
  }
  out_dir = os.path.join(workdir, "retrain")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  # Process 0 alone writes it (`write_json`).
  wd.write_json(
    os.path.join(out_dir, "results.json"), results, indent=2, sort_keys=True
  )
  summary = {"eval_split": r.eval_split, "steps": r.steps}
  for name, row in rows.items():
    summary[f"{name}_mean"] = row["mean"]
    summary[f"{name}_std"] = row["std"]
  wd.mark_done(workdir, "retrain", digest, summary)
  return summary


__all__ = [
  *stages.FACE,
  "EVAL_SPLITS",
  "model_fn_of",
  "random_like",
  "retrain_sets",
  "row_key",
  "set_rows",
  "validate_retrain_config",
]
