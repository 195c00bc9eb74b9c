"""`load_dataset`: name -> normalised train/validation/test `Dataset`.

See the `dsv_jax.data` module docstring for the datasets, the exact split
sizes and the normalisation.
"""

import math
import numbers
import os

import numpy as np

from dsv_jax.data import digits, idx, imagenet, tfds_source
from dsv_jax.data.core import SPLITS, Dataset, DatasetInfo

# Seed of every fixed split (digits' test split, the validation split carved
# from train). Fixed so that validation and test sets are the same in every
# run, whatever the experiment's seed; change it only via `split_seed`.
SPLIT_SEED = 2024
# Fraction of the training data held out as the validation split.
VALIDATION_FRACTION = 0.1
# Fraction of the 1797 digits held out as the test split.
DIGITS_TEST_FRACTION = 0.3

# Where IDX files are found when `data_dir` is not given. The Debian package
# `dataset-fashion-mnist` installs the real Fashion-MNIST here.
DEFAULT_IDX_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}

FASHION_MNIST_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_IDX_CLASSES = {"mnist": _DIGIT_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES}

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped")
TFDS_PREFIX = "tfds:"
KNOWN_NAMES = (
  "digits",
  "mnist",
  "fashion_mnist",
  "idx",
  *TFDS_NAMES,
  imagenet.NAME,
)

IMAGENET_HOWTO = (
  "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
  "ILSVRC2012_img_val.tar (from https://image-net.org) in TFDS's manual_dir "
  "(DIR/downloads/manual), pip install 'dsv_jax[tfds]', run `tfds build "
  "{name} --file_format=array_record --data_dir DIR`, and pass DIR as "
  "--config.data.data_dir."
)
# Decoded ImageNet photos average about 0.5 MB: 256 per batched read keeps
# the decoded records alive at once near 100 MB.
_IMAGENET_READ_CHUNK = 256

_UINT8_MAX = 255

RawSplits = dict[str, tuple[np.ndarray, np.ndarray]]


