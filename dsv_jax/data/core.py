"""Dataset containers and the value checks every split goes through.

`DatasetInfo` carries what downstream stages need besides the arrays: class
names for display, the normalisation constants, and the normalised images of
raw pixels 0 and 1 (`pixel_min`, `pixel_max`) that synthesis clips to.
`Dataset` holds the three splits as numpy arrays and validates them on
construction, so a `Dataset` that exists has passed `validate_split`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

SPLITS = ("train", "validation", "test")
SOURCES = ("digits", "idx", "tfds")

Split = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Metadata of an image classification dataset.

  Attributes:
    name: dataset name as passed to `load_dataset` (e.g. ``"digits"``).
    num_classes: number of classes; labels lie in ``[0, num_classes)``.
    class_names: one display name per class.
    image_shape: ``(height, width, channels)`` of one image.
    mean: per-channel mean of raw pixels in ``[0, 1]``, subtracted by
      `normalize`.
    std: per-channel standard deviation, divided by `normalize`.
    source: where the data came from: ``"digits"``, ``"idx"`` or ``"tfds"``.
  """

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  source: str

  def __post_init__(self):
    # Accept lists (e.g. from JSON) and numpy scalars, but store plain
    # tuples of Python values so the info stays hashable and serialisable.
    coerce = {
      "class_names": str,
      "image_shape": int,
      "mean": float,
      "std": float,
    }
    for field, kind in coerce.items():
      object.__setattr__(
        self, field, tuple(kind(v) for v in getattr(self, field))
      )
    object.__setattr__(self, "num_classes", int(self.num_classes))
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
    if len(self.class_names) != self.num_classes:
      raise ValueError(
        f"Got {len(self.class_names)} class names for "
        f"{self.num_classes} classes."
      )
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise ValueError(
        "image_shape must be (height, width, channels) with positive sizes, "
        f"got {self.image_shape}."
      )
    channels = self.image_shape[-1]
    if len(self.mean) != channels or len(self.std) != channels:
      raise ValueError(
        f"mean and std need one value per channel ({channels}), got "
        f"mean={self.mean}, std={self.std}."
      )
    if not all(np.isfinite(self.mean)) or not all(
      np.isfinite(s) and s > 0 for s in self.std
    ):
      raise ValueError(
        "mean must be finite and std finite and positive, got "
        f"mean={self.mean}, std={self.std}."
      )
    if self.source not in SOURCES:
      raise ValueError(
        f"Unknown source {self.source!r}; expected one of {SOURCES}."
      )

  @property
  def pixel_min(self) -> np.ndarray:
    """Normalised value of raw pixel 0, per channel: f32[channels]."""
    return self.normalize(np.zeros(self.image_shape[-1], np.float32))

  @property
  def pixel_max(self) -> np.ndarray:
    """Normalised value of raw pixel 1, per channel: f32[channels]."""
    return self.normalize(np.ones(self.image_shape[-1], np.float32))

  def normalize(self, images: Any) -> Any:
    """Maps images with pixels in ``[0, 1]`` to normalised images.

    Plain arithmetic with float32 constants, so numpy arrays stay numpy and
    jax arrays stay jax (also inside `jax.jit`).

    Args:
      images: array ``[..., channels]`` with raw pixels in ``[0, 1]``.

    Returns:
      ``(images - mean) / std``, same shape and array type.
    """
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (images - mean) / std

  def denormalize(self, images: Any) -> Any:
    """Inverse of `normalize`: normalised images back to pixels in [0, 1].

    Args:
      images: normalised array ``[..., channels]`` (numpy or jax).

    Returns:
      ``images * std + mean``, same shape and array type.
    """
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return images * std + mean

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable dict; `from_dict` inverts it."""
    return {
      "name": self.name,
      "num_classes": self.num_classes,
      "class_names": list(self.class_names),
      "image_shape": list(self.image_shape),
      "mean": list(self.mean),
      "std": list(self.std),
      "source": self.source,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DatasetInfo":
    """Rebuilds a `DatasetInfo` from `to_dict` output (e.g. read from JSON)."""
    expected = {f.name for f in dataclasses.fields(cls)}
    if set(d) != expected:
      raise ValueError(
        f"DatasetInfo dict needs exactly the keys {sorted(expected)}; "
        f"missing {sorted(expected - set(d))}, "
        f"unexpected {sorted(set(d) - expected)}."
      )
    return cls(**d)


def validate_split(split: Mapping[str, Any], info: DatasetInfo, *, name: str):
  """Checks one split's arrays eagerly; raises `ValueError` on any problem.

  Call it on concrete arrays (at load time or on user-supplied data), never
  inside `jax.jit`: the value checks need concrete numbers.

  Args:
    split: mapping with ``"image"``: float array ``[N, H, W, C]`` (normalised
      with `info`) and ``"label"``: integer array ``[N]``.
    info: the dataset metadata the split must agree with.
    name: the split's name, used in error messages (e.g. ``"train"``).

  Raises:
    ValueError: missing keys, wrong rank, shape or dtype, an empty split,
      image/label count mismatch, NaN or Inf pixels, or labels outside
      ``[0, info.num_classes)``.
  """
  missing = {"image", "label"} - set(split)
  if missing:
    raise ValueError(f"{name} split is missing the keys {sorted(missing)}.")
  images = np.asarray(split["image"])
  labels = np.asarray(split["label"])
  if images.ndim != 4:
    raise ValueError(
      f"{name} images must be 4-D [N, H, W, C], got shape {images.shape}."
    )
  if images.shape[1:] != info.image_shape:
    raise ValueError(
      f"{name} images have shape {images.shape[1:]} per image; dataset "
      f"{info.name!r} expects {info.image_shape}."
    )
  if labels.ndim != 1:
    raise ValueError(f"{name} labels must be 1-D [N], got {labels.shape}.")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"{name} split has {images.shape[0]} images but {labels.shape[0]} labels."
    )
  if images.shape[0] == 0:
    raise ValueError(f"{name} split is empty.")
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(
      f"{name} images must be floating point (normalised), got {images.dtype}."
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} labels must be integers, got {labels.dtype}.")
  finite = np.isfinite(images)
  if not finite.all():
    bad = np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))
    raise ValueError(
      f"{name} images contain NaN or Inf values in {bad.size} image(s), "
      f"first at index {bad[0]}."
    )
  out_of_range = (labels < 0) | (labels >= info.num_classes)
  if out_of_range.any():
    first = np.flatnonzero(out_of_range)[0]
    raise ValueError(
      f"{name} labels must lie in [0, {info.num_classes}); label "
      f"{labels[first]} at index {first} does not "
      f"({out_of_range.sum()} out of range)."
    )


# eq=False: field-wise equality would compare arrays elementwise and raise;
# two datasets are equal only if they are the same object.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Normalised in-memory splits plus their metadata.

  Each split is ``{"image": f32[N, H, W, C], "label": i32[N]}`` with images
  normalised by ``info.normalize``. All three splits are validated on
  construction (`validate_split`).

  Attributes:
    info: the dataset metadata.
    train: training split.
    validation: held-out split carved from the training data; all tuning
      happens here.
    test: test split; only reported.
  """

  info: DatasetInfo
  train: Split
  validation: Split
  test: Split

  def __post_init__(self):
    for name in SPLITS:
      validate_split(getattr(self, name), self.info, name=name)

  def split(self, name: str) -> Split:
    """Returns the split called `name` (``train``/``validation``/``test``)."""
    if name not in SPLITS:
      raise ValueError(f"Unknown split {name!r}; expected one of {SPLITS}.")
    return getattr(self, name)
