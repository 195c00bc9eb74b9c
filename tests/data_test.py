"""Tests for dsv_jax.data: digits, IDX, TFDS (mocked) and every input error.

Nothing here downloads: IDX files are written to tmp_path, TFDS is mocked
with `tfds.testing.mock_data`, and the unprepared-TFDS tests make any
download attempt fail loudly.
"""

import gzip
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _write_idx(path, array, *, compress):
  """Writes IDX by hand: magic (0, 0, type, ndim), dims, big-endian data."""
  type_codes = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.float32): 0x0D,
  }
  array = np.asarray(array)
  header = bytes([0, 0, type_codes[array.dtype], array.ndim])
  header += np.asarray(array.shape, ">u4").tobytes()
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(payload)


def _write_idx_dataset(folder, *, compress, n_train=40, n_test=9, classes=3):
  """Writes a tiny IDX dataset whose every image is unique; returns arrays."""
  rng = np.random.default_rng(0)
  raw = {}
  for stem, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)  # Makes every image unique.
    labels = np.arange(n, dtype=np.uint8) % classes
    ext = ".gz" if compress else ""
    _write_idx(
      folder / f"{stem}-images-idx3-ubyte{ext}", images, compress=compress
    )
    _write_idx(
      folder / f"{stem}-labels-idx1-ubyte{ext}", labels, compress=compress
    )
    raw[stem] = (images, labels)
  return raw


def _raw_pixels(info, images):
  """Normalised images -> uint8 raw pixels (for exact comparisons)."""
  return np.round(info.denormalize(images)[..., 0] * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits")


# ----------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_documented_sizes(digits):
  sizes = {"train": 1132, "validation": 126, "test": 539}
  for name, size in sizes.items():
    split = digits.split(name)
    assert split["image"].shape == (size, 8, 8, 1)
    assert split["image"].dtype == np.float32
    assert split["label"].shape == (size,)
    assert split["label"].dtype == np.int32
  info = digits.info
  assert info.name == "digits" and info.source == "digits"
  assert info.num_classes == 10
  assert info.class_names == tuple(str(i) for i in range(10))
  assert info.image_shape == (8, 8, 1)


def test_digits_splits_are_fixed_whatever_the_seed(digits):
  again = data.load_dataset("digits", seed=123)
  for name in data.SPLITS:
    np.testing.assert_array_equal(
      again.split(name)["image"], digits.split(name)["image"]
    )
    np.testing.assert_array_equal(
      again.split(name)["label"], digits.split(name)["label"]
    )
  assert again.info == digits.info


def test_split_seed_changes_the_validation_split(digits):
  other = data.load_dataset("digits", split_seed=data.SPLIT_SEED + 1)
  assert other.validation["image"].shape == digits.validation["image"].shape
  assert not np.array_equal(
    other.validation["image"], digits.validation["image"]
  )


def test_digits_splits_are_stratified(digits):
  total = sum(np.bincount(digits.split(n)["label"]) for n in data.SPLITS)
  for name in data.SPLITS:
    counts = np.bincount(digits.split(name)["label"], minlength=10)
    expected = total * len(digits.split(name)["label"]) / total.sum()
    assert np.all(np.abs(counts - expected) <= 1), (name, counts, expected)


def test_max_subsets_are_stratified_and_seeded(digits):
  small = data.load_dataset("digits", max_train=50, max_test=20, seed=1)
  assert small.train["label"].shape == (50,)
  assert small.test["label"].shape == (20,)
  # Validation untouched, normalisation from the full training split.
  np.testing.assert_array_equal(
    small.validation["image"], digits.validation["image"]
  )
  assert small.info == digits.info
  np.testing.assert_array_equal(np.bincount(small.train["label"]), [5] * 10)
  same = data.load_dataset("digits", max_train=50, seed=1)
  other = data.load_dataset("digits", max_train=50, seed=2)
  np.testing.assert_array_equal(same.train["image"], small.train["image"])
  assert not np.array_equal(other.train["image"], small.train["image"])


def test_normalisation_round_trip_and_pixel_bounds(digits):
  info = digits.info
  train = digits.train["image"]
  pixels = info.denormalize(train)
  assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
  # Digits hold both raw extremes, so the bounds are attained.
  np.testing.assert_allclose(train.min(), info.pixel_min[0], rtol=1e-6)
  np.testing.assert_allclose(train.max(), info.pixel_max[0], rtol=1e-6)
  np.testing.assert_allclose(info.pixel_min, -np.array(info.mean) / info.std)
  np.testing.assert_allclose(
    info.pixel_max, (1 - np.array(info.mean)) / info.std
  )
  np.testing.assert_allclose(
    info.denormalize(info.normalize(pixels)), pixels, atol=1e-6
  )
  # Statistics come from the training split itself.
  np.testing.assert_allclose(train.mean(), 0, atol=1e-5)
  np.testing.assert_allclose(train.std(), 1, atol=1e-5)


def test_normalize_works_on_jax_arrays(digits):
  info = digits.info
  x = jnp.linspace(0, 1, 8).reshape(8, 1)
  y = info.normalize(x)
  assert isinstance(y, type(x)) and y.dtype == jnp.float32
  np.testing.assert_allclose(info.denormalize(y), x, atol=1e-6)


def test_info_dict_round_trips_through_json(digits):
  info = digits.info
  restored = data.DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict())))
  assert restored == info
  with pytest.raises(ValueError, match="missing \\['std'\\]"):
    data.DatasetInfo.from_dict(
      {k: v for k, v in info.to_dict().items() if k != "std"}
    )


