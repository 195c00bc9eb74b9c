"""Where a stage's classifier comes from: `config.model.source`.

* ``train`` (the default): the classifier the `train` stage wrote in the
  workdir.
* ``torchvision:<name>[:<weights>]``: torchvision's pretrained ImageNet
  model (`dsv_jax.pretrained`; ``resnet50``, weights ``IMAGENET1K_V1`` by
  default), downloaded and converted once into
  ``model.source_cache_dir`` (default ``~/.cache/dsv_jax/pretrained``).
* ``<module>:<function>``: any importable factory; ``function()`` returns
  ``(apply_fn, params, info)``, with ``apply_fn(params, x[B, H, W, C]) ->
  logits[B, C]`` in evaluation mode and ``info`` a `data.DatasetInfo` of
  the normalised images it takes (your own Flax NNX or Linen model and its
  Orbax or msgpack checkpoint, loaded however you load it). A fourth
  element, ``features_fn(params, x) -> [B, F]``, is optional: the
  classical judges then also measure nearest-real distances in that space.

A path in ``synth.classifier`` / ``select.classifier`` still overrides the
source for its stage. Every stage after `train` runs on any source; stages
that need the training data (select, retrain) skip with one line when it
is not on this machine, and the report's experiments, which retrain and
compare classifiers of the config's own recipe, run only on a trained one.
"""

import dataclasses
import importlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from dsv_jax import data, models, pretrained
from dsv_jax.experiment import classifiers
from dsv_jax.experiment import workdir as wd

TRAIN = "train"
TORCHVISION = "torchvision"

# Resolved external classifiers of this process, by source and cache dir:
# every stage (and every stage hash) of a run asks for the same one.
_RESOLVED: dict[tuple[str, str], tuple[classifiers.Classifier, str]] = {}


def parse(source: str) -> tuple[str, str, str]:
  """``(kind, name, detail)`` of a `model.source` value.

  ``("train", "", "")``, ``("torchvision", name, weights)`` or
  ``("factory", module, function)``.

  Raises:
    ValueError: a value of none of these forms, naming the config key.
  """
  source = source.strip()
  if source == TRAIN:
    return TRAIN, "", ""
  head, sep, rest = source.partition(":")
  if head == TORCHVISION:
    name, _, weights = rest.partition(":")
    if name not in pretrained.TORCHVISION_MODELS:
      known = [f"{TORCHVISION}:{m}" for m in pretrained.TORCHVISION_MODELS]
      raise ValueError(
        f"Config key model.source: {source!r} names no torchvision model "
        f"dsv_jax converts; known: {', '.join(known)}."
      )
    return TORCHVISION, name, weights or pretrained.DEFAULT_WEIGHTS
  if sep and head and rest and ":" not in rest:
    return "factory", head, rest
  raise ValueError(
    f"Config key model.source: {source!r} is not 'train', "
    "'torchvision:<model>[:<weights>]' or '<module>:<function>'."
  )


def is_external(config: ml_collections.ConfigDict) -> bool:
  """Whether the classifier comes from elsewhere than the train stage."""
  return parse(config.model.source)[0] != TRAIN


def _from_factory(module: str, function: str, source: str):
  try:
    fn = getattr(importlib.import_module(module), function)
  except (ImportError, AttributeError) as e:
    raise ValueError(
      f"Config key model.source: cannot load {source!r} ({e})."
    ) from e
  out = fn()
  if not isinstance(out, tuple) or len(out) not in (3, 4):
    raise ValueError(
      f"model.source {source!r} returned {type(out).__name__}; expected "
      "(apply_fn, params, info[, features_fn])."
    )
  apply_fn, params, info = out[:3]
  features_fn = out[3] if len(out) == 4 else None
  if not isinstance(info, data.DatasetInfo):
    raise ValueError(
      f"model.source {source!r}: its third value is a "
      f"{type(info).__name__}, not a dsv_jax.data.DatasetInfo."
    )
  probe = jax.eval_shape(
    apply_fn, params, jax.ShapeDtypeStruct((2, *info.image_shape), np.float32)
  )
  if probe.shape != (2, info.num_classes):
    raise ValueError(
      f"model.source {source!r}: apply_fn maps images "
      f"{(2, *info.image_shape)} to {probe.shape}, not the "
      f"(2, {info.num_classes}) logits its info promises."
    )
  # The package's stages see a FunctionalModel: evaluation only.
  fm = models.FunctionalModel(
    params=params,
    state={},
    train_apply=None,
    eval_apply=lambda p, s, x: apply_fn(p, x),
    eval_features=(
      None if features_fn is None else (lambda p, s, x: features_fn(p, x))
    ),
  )
  clf = classifiers.Classifier(apply_fn, params, fm, info, {"source": source})
  return clf, wd.array_digest(*jax.tree.leaves(params), extra=source)


def external_classifier(
  config: ml_collections.ConfigDict,
) -> tuple[classifiers.Classifier, str]:
  """``(classifier, digest)`` of an external `model.source`, once per
  process (a torchvision model is converted on first use)."""
  source = config.model.source.strip()
  cache_dir = config.model.source_cache_dir or None
  key = (source, cache_dir or "")
  if key not in _RESOLVED:
    kind, name, detail = parse(source)
    if kind == TORCHVISION:
      logging.info("Classifier: torchvision %s (%s weights).", name, detail)
      path = pretrained.ensure_cached(name, weights=detail, cache_dir=cache_dir)
      clf = classifiers.load_classifier(path)
      _RESOLVED[key] = clf, wd.classifier_digest(path)
    elif kind == "factory":
      logging.info("Classifier: %s().", source)
      _RESOLVED[key] = _from_factory(name, detail, source)
    else:
      raise ValueError("model.source 'train' is not external.")
  return _RESOLVED[key]


def _at_size(
  clf: classifiers.Classifier, config: ml_collections.ConfigDict
) -> classifiers.Classifier:
  # synth.image_size: synthesise at another resolution than the classifier
  # was trained at (a globally pooled network takes any).
  size = config.synth.image_size
  if not size or clf.info.image_shape[:2] == (size, size):
    return clf
  shape = (size, size, clf.info.image_shape[2])
  return clf._replace(info=dataclasses.replace(clf.info, image_shape=shape))


def classifier_for(
  config: ml_collections.ConfigDict, workdir: str, section: str = "synth"
) -> classifiers.Classifier:
  """The classifier a stage inverts or explains: the path in
  ``config.<section>.classifier``, else ``model.source``, else the
  workdir's own."""
  if config[section].classifier:
    clf = classifiers.load_classifier(config[section].classifier)
  elif is_external(config):
    clf = external_classifier(config)[0]
  else:
    clf = classifiers.load_classifier(workdir)
  return _at_size(clf, config) if section == "synth" else clf


def classifier_digest(
  config: ml_collections.ConfigDict, workdir: str, section: str = "synth"
) -> str | None:
  """The content digest of `classifier_for`'s classifier (None: the
  workdir has none yet)."""
  if config[section].classifier:
    return wd.classifier_digest(config[section].classifier)
  if is_external(config):
    return external_classifier(config)[1]
  return wd.classifier_digest(workdir)


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the train stage records for an external source."""
  return {"source": config.model.source, "trained": False}


__all__ = [
  "TORCHVISION",
  "TRAIN",
  "classifier_digest",
  "classifier_for",
  "describe",
  "external_classifier",
  "is_external",
  "parse",
]
