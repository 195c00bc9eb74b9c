"""What the stages share: config checks, data, the classifier, synthesis
settings and candidates, the classical judges and the DSV-set writer.

No stage logic and no workdir bookkeeping live here (`workdir`); each
stage is its own module under `stages/`.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from dsv_jax import (
  artifacts,
  augment,
  coreset,
  data,
  judges,
  models,
  parallel,
  synthesize,
  train,
)
from dsv_jax.data import imagenet
from dsv_jax.experiment import sources, synthesis_loop
from dsv_jax.experiment import workdir as wd
from dsv_jax.experiment.classifiers import (
  Classifier,
  build_model,
  load_classifier,
)

INITS = ("noise", "real", "other")
IMAGE_INITS = ("real", "other")
NORM_CENTERS = ("mean", "min")
OPTIMIZERS = ("adam", "sgd")


def synthesis_recipe(
  config: ml_collections.ConfigDict, init: str | None = None
) -> ml_collections.ConfigDict:
  """The config a synthesis from `init` (default `synth.init`) runs with.

  Each init kind runs its own recipe:
  - ``noise``: `synth.steps` at `synth.lr_x` with the priors `kkt.beta_tv`
    and `kkt.beta_norm`;
  - ``real`` (k-shot; editing and interpolation start from real images
    too): `synth.image_steps` at `synth.image_lr_x` (0: the noise values),
    without the priors unless `synth.image_priors`;
  - ``other`` (0-shot, images of another data set): `synth.other_steps` at
    `synth.other_lr_x` (0: the ``real`` recipe's values), with the priors
    only if `synth.other_priors`. An image of another data set has to
    travel as far as noise does, so it is tuned on its own.

  The copy returned has the effective values in `synth.steps`,
  `synth.lr_x`, `kkt.beta_tv` and `kkt.beta_norm`, and the per-init keys
  at their neutral values, so a synthesis's hash depends only on the
  recipe it runs.
  """
  init = init or config.synth.init
  out = ml_collections.ConfigDict(config.to_dict())
  sy = out.synth
  if init in IMAGE_INITS:
    steps = sy.image_steps or sy.steps
    lr_x = sy.image_lr_x or sy.lr_x
    priors = sy.image_priors
    if init == "other":
      steps = sy.other_steps or steps
      lr_x = sy.other_lr_x or lr_x
      priors = sy.other_priors
    sy.steps, sy.lr_x = steps, lr_x
    if not priors:
      out.kkt.beta_tv = 0.0
      out.kkt.beta_norm = 0.0
  sy.image_steps, sy.image_lr_x, sy.image_priors = 0, 0.0, True
  sy.other_steps, sy.other_lr_x, sy.other_priors = 0, 0.0, False
  return out


def synthesis_hash(
  config: ml_collections.ConfigDict,
  workdir: str,
  sections: tuple[str, ...],
  init: str | None = None,
  inputs: dict[str, str | None] | None = None,
) -> str:
  """The hash of a synthesis-like stage from `init`: `sections` under the
  recipe it runs (`synthesis_recipe`), the classifier it inverts and any
  other `inputs` digests."""
  return wd.config_hash(
    synthesis_recipe(config, init),
    sections,
    {
      "classifier": sources.classifier_digest(config, workdir),
      **(inputs or {}),
    },
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the key, on config values no stage could run with."""

  def need(cond: bool, key: str, msg: str) -> None:
    if not cond:
      raise ValueError(f"Config key {key}: {msg}")

  for section in ("data", "model", "train"):
    need(section in config, section, "missing section.")
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
  need(config.data.image_size >= 0, "data.image_size", "must be >= 0.")
  sources.parse(config.model.source)  # Raises, naming the key.
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
    for key in ("ckpt_every", "num_devices", "image_size"):
      need(sy[key] >= 0, f"synth.{key}", "must be >= 0.")
    for key in ("lowres_size", "lowres_steps"):
      need(sy[key] >= 0, f"synth.{key}", "must be >= 0 (0: off).")
    need(
      (sy.lowres_size > 0) == (sy.lowres_steps > 0),
      "synth.lowres_steps",
      "synth.lowres_size and synth.lowres_steps are set together.",
    )
    for key in ("lr_x", "lr_lambda"):
      need(sy[key] > 0, f"synth.{key}", "must be > 0.")
    for key in ("image_steps", "image_lr_x"):
      need(sy[key] >= 0, f"synth.{key}", f"must be >= 0 (0: synth.{key[6:]}).")
    for key in ("other_steps", "other_lr_x"):
      need(
        sy[key] >= 0,
        f"synth.{key}",
        f"must be >= 0 (0: synth.image_{key[6:]}).",
      )
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
    # Only ImageNet's images are resized on reading.
    **(
      {"image_size": config.data.image_size} if config.data.image_size else {}
    ),
  )


