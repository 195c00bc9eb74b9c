"""A trained classifier as the stages see it: built from its record and
its Orbax arrays (`load_classifier`), or handed over by a `model.source`
(`sources`)."""

from typing import Any, NamedTuple

import jax

from dsv_jax import checkpoints, data, models
from dsv_jax.experiment import workdir as wd
from dsv_jax.types import ApplyFn, Params


def build_model(name: str, kwargs: dict, info: data.DatasetInfo, seed: int):
  """A fresh `models.build_model` for a dataset, keyed by `seed`."""
  return models.build_model(
    name,
    image_shape=info.image_shape,
    num_classes=info.num_classes,
    key=jax.random.key(seed),
    **kwargs,
  )


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
  path = wd.classifier_dir(path)
  meta = checkpoints.load_classifier_meta(path)
  info = data.DatasetInfo.from_dict(meta["dataset"])
  model = build_model(
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


__all__ = ["Classifier", "build_model", "load_classifier"]