def _stratified_split(
  labels: np.ndarray, num_held_out: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices into (kept, held_out) with class proportions preserved.

  Each class contributes its proportional share of `num_held_out`, rounded so
  that the shares sum exactly to `num_held_out` (largest remainders first);
  the members are drawn at random within each class.

  Args:
    labels: int[N] class labels.
    num_held_out: exact size of the held-out part, in ``[0, N]``.
    seed: seed of the draw.

  Returns:
    ``(kept, held_out)``: sorted int index arrays partitioning ``range(N)``.
  """
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(labels, return_counts=True)
  exact = counts * num_held_out / len(labels)
  quota = np.floor(exact).astype(np.int64)
  by_remainder = np.argsort(quota - exact, kind="stable")
  quota[by_remainder[: num_held_out - quota.sum()]] += 1
  held_out = np.sort(
    np.concatenate(
      [
        rng.permutation(np.flatnonzero(labels == c))[:q]
        for c, q in zip(classes, quota, strict=True)
      ]
    )
  )
  kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
  return kept, held_out


def _take(split: tuple[np.ndarray, np.ndarray], index: np.ndarray):
  images, labels = split
  return images[index], labels[index]


def _subsample(split, max_size: int | None, seed: int):
  """A stratified random subset of at most `max_size` examples."""
  if max_size is None or max_size >= len(split[1]):
    return split
  _, subset = _stratified_split(split[1], max_size, seed)
  return _take(split, subset)


def _check_raw(split: tuple[np.ndarray, np.ndarray], *, name: str):
  """Structural checks needed before splits can be indexed and measured."""
  images, labels = split
  if images.ndim != 4:
    raise ValueError(
      f"{name} images must be 4-D [N, H, W, C] after loading, got shape "
      f"{images.shape}."
    )
  if len(images) != len(labels):
    raise ValueError(
      f"{name} split has {len(images)} images but {len(labels)} labels."
    )
  if len(labels) == 0:
    raise ValueError(f"{name} split is empty.")


def _channel_stats(images: np.ndarray, max_value: int):
  """Exact per-channel mean and std of ``images / max_value`` (uint8 input).

  Works on a histogram of the 8-bit values instead of a float copy of the
  whole training set (over 1 GB for CIFAR-10's training split in float64).
  """
  values = np.arange(_UINT8_MAX + 1) / max_value
  mean, std = [], []
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].ravel(), minlength=values.size)
    m = counts @ values / counts.sum()
    mean.append(m)
    std.append(math.sqrt(counts @ (values - m) ** 2 / counts.sum()))
  return tuple(mean), tuple(std)


def _held_out_size(n: int, fraction: float, *, what: str) -> int:
  held_out = round(fraction * n)
  if not 0 < held_out < n:
    raise ValueError(
      f"Holding out {fraction} of {n} examples as {what} leaves an empty split."
    )
  return held_out


def _load_digits(split_seed: int) -> tuple[RawSplits, tuple[str, ...]]:
  images, labels = digits.load_digits_raw()
  test_size = _held_out_size(len(labels), DIGITS_TEST_FRACTION, what="test")
  train, test = _stratified_split(labels, test_size, split_seed)
  raw = {
    "train": _take((images, labels), train),
    "test": _take((images, labels), test),
  }
  return raw, _DIGIT_CLASSES


def _missing_data_error(
  name: str, idx_dirs: list[str], tfds_error: FileNotFoundError
) -> FileNotFoundError:
  """Explains both places a missing mnist/fashion_mnist was looked for."""
  looked = ", ".join(idx_dirs) if idx_dirs else "none (data_dir not set)"
  alternatives = []
  if name == "fashion_mnist":
    alternatives.append(
      "`apt-get install dataset-fashion-mnist` (installs the IDX files in "
      f"{DEFAULT_IDX_DIRS['fashion_mnist'][0]})"
    )
  alternatives.append(
    "put the four IDX files (train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz]) in a folder and pass it as "
    "--config.data.data_dir"
  )
  return FileNotFoundError(
    f"No {name} data found. IDX folders searched: {looked}. {tfds_error} "
    "Or: " + "; or ".join(alternatives) + "."
  )


def _load_raw(name: str, data_dir: str | None, split_seed: int):
  """Returns ``(raw_splits, class_names or None, source, max_pixel_value)``."""
  if name == "digits":
    raw, class_names = _load_digits(split_seed)
    return raw, class_names, "digits", digits.DIGITS_MAX_VALUE
  if name == "idx":
    if data_dir is None:
      raise ValueError("Dataset 'idx' needs data_dir: a folder of IDX files.")
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f"IDX data_dir {data_dir} is not a folder.")
    return idx.load_idx_folder(data_dir), None, "idx", _UINT8_MAX
  if name in _IDX_CLASSES:
    idx_dirs = [data_dir] if data_dir else list(DEFAULT_IDX_DIRS.get(name, ()))
    for folder in idx_dirs:
      if idx.has_idx_files(folder):
        raw = idx.load_idx_folder(folder)
        return raw, _IDX_CLASSES[name], "idx", _UINT8_MAX
    try:
      raw, _ = tfds_source.load_tfds(name, data_dir=data_dir)
    except FileNotFoundError as e:
      raise _missing_data_error(name, idx_dirs, e) from e
    return raw, _IDX_CLASSES[name], "tfds", _UINT8_MAX
  if name in TFDS_NAMES or name.startswith(TFDS_PREFIX):
    tfds_name = name.removeprefix(TFDS_PREFIX)
    raw, class_names = tfds_source.load_tfds(tfds_name, data_dir=data_dir)
    return raw, class_names, "tfds", _UINT8_MAX
  raise ValueError(
    f"Unknown dataset {name!r}; known: {', '.join(KNOWN_NAMES)}, or "
    f"'{TFDS_PREFIX}<name>' for any prepared TFDS image classification "
    "dataset."
  )


def _imagenet_bytes(num_images: int, image_size: int) -> int:
  """Memory of `num_images` float32 ImageNet images of `image_size` squared."""
  return (
    num_images * image_size * image_size * 3 * np.dtype(np.float32).itemsize
  )


def _imagenet_indices(
  num_train_records: int,
  num_test_records: int,
  *,
  sizes: dict[str, int],
  validation_fraction: float,
  split_seed: int,
  seed: int,
) -> dict[str, np.ndarray]:
  """Which records of TFDS imagenet2012 to decode, drawn before decoding.

  Our train and validation splits come from TFDS's ``train`` split: a
  random `validation_fraction` of its records, drawn with `split_seed`, is
  the validation pool (fixed whatever `seed`), the rest the train pool.
  Random rather than stratified: labels are only known after decoding.
  Our test split is TFDS's ``validation`` split (ImageNet's test labels are
  not public). Each split then takes a random subset of `sizes[split]`
  records (at most the pool) drawn with its own stream of `seed`, so the
  size of one split does not change the records of another.

  Returns:
    ``{split: sorted int64 record indices}``; train and validation indices
    index TFDS's train split and are disjoint, test indices index TFDS's
    validation split.
  """
  held_out = _held_out_size(
    num_train_records, validation_fraction, what="validation"
  )
  order = np.random.default_rng(split_seed).permutation(num_train_records)
  pools = {
    "train": order[held_out:],
    "validation": order[:held_out],
    "test": np.arange(num_test_records),
  }
  indices = {}
  for stream, split in enumerate(SPLITS):
    pool = pools[split]
    rng = np.random.default_rng([seed, stream])
    size = min(sizes[split], len(pool))
    indices[split] = np.sort(rng.choice(pool, size, replace=False))
  return indices


def _read_imagenet(source, keys: np.ndarray, info: DatasetInfo):
  """Decodes records `keys`, applies `eval_transform` and normalises."""
  size = info.image_shape[0]
  # Filled record by record so that memory holds the float32 output plus
  # one chunk of decoded photos, never all the photos at full size.
  images = np.empty((len(keys), *info.image_shape), np.float32)
  labels = np.empty(len(keys), np.int32)
  records = tfds_source.read_records(source, keys, chunk=_IMAGENET_READ_CHUNK)
  for i, record in enumerate(records):
    crop = imagenet.eval_transform(record["image"], size)
    images[i] = info.normalize(crop.astype(np.float32) / np.float32(_UINT8_MAX))
    labels[i] = record["label"]
  return {"image": images, "label": labels}


def _load_imagenet(
  *,
  data_dir: str | None,
  image_size: int,
  validation_fraction: float,
  split_seed: int,
  seed: int,
  limits: dict[str, int | None],
) -> Dataset:
  """TFDS imagenet2012, subsets only; see `load_dataset`."""
  info = imagenet.imagenet_info(image_size)
  default = max(1, round(validation_fraction * limits["train"]))
  sizes = {s: default if n is None else n for s, n in limits.items()}
  # Imported here, as in `tfds_source.load_tfds`: it takes about a second.
  import tensorflow_datasets as tfds

  sources = {
    split: tfds_source.data_source(
      tfds, imagenet.NAME, split, data_dir, howto=IMAGENET_HOWTO
    )
    for split in ("train", "validation")
  }
  indices = _imagenet_indices(
    len(sources["train"]),
    len(sources["validation"]),
    sizes=sizes,
    validation_fraction=validation_fraction,
    split_seed=split_seed,
    seed=seed,
  )
  ours = {
    "train": sources["train"],
    "validation": sources["train"],
    "test": sources["validation"],
  }
  arrays = {
    split: _read_imagenet(ours[split], indices[split], info) for split in SPLITS
  }
  return Dataset(info=info, **arrays)


def load_dataset(
  name: str,
  *,
  data_dir: str | None = None,
  validation_fraction: float = VALIDATION_FRACTION,
  split_seed: int = SPLIT_SEED,
  seed: int = 0,
  max_train: int | None = None,
  max_validation: int | None = None,
  max_test: int | None = None,
  num_classes: int | None = None,
  image_size: int | None = None,
) -> Dataset:
  """Loads a dataset into memory as normalised float32 numpy splits.

  Never downloads. The validation split is carved from the training data
  with a stratified draw seeded by `split_seed` (fixed by default), so it is
  identical in every run; normalisation statistics come from the resulting
  training split before any `max_*` subsetting, so they do not depend on
  `seed` or `max_*` either.

  ``imagenet2012`` (also spelled ``tfds:imagenet2012``) differs, because its
  1.28M photos vary in size and do not fit in memory. Only the records of
  random subsets, drawn before decoding, are read, so `max_train` is
  required; `max_validation` and `max_test` default to `validation_fraction`
  times `max_train` (at least 1). Train and validation come from TFDS's
  ``train`` split, validation from a pool of `validation_fraction` of its
  records fixed by `split_seed` and disjoint from train; test is TFDS's
  ``validation`` split (ImageNet's test labels are not public). Subsets are
  random, not stratified (labels are unknown before decoding), drawn with
  `seed`. Each photo goes through `imagenet.eval_transform(image,
  image_size)` and is normalised with ImageNet's fixed `imagenet.MEAN` and
  `imagenet.STD`; ``info == imagenet.imagenet_info(image_size)``.

  Args:
    name: ``digits``, ``mnist``, ``fashion_mnist``, ``idx``, ``cifar10``,
      ``cifar100``, ``svhn_cropped``, ``imagenet2012`` or ``tfds:<name>``.
    data_dir: folder of IDX files (``idx``, ``mnist``, ``fashion_mnist``) or
      TFDS data directory (TFDS names, and ``mnist``/``fashion_mnist`` when
      it holds no IDX files). None: the defaults in the module docstring.
    validation_fraction: fraction of the training data held out as the
      validation split.
    split_seed: seed of the fixed splits; leave it unless you mean to change
      the validation (and digits test) split.
    seed: seed of the stratified `max_*` subsets.
    max_train: if set, keep a stratified random subset of at most this many
      training examples (for quick runs).
    max_validation: same for the validation split.
    max_test: same for the test split.
    num_classes: number of classes of an ``idx`` dataset; inferred from the
      labels (largest label + 1) when None. Only valid with ``idx``.
    image_size: side of the square images of ``imagenet2012``; None: 224.
      Only valid with ``imagenet2012``: the other datasets' images have a
      fixed size.

  Returns:
    A validated `Dataset`.

  Raises:
    ValueError: unknown name, bad arguments, or invalid data (see
      `validate_split`).
    FileNotFoundError: the data is not on this machine; the message says
      where it looked and how to get it.
  """
  if num_classes is not None and name != "idx":
    raise ValueError(
      f"num_classes is only for the 'idx' dataset; {name!r} knows its classes."
    )
  is_imagenet = name.removeprefix(TFDS_PREFIX) == imagenet.NAME
  if image_size is not None and not is_imagenet:
    raise ValueError(
      f"image_size is only for '{imagenet.NAME}'; {name!r} images have a "
      "fixed size."
    )
  if is_imagenet:
    image_size = (
      imagenet.DEFAULT_IMAGE_SIZE if image_size is None else image_size
    )
    if not isinstance(image_size, numbers.Integral) or image_size < 1:
      raise ValueError(
        f"image_size must be a positive integer, got {image_size}."
      )
    if not max_train:
      full = _imagenet_bytes(imagenet.TRAIN_SIZE, image_size) / 1e9
      example = _imagenet_bytes(10_000, image_size) / 1e9
      raise ValueError(
        f"{imagenet.NAME} needs max_train: its {imagenet.TRAIN_SIZE:,} "
        f"training images would take {full:,.0f} GB as float32 at "
        f"{image_size}x{image_size} (max_train=10000: {example:.1f} GB)."
      )
  if not 0 < validation_fraction < 1:
    raise ValueError(
      f"validation_fraction must lie in (0, 1), got {validation_fraction}."
    )
  limits = {"train": max_train, "validation": max_validation, "test": max_test}
  for split_name, limit in limits.items():
    if limit is not None and (
      not isinstance(limit, numbers.Integral) or limit < 1
    ):
      raise ValueError(
        f"max_{split_name} must be a positive integer, got {limit}."
      )
  if is_imagenet:
    return _load_imagenet(
      data_dir=data_dir,
      image_size=int(image_size),
      validation_fraction=validation_fraction,
      split_seed=split_seed,
      seed=seed,
      limits=limits,
    )
  raw, class_names, source, max_value = _load_raw(name, data_dir, split_seed)
  for split_name, split in raw.items():
    _check_raw(split, name=split_name)

  labels = raw["train"][1]
  val_size = _held_out_size(len(labels), validation_fraction, what="validation")
  train, validation = _stratified_split(labels, val_size, split_seed)
  splits = {
    "train": _take(raw["train"], train),
    "validation": _take(raw["train"], validation),
    "test": raw["test"],
  }
  mean, std = _channel_stats(splits["train"][0], max_value)

  if class_names is None:
    if num_classes is None:
      num_classes = 1 + max(int(s[1].max()) for s in splits.values())
    class_names = tuple(str(i) for i in range(num_classes))
  info = DatasetInfo(
    name=name,
    num_classes=len(class_names),
    class_names=class_names,
    image_shape=splits["train"][0].shape[1:],
    mean=mean,
    std=std,
    source=source,
  )

  arrays = {}
  for split_name, split in splits.items():
    images, labels = _subsample(split, limits[split_name], seed)
    arrays[split_name] = {
      "image": info.normalize(
        images.astype(np.float32) / np.float32(max_value)
      ),
      "label": labels.astype(np.int32),
    }
  return Dataset(info=info, **arrays)