def _data_key(config: ml_collections.ConfigDict) -> str:
  # What `load_data` depends on: per-process caches of data are keyed so.
  return json.dumps(
    {"data": config.data.to_dict(), "seed": config.seed},
    sort_keys=True,
    default=str,
  )


def try_load_data(config: ml_collections.ConfigDict) -> data.Dataset | None:
  """`load_data`, or None (logged once) when the data is not on this
  machine: a classifier from elsewhere (`model.source`) may come without
  its training set."""
  key = _data_key(config)
  if key not in _TRIED_DATA:
    # One entry: stage hashes and runs of one config ask repeatedly.
    _TRIED_DATA.clear()
    try:
      _TRIED_DATA[key] = load_data(config)
    except FileNotFoundError as e:
      logging.info("No %s data here: %s", config.data.name, e)
      _TRIED_DATA[key] = None
  return _TRIED_DATA[key]


_TRIED_DATA: dict[str, data.Dataset | None] = {}


def skipped(stage: str, reason: str) -> dict[str, str]:
  """The results of a stage that cannot run here, logged in one line."""
  logging.warning("Stage %s skipped: %s", stage, reason)
  return {"skipped": reason}


def resolve_classes(spec: str, info: data.DatasetInfo, key: str) -> np.ndarray:
  """int32 class indices of a comma-separated list of indices or names.

  ImageNet classes are also named by WordNet id, and by name ignoring case
  where that is unambiguous (`data.imagenet.class_index`); other datasets
  by index or exact class name. "" means every class.

  Raises:
    ValueError: an unknown class, naming the config `key`.
  """
  items = [t.strip() for t in spec.split(",") if t.strip()]
  if not items:
    return np.arange(info.num_classes, dtype=np.int32)
  out = []
  for item in items:
    try:
      if info.name == imagenet.NAME:
        out.append(imagenet.class_index(item))
      elif item.isdigit() and int(item) < info.num_classes:
        out.append(int(item))
      elif item in info.class_names:
        out.append(info.class_names.index(item))
      else:
        raise ValueError(
          f"{item!r} is no class index in [0, {info.num_classes}) or name "
          f"of {info.name} (e.g. {info.class_names[:3]})"
        )
    except ValueError as e:
      raise ValueError(f"Config key {key}: {e}") from e
  return np.asarray(out, np.int32)


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Constructor arguments of `config.model` for `models.build_model`."""
  m = config.model
  if m.name == "convnet":
    return {"width": m.width, "depth": m.depth, "norm": m.norm, "pool": m.pool}
  if m.name == "resnet18":
    return {"width": m.width, "norm": m.norm}
  if m.name == "resnet50":  # torchvision's fixed architecture.
    return {}
  return {"hidden": (m.width,) * m.depth}


def classifier_for(
  config: ml_collections.ConfigDict, workdir: str, section: str = "synth"
) -> Classifier:
  """The classifier a stage inverts or explains (`sources.classifier_for`:
  `config.<section>.classifier`, `model.source`, or the workdir's own)."""
  return sources.classifier_for(config, workdir, section)


def optimizer(name: str, lr: float) -> optax.GradientTransformation:
  return optax.adam(lr) if name == "adam" else optax.sgd(lr)


def synth_kwargs(
  config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> dict[str, Any]:
  """Keyword arguments of `synthesize.make_synthesizer` from a config."""
  sy, k = config.synth, config.kkt
  return {
    "x_tx": optimizer(sy.optimizer, sy.lr_x),
    "lambda_tx": optimizer(sy.optimizer, sy.lr_lambda),
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


def synthesis_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The synthesize stage's key: its candidates, and every run that must
  start from the same candidates (the KKT baseline, the sweeps)."""
  return jax.random.fold_in(jax.random.key(config.seed), 3)


def initial_candidates(config, clf, key):
  """(x0, targets, source, source_index) of the synthesize stage."""
  sy, info = config.synth, clf.info
  c = info.num_classes
  labels = np.repeat(
    resolve_classes(sy.classes, info, "synth.classes"), sy.num_per_class
  )
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


def start_images(config, workdir, labels, key):
  """``(images, source_index, start)``: one starting image per label.

  Real training images drawn with `key` (``start == "real"``) where the
  data is here; otherwise (a classifier from elsewhere without its data)
  DSVs of those classes from the workdir's synthesize stage (``"dsv"``,
  `source_index` their row there).

  Raises:
    FileNotFoundError: neither is available (the message says what to run).
  """
  ds = try_load_data(config)
  if ds is not None:
    return (*synthesize.real_init(key, ds.train, labels), "real")
  path = os.path.join(workdir, "synthesize")
  if not epath.Path(path, artifacts.NPZ).exists():
    raise FileNotFoundError(
      f"No {config.data.name} images here to start from, and no DSVs in "
      f"{path}: run --stage=synthesize first (it needs no data)."
    )
  dsv, _ = artifacts.load_dsv(path)
  dsv_labels = np.asarray(synthesize.target_labels(dsv.targets))
  index = []
  for c in np.asarray(labels):
    rows = np.flatnonzero((dsv_labels == c) & dsv.active)
    if not len(rows):
      raise FileNotFoundError(
        f"The synthesize stage's DSVs in {path} have no surviving one of "
        f"class {int(c)} to start from: add it to synth.classes, or pick a "
        "class they have."
      )
    index.append(rows[0])
  index = np.asarray(index, np.int32)
  return np.asarray(dsv.images[index], np.float32), index, "dsv"


def start_digest(config, workdir) -> dict[str, str | None]:
  """Hash inputs of `start_images`: none when it draws real images (as
  before there was a fallback), the synthesize record when it starts from
  those DSVs."""
  if try_load_data(config) is not None:
    return {}
  return {"start": "dsv", "synthesize": wd.record_digest(workdir, "synthesize")}


def start_synthesis_hash(config, workdir, sections: tuple[str, ...]) -> str:
  """The hash of a stage that optimises `start_images` (edit, interpolate):
  its `sections` under the image recipe, the classifier, and the DSVs it
  starts from where there is no data (`start_digest`)."""
  return synthesis_hash(
    config, workdir, sections, "real", start_digest(config, workdir)
  )


def synthesize_from(config, clf, key, x0, targets, *, steps: int, name: str):
  """`x0` optimised towards `targets` for `steps` steps of the config's
  synthesis (`synth_kwargs`): the edit and interpolate stages' run.

  Short enough to need no checkpoint; logged once, at the last step, as
  `name`. Returns the images as numpy, gathered whole on every process
  (the candidates are sharded over every process's devices).
  """
  synth = synthesize.make_synthesizer(
    clf.apply_fn, **synth_kwargs(config, clf.info)
  )
  state, n, _, _ = synthesis_loop.run_synthesis_loop(
    synth,
    clf.params,
    key,
    x0,
    targets,
    steps=steps,
    log_every=steps,
    name=name,
  )
  return parallel.to_host(state.x)[:n]


# Classical judges fitted per training split (data config and seed name
# it): a report fits them once, not once per synthesis sub-run (25 s each
# on Fashion-MNIST, 2 cores).
_CLASSICAL_JUDGES: dict[str, dict[str, Any]] = {}


def classical_judges(
  config: ml_collections.ConfigDict, ds: data.Dataset
) -> dict[str, Any]:
  """`judges.fit_classical` on `ds` (= `load_data(config)`), cached."""
  key = _data_key(config)
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
  ds = try_load_data(config)
  if ds is None:
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
    features_fn=None
    if fm.eval_features is None
    else lambda xs: coreset.features_of(
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


__all__ = [
  "IMAGE_INITS",
  "INITS",
  "NORM_CENTERS",
  "OPTIMIZERS",
  "Classifier",
  "build_model",
  "classical_judges",
  "classifier_for",
  "initial_candidates",
  "judge_dsvs",
  "load_classifier",
  "load_data",
  "model_kwargs",
  "optimizer",
  "resolve_classes",
  "skipped",
  "start_digest",
  "start_images",
  "start_synthesis_hash",
  "synthesize_from",
  "try_load_data",
  "save_described_dsv",
  "synth_kwargs",
  "synthesis_hash",
  "synthesis_key",
  "synthesis_recipe",
  "validate_config",
]
