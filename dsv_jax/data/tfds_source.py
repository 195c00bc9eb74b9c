"""Prepared TensorFlow Datasets read through `tfds.data_source`.

`tfds.data_source` gives random access to data prepared in the ArrayRecord
format and needs no TensorFlow. It is always called with ``download=False``:
a download here would need TensorFlow to prepare the data and, without
network access, spends minutes retrying before it fails. Unprepared data
raises a `FileNotFoundError` that says how to prepare it instead.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Records decoded per `__getitems__` call: large enough for ArrayRecord's
# parallel batched reads to pay off, small enough to keep the list of decoded
# dicts (one per record) cheap.
_READ_CHUNK = 4096

TFDS_HOWTO = (
  "To prepare it: pip install 'dsv_jax[tfds]' (TensorFlow is needed to "
  "build the data), then `tfds build {name} --file_format=array_record "
  "[--data_dir DIR]`, and pass DIR as --config.data.data_dir."
)


def data_source(
  tfds, name: str, split: str, data_dir: str | None, *, howto: str = TFDS_HOWTO
):
  """`tfds.data_source` that never downloads and explains unprepared data.

  Args:
    tfds: the imported `tensorflow_datasets` module.
    name: TFDS dataset name.
    split: TFDS split name.
    data_dir: TFDS data directory (None: TFDS's default).
    howto: how to prepare the data, with a ``{name}`` field; ends the
      `FileNotFoundError` message.
  """
  try:
    return tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(f"No TFDS dataset is called {name!r}.") from e
  except Exception as e:
    # Unprepared data fails with a KeyError (no splits) or a
    # NotImplementedError (default TFRecord format) depending on `data_dir`;
    # diagnose from the builder rather than from the exception type.
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
        + howto.format(name=name)
      ) from e
    raise


def read_records(
  source, keys: Sequence[int], *, chunk: int = _READ_CHUNK
) -> Iterator[dict[str, Any]]:
  """Decodes the records `keys` of a data source, in that order.

  Only these records are read and decoded, `chunk` at a time, so at most
  `chunk` decoded records are alive while the caller consumes them.
  """
  keys = [int(k) for k in keys]
  for start in range(0, len(keys), chunk):
    yield from source.__getitems__(keys[start : start + chunk])


def _read_all(source, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every record of a data source into ``(images, labels)``."""
  images, labels = [], []
  for record in read_records(source, range(len(source))):
    images.append(record["image"])
    labels.append(record["label"])
  if not images:
    raise ValueError(f"TFDS dataset {name!r} has an empty {split!r} split.")
  shapes = {image.shape for image in images}
  if len(shapes) != 1:
    raise ValueError(
      f"TFDS dataset {name!r} has images of {len(shapes)} different shapes "
      f"(e.g. {sorted(shapes)[:3]}); only fixed-size images are supported."
    )
  images = np.stack(images)
  if images.dtype != np.uint8:
    raise ValueError(
      f"TFDS dataset {name!r}: expected uint8 images, got {images.dtype}."
    )
  return images, np.asarray(labels, np.int32)


def load_tfds(
  name: str, *, data_dir: str | None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...] | None]:
  """Reads the train and test splits of a prepared TFDS dataset.

  Args:
    name: TFDS name with ``image`` and ``label`` features (e.g. ``cifar10``).
    data_dir: TFDS data directory; None uses TFDS's default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Returns:
    ``({"train": (images, labels), "test": (images, labels)}, class_names)``
    with images ``uint8[N, H, W, C]``, labels ``int32[N]``, and the label
    feature's class names (None when the label is not a ``ClassLabel``).

  Raises:
    ValueError: unknown TFDS name, or not an image classification dataset.
    FileNotFoundError: the dataset is not prepared (never downloads).
  """
  # Imported here: importing tfds takes about a second and logs a warning
  # without TensorFlow; the digits and IDX paths do not need it.
  import tensorflow_datasets as tfds

  sources = {
    split: data_source(tfds, name, split, data_dir)
    for split in ("train", "test")
  }
  features = sources["train"].dataset_info.features
  if "image" not in features or "label" not in features:
    raise ValueError(
      f"TFDS dataset {name!r} has features {sorted(features)}; an image "
      "classification dataset needs 'image' and 'label'."
    )
  # A `ClassLabel` feature knows its names; a plain integer label does not,
  # and the caller then infers the classes from the labels.
  names = getattr(features["label"], "names", None)
  class_names = tuple(names) if names else None
  splits = {
    split: _read_all(source, name, split) for split, source in sources.items()
  }
  return splits, class_names