# -------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_dtypes_and_ranks(tmp_path, compress):
  arrays = [
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-3, 0, 1000], np.int16),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
  ]
  for i, array in enumerate(arrays):
    path = tmp_path / (f"a{i}.idx" + (".gz" if compress else ""))
    _write_idx(path, array, compress=compress)
    out = data.read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_loads_exact_pixels(tmp_path, compress):
  raw = _write_idx_dataset(tmp_path, compress=compress)
  ds = data.load_dataset("idx", data_dir=str(tmp_path))
  info = ds.info
  assert info.source == "idx" and info.num_classes == 3
  assert info.class_names == ("0", "1", "2")
  assert info.image_shape == (4, 5, 1)
  assert len(ds.train["label"]) == 36 and len(ds.validation["label"]) == 4
  # Test keeps the file order; train + validation partition the train file.
  np.testing.assert_array_equal(
    _raw_pixels(info, ds.test["image"]), raw["t10k"][0]
  )
  np.testing.assert_array_equal(ds.test["label"], raw["t10k"][1])
  images, labels = raw["train"]
  for split in (ds.train, ds.validation):
    index = _raw_pixels(info, split["image"])[:, 0, 0]
    np.testing.assert_array_equal(
      _raw_pixels(info, split["image"]), images[index]
    )
    np.testing.assert_array_equal(split["label"], labels[index])
  seen = np.concatenate(
    [_raw_pixels(info, s["image"])[:, 0, 0] for s in (ds.train, ds.validation)]
  )
  np.testing.assert_array_equal(np.sort(seen), np.arange(40))


def test_idx_num_classes_can_be_given(tmp_path):
  _write_idx_dataset(tmp_path, compress=True)
  ds = data.load_dataset("idx", data_dir=str(tmp_path), num_classes=5)
  assert ds.info.num_classes == 5


def test_fashion_mnist_reads_idx_from_data_dir(tmp_path):
  _write_idx_dataset(tmp_path, compress=True, classes=10, n_train=50)
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert ds.info.source == "idx" and ds.info.name == "fashion_mnist"
  assert ds.info.class_names[0] == "T-shirt/top"
  assert ds.info.class_names[-1] == "Ankle boot"
  assert len(ds.info.class_names) == 10


def test_fashion_mnist_default_folder_is_discovered(tmp_path, monkeypatch):
  _write_idx_dataset(tmp_path, compress=False, classes=10, n_train=50)
  monkeypatch.setitem(
    data.loading.DEFAULT_IDX_DIRS, "fashion_mnist", (str(tmp_path),)
  )
  ds = data.load_dataset("fashion_mnist")
  assert ds.info.source == "idx" and ds.info.image_shape == (4, 5, 1)


def test_idx_dot_spelling_is_accepted(tmp_path):
  raw = _write_idx_dataset(tmp_path, compress=False)
  for path in tmp_path.iterdir():
    path.rename(tmp_path / path.name.replace("-idx", ".idx"))
  ds = data.load_dataset("idx", data_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.test["label"], raw["t10k"][1])


def test_read_idx_bad_magic(tmp_path):
  path = tmp_path / "bad-idx3-ubyte"
  path.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x07")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(path)


def test_read_idx_unknown_type_code(tmp_path):
  path = tmp_path / "bad-idx3-ubyte"
  path.write_bytes(b"\x00\x00\x42\x01\x00\x00\x00\x01\x07")
  with pytest.raises(ValueError, match="unknown IDX type code 0x42"):
    data.read_idx(path)


