"""Bring-your-own classifiers for `config.model.source` tests.

Each factory returns what a user's would: ``(apply_fn, params, info)``
(optionally a features function), here from a small Flax NNX model with a
fixed seed instead of a checkpoint. Tests import them as
``byo_classifier:<function>`` (pytest puts tests/ on sys.path).
"""

import jax
from flax import nnx

from dsv_jax import data


class _Net(nnx.Module):
  """Conv -> ReLU -> global average pool -> linear: any image size."""

  def __init__(self, channels: int, classes: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, classes, rngs=rngs)

  def features(self, x):
    return jax.nn.relu(self.conv(x)).mean(axis=(1, 2))

  def __call__(self, x):
    return self.head(self.features(x))


def _split(info: data.DatasetInfo):
  net = _Net(info.image_shape[2], info.num_classes, rngs=nnx.Rngs(0))
  graph, params = nnx.split(net)

  def apply_fn(p, x):
    return nnx.merge(graph, p)(x)

  def features_fn(p, x):
    return nnx.merge(graph, p).features(x)

  return apply_fn, params, features_fn


# A classifier whose training data is not on the machine (like a
# pretrained ImageNet model): 10 classes of 8x8 RGB images.
OFFLINE_INFO = data.DatasetInfo(
  name="cifar10",
  num_classes=10,
  class_names=tuple(f"class{i}" for i in range(10)),
  image_shape=(8, 8, 3),
  mean=(0.5, 0.5, 0.5),
  std=(0.25, 0.25, 0.25),
  source="tfds",
)


def offline_classifier():
  apply_fn, params, _ = _split(OFFLINE_INFO)
  return apply_fn, params, OFFLINE_INFO


def digits_classifier():
  """A classifier of the bundled digits (the data is here), with features."""
  info = data.load_dataset("digits").info
  apply_fn, params, features_fn = _split(info)
  return apply_fn, params, info, features_fn


def not_a_tuple():
  return "apply_fn"


def wrong_logits():
  apply_fn, params, _ = _split(OFFLINE_INFO)
  return (lambda p, x: apply_fn(p, x)[:, :3]), params, OFFLINE_INFO
