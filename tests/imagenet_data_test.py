"""`data.load_dataset("imagenet2012")` and `imagenet.eval_transform`, offline.

TFDS is mocked with `tfds.testing.mock_data` and `MockPolicy.USE_CODE`:
for imagenet2012 it needs no manual tar files and serves records whose
images are random uint8 RGB of random sizes (5 to 49 pixels a side), so the
variable-size path is exercised. Each mocked split is its own deterministic
generator; the fixture records which keys of which generator are decoded.
"""

import importlib.util
import os

import numpy as np
import pytest

from dsv_jax import data
from dsv_jax.data import imagenet, loading

SIZE = 16  # Small crops keep the test fast; the transform is size-generic.
NUM_RECORDS = 40  # Per mocked split.


@pytest.fixture
def decoded(monkeypatch):
  """Mocks TFDS; yields a list of (generator id, key, record) per decode."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  log = []

  # As in tests/data_test.py: tfds 4.9.10's mock calls `__getitems__`
  # without `self`; accept either form. Also logs every decoded record.
  def getitems(*args, generator, serialized=False):
    assert not serialized
    records = [generator[key] for key in args[-1]]
    log.extend(
      (id(generator), int(k), r) for k, r in zip(args[-1], records, strict=True)
    )
    return records

  def getitem(*args, generator, serialized=False):
    return getitems([args[-1]], generator=generator, serialized=serialized)[0]

  monkeypatch.setattr(mocking, "_getitems", getitems)
  monkeypatch.setattr(mocking, "_getitem", getitem)
  with tfds.testing.mock_data(
    num_examples=NUM_RECORDS, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    yield log


def _load(tmp_path, **kwargs):
  args = dict(
    data_dir=str(tmp_path),
    max_train=6,
    max_validation=3,
    max_test=4,
    seed=0,
    image_size=SIZE,
  )
  return data.load_dataset("imagenet2012", **{**args, **kwargs})


def test_shapes_dtypes_info_and_normalisation(decoded, tmp_path):
  ds = _load(tmp_path)
  assert ds.info == imagenet.imagenet_info(SIZE)
  assert ds.info.class_names[0] == "tench"
  for name, size in {"train": 6, "validation": 3, "test": 4}.items():
    split = ds.split(name)
    assert split["image"].shape == (size, SIZE, SIZE, 3)
    assert split["image"].dtype == np.float32
    assert split["label"].shape == (size,) and split["label"].dtype == np.int32
  # Each image is exactly the transform of its record, normalised with
  # ImageNet's fixed statistics: recompute from the logged records, which
  # come in split order (train, validation, test), each sorted by key.
  records = [r for _, _, r in decoded]
  assert len(records) == 13
  expected = np.stack(
    [imagenet.eval_transform(r["image"], SIZE) for r in records]
  )
  expected = (expected / 255 - np.array(imagenet.MEAN)) / imagenet.STD
  got = np.concatenate([ds.split(n)["image"] for n in data.SPLITS])
  np.testing.assert_allclose(got, expected, atol=1e-5)
  labels = np.concatenate([ds.split(n)["label"] for n in data.SPLITS])
  np.testing.assert_array_equal(labels, [r["label"] for r in records])


def test_only_the_drawn_records_are_decoded(decoded, tmp_path):
  _load(tmp_path, max_train=5, max_validation=2, max_test=3)
  by_source = {}
  for source, key, _ in decoded:
    by_source.setdefault(source, []).append(key)
  # TFDS train (our train + validation) and TFDS validation (our test).
  train_keys, test_keys = by_source.values()
  assert len(train_keys) == 7 and len(set(train_keys)) == 7  # Disjoint.
  assert len(test_keys) == 3 and len(set(test_keys)) == 3


def test_record_draw_is_seeded_and_validation_pool_fixed():
  def draw(seed, split_seed=data.SPLIT_SEED, validation=50):
    sizes = {"train": 200, "validation": validation, "test": 30}
    return loading._imagenet_indices(
      10_000,
      500,
      sizes=sizes,
      validation_fraction=0.1,
      split_seed=split_seed,
      seed=seed,
    )

  a, b = draw(0), draw(0)
  for split in data.SPLITS:
    np.testing.assert_array_equal(a[split], b[split])
    assert np.all(np.diff(a[split]) > 0)  # Sorted, no repeats.
  assert not np.intersect1d(a["train"], a["validation"]).size
  assert a["test"].max() < 500 and len(a["test"]) == 30
  # Another seed draws other records, from the same validation pool.
  pool = np.random.default_rng(data.SPLIT_SEED).permutation(10_000)[:1000]
  for seed in range(5):
    other = draw(seed + 1)
    assert not np.array_equal(other["train"], a["train"])
    assert np.isin(other["validation"], pool).all()
    assert not np.isin(other["train"], pool).any()
  # The validation size does not change the train records.
  np.testing.assert_array_equal(draw(0, validation=7)["train"], a["train"])
  assert not np.isin(draw(0, split_seed=1)["validation"], pool).all()


def test_same_seed_same_data_other_seed_other_data(decoded, tmp_path):
  del decoded
  first, again = _load(tmp_path), _load(tmp_path)
  other = _load(tmp_path, seed=1)
  for split in data.SPLITS:
    np.testing.assert_array_equal(
      first.split(split)["image"], again.split(split)["image"]
    )
  assert not np.array_equal(first.train["image"], other.train["image"])


def test_default_sizes_and_subsets_capped_by_the_pools(decoded, tmp_path):
  del decoded
  ds = data.load_dataset(
    "tfds:imagenet2012", data_dir=str(tmp_path), max_train=20
  )
  assert ds.info == imagenet.imagenet_info(imagenet.DEFAULT_IMAGE_SIZE)
  # validation_fraction * max_train = 2; the pool of 10% of 40 holds 4.
  assert len(ds.validation["label"]) == 2 and len(ds.test["label"]) == 2
  big = _load(tmp_path, max_train=1000, max_validation=1000, max_test=1000)
  sizes = [len(big.split(n)["label"]) for n in data.SPLITS]
  assert sizes == [36, 4, 40]


@pytest.mark.parametrize("max_train", [None, 0])
def test_max_train_is_required(tmp_path, max_train):
  with pytest.raises(ValueError, match="imagenet2012 needs max_train") as e:
    data.load_dataset(
      "imagenet2012", data_dir=str(tmp_path), max_train=max_train
    )
  assert "771 GB as float32 at 224x224" in str(e.value)


@pytest.mark.parametrize(
  "name, kwargs, match",
  [
    ("digits", {"image_size": 8}, "image_size is only for 'imagenet2012'"),
    ("cifar10", {"image_size": 32}, "image_size is only for 'imagenet2012'"),
    (
      "imagenet2012",
      {"image_size": 0, "max_train": 1},
      "image_size must be a positive integer",
    ),
    (
      "imagenet2012",
      {"image_size": 2.5, "max_train": 1},
      "image_size must be a positive integer",
    ),
  ],
)
def test_bad_image_size(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_dataset(name, **kwargs)


def test_unprepared_imagenet_says_how_to_prepare(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  def fail(*args, **kwargs):
    raise AssertionError("a TFDS download was attempted")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(FileNotFoundError) as e:
    data.load_dataset("imagenet2012", data_dir=str(tmp_path), max_train=2)
  message = str(e.value)
  assert (
    "'imagenet2012' is not prepared" in message and str(tmp_path) in message
  )
  assert "ILSVRC2012_img_train.tar" in message and "manual_dir" in message
  assert "tfds build imagenet2012 --file_format=array_record" in message
  assert not os.listdir(tmp_path)


# ------------------------------------------------------ eval_transform


def _ramps(height, width):
  """uint8 RGB: red rises left to right, green top to bottom, blue 0."""
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 0] = np.linspace(0, 255, width)[None, :]
  image[..., 1] = np.linspace(0, 255, height)[:, None]
  return image


@pytest.mark.parametrize("height, width", [(60, 180), (180, 60), (50, 50)])
def test_eval_transform_resizes_the_short_side_and_crops_the_centre(
  height, width
):
  crop = imagenet.eval_transform(_ramps(height, width), SIZE).astype(float)
  assert crop.shape == (SIZE, SIZE, 3)
  # Shorter side to round(16 * 256 / 224) = 18, so the 16-pixel crop spans
  # 16/18 of the short side and 16/54 of the long one, centred on the
  # image: each ramp's crop is centred on 127.5 and spans that share.
  short = min(height, width)
  spans = {
    0: 255 * SIZE / (18 * width / short),
    1: 255 * SIZE / (18 * height / short),
  }
  for channel, span in spans.items():
    values = crop[..., channel]
    assert abs(values.mean() - 127.5) < 2
    assert abs((values.max() - values.min()) - span * (SIZE - 1) / SIZE) < 8
  assert imagenet.resize_size(SIZE) == 18 and imagenet.resize_size() == 256


def test_eval_transform_keeps_a_constant_image():
  image = np.full((37, 91, 3), 200, np.uint8)
  np.testing.assert_array_equal(imagenet.eval_transform(image, 24), 200)


@pytest.mark.parametrize(
  "image",
  [
    np.zeros((10, 10), np.uint8),
    np.zeros((10, 10, 4), np.uint8),
    np.zeros((10, 10, 3), np.float32),
  ],
)
def test_eval_transform_rejects_non_rgb_uint8(image):
  with pytest.raises(ValueError, match="ImageNet images must be uint8"):
    imagenet.eval_transform(image, 8)


@pytest.mark.skipif(
  importlib.util.find_spec("torchvision") is None,
  reason="torchvision (the [torch] extra) is not installed",
)
# 300x451: the long side 384.85 is truncated (384), not rounded.
@pytest.mark.parametrize(
  "height, width", [(375, 500), (333, 250), (300, 451), (64, 64)]
)
def test_eval_transform_matches_torchvision(height, width):
  from PIL import Image
  from torchvision import transforms

  rng = np.random.default_rng(height)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  reference = transforms.Compose(
    [transforms.Resize(256), transforms.CenterCrop(224)]
  )(Image.fromarray(image))
  np.testing.assert_array_equal(
    imagenet.eval_transform(image, 224), np.asarray(reference)
  )
