"""dsv_jax.data.imagenet: the class table against the packages that define
the label order, class lookup, and the one ImageNet normalisation."""

import doctest
import importlib.resources
import importlib.util

import numpy as np
import pytest

from dsv_jax.data import imagenet


def test_wordnet_ids_follow_tfds_label_order():
  # TFDS's imagenet2012 builder assigns labels in the order of this file;
  # torchvision's weights use the same (sorted) order.
  tfds_labels = (
    importlib.resources.files("tensorflow_datasets")
    .joinpath("datasets/imagenet2012/labels.txt")
    .read_text()
    .split()
  )
  assert imagenet.wordnet_ids() == tuple(tfds_labels)
  assert list(imagenet.wordnet_ids()) == sorted(tfds_labels)


@pytest.mark.skipif(
  importlib.util.find_spec("torchvision") is None,
  reason="torchvision (the [torch] extra) is not installed",
)
def test_names_are_torchvisions_categories():
  from torchvision.models import _meta

  assert imagenet.class_names() == tuple(_meta._IMAGENET_CATEGORIES)


def test_names_are_unique_and_clean():
  names = imagenet.class_names()
  assert len(set(names)) == imagenet.NUM_CLASSES
  assert all(n == n.strip() and n for n in names)


@pytest.mark.parametrize(
  "spec, index",
  [
    (0, 0),
    ("999", 999),
    (" 114 ", 114),
    ("n01945685", 114),
    ("slug", 114),
    ("Head Cabbage", 936),
    ("n01440764", 0),
  ],
)
def test_class_index(spec, index):
  assert imagenet.class_index(spec) == index


def test_class_index_round_trips_every_class():
  for i, (wnid, name) in enumerate(
    zip(imagenet.wordnet_ids(), imagenet.class_names(), strict=True)
  ):
    assert imagenet.class_index(wnid) == i
    assert imagenet.class_index(name) == i


@pytest.mark.parametrize(
  "spec, message",
  [
    (1000, "out of range"),
    ("-1", "neither"),
    ("n99999999", "neither"),
    ("cabbag", "head cabbage"),
    (True, "not an index"),
    ("CARDIGAN", "ambiguous: 'Cardigan' \\(264\\), 'cardigan' \\(474\\)"),
  ],
)
def test_class_index_errors_name_the_problem(spec, message):
  with pytest.raises(ValueError, match=message):
    imagenet.class_index(spec)


def test_imagenet_info_normalisation():
  info = imagenet.imagenet_info(64)
  assert info.image_shape == (64, 64, 3)
  assert info.num_classes == 1000 and info.name == "imagenet2012"
  np.testing.assert_allclose(
    info.pixel_min, -np.array(imagenet.MEAN) / np.array(imagenet.STD)
  )
  np.testing.assert_allclose(
    info.pixel_max,
    (1 - np.array(imagenet.MEAN)) / np.array(imagenet.STD),
    rtol=1e-6,
  )
  raw = np.random.default_rng(0).uniform(size=(2, 4, 4, 3))
  np.testing.assert_allclose(
    info.denormalize(info.normalize(raw)), raw, atol=1e-6
  )
  with pytest.raises(ValueError, match="image_size"):
    imagenet.imagenet_info(0)


def test_doctests():
  result = doctest.testmod(imagenet, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 2 and result.failed == 0