def test_read_idx_truncated_plain(tmp_path):
  path = tmp_path / "images-idx3-ubyte"
  _write_idx(path, np.zeros((3, 4, 4), np.uint8), compress=False)
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    data.read_idx(path)
  path.write_bytes(path.read_bytes()[:10])
  with pytest.raises(ValueError, match="truncated IDX header"):
    data.read_idx(path)


def test_read_idx_truncated_gzip(tmp_path):
  path = tmp_path / "images-idx3-ubyte.gz"
  _write_idx(path, np.arange(300, dtype=np.uint8), compress=True)
  path.write_bytes(path.read_bytes()[:-12])
  with pytest.raises(ValueError, match="corrupt or truncated gzip"):
    data.read_idx(path)


def test_idx_label_count_mismatch(tmp_path):
  _write_idx_dataset(tmp_path, compress=False)
  _write_idx(
    tmp_path / "train-labels-idx1-ubyte",
    np.zeros(39, np.uint8),
    compress=False,
  )
  with pytest.raises(ValueError, match="40 images but 39 labels"):
    data.load_dataset("idx", data_dir=str(tmp_path))


def test_idx_label_out_of_range(tmp_path):
  _write_idx_dataset(tmp_path, compress=False)
  with pytest.raises(ValueError, match="must lie in \\[0, 2\\)"):
    data.load_dataset("idx", data_dir=str(tmp_path), num_classes=2)


def test_idx_missing_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    data.load_dataset("idx", data_dir=str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    data.load_dataset("idx", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs data_dir"):
    data.load_dataset("idx")


@pytest.mark.skipif(
  not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist():
  ds = data.load_dataset("fashion_mnist", max_train=1000)
  assert ds.info.source == "idx"
  assert ds.info.num_classes == 10 and ds.info.image_shape == (28, 28, 1)
  assert ds.train["image"].shape == (1000, 28, 28, 1)
  assert ds.validation["image"].shape == (6000, 28, 28, 1)
  assert ds.test["image"].shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.test["label"]), [1000] * 10)
  np.testing.assert_allclose(ds.info.mean, [0.28630], atol=1e-5)
  np.testing.assert_allclose(ds.info.std, [0.35328], atol=1e-5)


# ------------------------------------------------------------ TFDS (mock)


@pytest.fixture
def mock_tfds(monkeypatch):
  """`tfds.testing.mock_data` with random data, never touching the network."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  # tfds 4.9.10's mock sets `__getitems__` as a plain attribute of a
  # MagicMock, so it is called without `self` and fails; accept either form.
  def getitems(*args, generator, serialized=False):
    assert not serialized
    return [generator[key] for key in args[-1]]

  monkeypatch.setattr(mocking, "_getitems", getitems)
  with tfds.testing.mock_data(
    num_examples=60, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    yield


@pytest.mark.parametrize(
  "name, shape, num_classes",
  [
    ("tfds:mnist", (28, 28, 1), 10),
    ("mnist", (28, 28, 1), 10),  # No IDX files in data_dir: TFDS fallback.
    ("cifar10", (32, 32, 3), 10),
    ("tfds:cifar100", (32, 32, 3), 100),
  ],
)
def test_tfds_mocked(mock_tfds, tmp_path, name, shape, num_classes):
  del mock_tfds
  ds = data.load_dataset(name, data_dir=str(tmp_path))
  info = ds.info
  assert info.source == "tfds" and info.name == name
  assert info.image_shape == shape and info.num_classes == num_classes
  sizes = {"train": 54, "validation": 6, "test": 60}
  for split_name, size in sizes.items():
    split = ds.split(split_name)
    assert split["image"].shape == (size, *shape)
    assert split["image"].dtype == np.float32
    assert split["label"].dtype == np.int32
    assert 0 <= split["label"].min() and split["label"].max() < num_classes
    pixels = info.denormalize(split["image"])
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


@pytest.fixture
def no_download(monkeypatch):
  """Makes any TFDS download attempt fail the test."""
  import tensorflow_datasets as tfds

  def fail(*args, **kwargs):
    raise AssertionError("a TFDS download was attempted")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)


def test_unprepared_tfds_raises_with_instructions(no_download, tmp_path):
  del no_download
  with pytest.raises(FileNotFoundError) as e:
    data.load_dataset("cifar10", data_dir=str(tmp_path))
  message = str(e.value)
  assert "not prepared" in message and str(tmp_path) in message
  assert "tfds build cifar10 --file_format=array_record" in message
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_missing_mnist_data_says_where_and_how(no_download, tmp_path, name):
  del no_download
  with pytest.raises(FileNotFoundError) as e:
    data.load_dataset(name, data_dir=str(tmp_path))
  message = str(e.value)
  assert f"IDX folders searched: {tmp_path}" in message
  assert f"tfds build {name}" in message
  assert "--config.data.data_dir" in message
  assert ("apt-get install dataset-fashion-mnist" in message) == (
    name == "fashion_mnist"
  )


def test_unknown_tfds_name():
  with pytest.raises(ValueError, match="No TFDS dataset is called"):
    data.load_dataset("tfds:no_such_dataset_xyz")


# ----------------------------------------------------------- bad inputs


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet'") as e:
    data.load_dataset("imagenet")
  for name in data.KNOWN_NAMES:
    assert name in str(e.value)
  assert "tfds:<name>" in str(e.value)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"max_train": 0}, "max_train must be a positive integer"),
    ({"max_test": 2.5}, "max_test must be a positive integer"),
    ({"validation_fraction": 0.0}, "validation_fraction must lie in"),
    ({"validation_fraction": 1.0}, "validation_fraction must lie in"),
    ({"num_classes": 3}, "num_classes is only for the 'idx' dataset"),
  ],
)
def test_bad_load_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_dataset("digits", **kwargs)


def _info(**overrides):
  fields = dict(
    name="toy",
    num_classes=3,
    class_names=("a", "b", "c"),
    image_shape=(2, 2, 1),
    mean=(0.5,),
    std=(0.25,),
    source="idx",
  )
  return data.DatasetInfo(**{**fields, **overrides})


def _split(n=4):
  return {
    "image": np.zeros((n, 2, 2, 1), np.float32),
    "label": np.arange(n, dtype=np.int32) % 3,
  }


def _bad_split(kind):
  split = _split()
  if kind == "nan":
    split["image"][1, 0, 0, 0] = np.nan
  elif kind == "inf":
    split["image"][2, 1, 1, 0] = -np.inf
  elif kind == "label_too_big":
    split["label"][3] = 3
  elif kind == "negative_label":
    split["label"][0] = -1
  elif kind == "empty":
    split = _split(0)
  elif kind == "count_mismatch":
    split["label"] = split["label"][:3]
  elif kind == "not_4d":
    split["image"] = split["image"][..., 0]
  elif kind == "wrong_image_shape":
    split["image"] = np.zeros((4, 3, 2, 1), np.float32)
  elif kind == "integer_images":
    split["image"] = split["image"].astype(np.uint8)
  elif kind == "float_labels":
    split["label"] = split["label"].astype(np.float32)
  elif kind == "missing_key":
    del split["label"]
  return split


@pytest.mark.parametrize(
  "kind, match",
  [
    ("nan", "NaN or Inf values in 1 image\\(s\\), first at index 1"),
    ("inf", "NaN or Inf values in 1 image\\(s\\), first at index 2"),
    ("label_too_big", "must lie in \\[0, 3\\); label 3 at index 3"),
    ("negative_label", "must lie in \\[0, 3\\); label -1 at index 0"),
    ("empty", "train split is empty"),
    ("count_mismatch", "4 images but 3 labels"),
    ("not_4d", "must be 4-D"),
    ("wrong_image_shape", "expects \\(2, 2, 1\\)"),
    ("integer_images", "must be floating point"),
    ("float_labels", "labels must be integers"),
    ("missing_key", "missing the keys \\['label'\\]"),
  ],
)
def test_validate_split_errors(kind, match):
  info = _info()
  data.validate_split(_split(), info, name="train")
  with pytest.raises(ValueError, match=match):
    data.validate_split(_bad_split(kind), info, name="train")
  with pytest.raises(ValueError, match=match):
    data.Dataset(
      info=info, train=_bad_split(kind), validation=_split(), test=_split()
    )


def test_dataset_split_accessor():
  ds = data.Dataset(
    info=_info(), train=_split(), validation=_split(2), test=_split(3)
  )
  assert len(ds.split("validation")["label"]) == 2
  with pytest.raises(ValueError, match="Unknown split 'val'"):
    ds.split("val")


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"class_names": ("a", "b")}, "2 class names for 3 classes"),
    ({"std": (0.0,)}, "std finite and positive"),
    ({"mean": (0.1, 0.2)}, "one value per channel"),
    ({"image_shape": (2, 2)}, "image_shape must be"),
    ({"source": "web"}, "Unknown source 'web'"),
  ],
)
def test_dataset_info_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    _info(**overrides)
