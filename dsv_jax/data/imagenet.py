"""ImageNet-1k classes and normalisation, for pretrained ImageNet classifiers.

The 1000 classes are in the standard label-index order shared by
torchvision's pretrained weights and TFDS `imagenet2012` (WordNet ids
sorted: index 0 is n01440764, tench). `imagenet_classes.tsv`, shipped
with the package, holds one ``wnid<TAB>readable name`` row per class
(torchvision's readable names, which are unique). The normalisation is
the one every torchvision ImageNet model was trained with, kept here and
nowhere else: images in the package's normalised space, NHWC.
`eval_transform` is torchvision's evaluation transform (resize the shorter
side, centre crop) that turns a photo of any size into a model input.
"""

import functools
import importlib.resources

import numpy as np

from dsv_jax.data.core import DatasetInfo

NAME = "imagenet2012"
NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
# torchvision's evaluation transform resizes the shorter side to 256 for a
# 224 crop; other crop sizes keep the ratio.
RESIZE_RATIO = 256 / 224
# Records in TFDS imagenet2012's splits (5.x): the ILSVRC2012 train and
# validation sets.
TRAIN_SIZE = 1_281_167
VALIDATION_SIZE = 50_000


@functools.cache
def _classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
  text = (
    importlib.resources.files("dsv_jax.data")
    .joinpath("imagenet_classes.tsv")
    .read_text(encoding="utf-8")
  )
  rows = [line.split("\t") for line in text.splitlines() if line]
  if len(rows) != NUM_CLASSES or any(len(r) != 2 for r in rows):
    raise ValueError(
      "dsv_jax/data/imagenet_classes.tsv is damaged: expected "
      f"{NUM_CLASSES} 'wnid<TAB>name' rows, got {len(rows)}."
    )
  wnids, names = zip(*rows, strict=True)
  return tuple(wnids), tuple(names)


def wordnet_ids() -> tuple[str, ...]:
  """The 1000 WordNet ids in label-index order (``n01440764`` first)."""
  return _classes()[0]


def class_names() -> tuple[str, ...]:
  """The 1000 readable class names in label-index order (``tench`` first)."""
  return _classes()[1]


def imagenet_info(image_size: int = DEFAULT_IMAGE_SIZE) -> DatasetInfo:
  """`DatasetInfo` of ImageNet-1k RGB images of ``image_size`` squared.

  Examples:
    >>> from dsv_jax.data import imagenet
    >>> info = imagenet.imagenet_info(224)
    >>> info.image_shape, info.num_classes, info.class_names[0]
    ((224, 224, 3), 1000, 'tench')
  """
  if int(image_size) < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}.")
  return DatasetInfo(
    name=NAME,
    num_classes=NUM_CLASSES,
    class_names=class_names(),
    image_shape=(int(image_size), int(image_size), 3),
    mean=MEAN,
    std=STD,
    source="tfds",
  )


def resize_size(image_size: int = DEFAULT_IMAGE_SIZE) -> int:
  """Shorter side that `eval_transform` resizes to: ``round(s * 256 / 224)``."""
  return round(int(image_size) * RESIZE_RATIO)


def eval_transform(
  image: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE
) -> np.ndarray:
  """torchvision's ImageNet evaluation transform on one uint8 RGB image.

  ``Resize(resize_size(image_size))`` then ``CenterCrop(image_size)``:
  bilinear resize (with PIL's antialiasing) of the shorter side, the longer
  side scaled and truncated to an integer, then the centred square. These
  are torchvision's exact rules for PIL images, so a converted torchvision
  model sees the pixels it was evaluated on.

  Args:
    image: ``uint8[H, W, 3]`` raw pixels, any ``H`` and ``W``.
    image_size: side of the square crop.

  Returns:
    ``uint8[image_size, image_size, 3]``, raw pixels (not normalised).

  Examples:
    >>> import numpy as np
    >>> from dsv_jax.data import imagenet
    >>> photo = np.zeros((375, 500, 3), np.uint8)
    >>> imagenet.eval_transform(photo, 224).shape
    (224, 224, 3)
  """
  # Imported here: only ImageNet loading needs it. Pillow comes with
  # matplotlib and is named in pyproject.toml.
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
      f"ImageNet images must be uint8 [H, W, 3], got {image.dtype} "
      f"{image.shape}."
    )
  size = int(image_size)
  if size < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}.")
  height, width = image.shape[:2]
  short = resize_size(size)
  # int(), not round(): torchvision truncates the longer side.
  if width <= height:
    new_width, new_height = short, int(short * height / width)
  else:
    new_width, new_height = int(short * width / height), short
  resized = np.asarray(
    Image.fromarray(image).resize(
      (new_width, new_height), Image.Resampling.BILINEAR
    )
  )
  # torchvision's centre: round half to even of the offset, as Python's round.
  top = int(round((new_height - size) / 2.0))
  left = int(round((new_width - size) / 2.0))
  return resized[top : top + size, left : left + size]


def class_index(spec: int | str) -> int:
  """The label index of an ImageNet class.

  Args:
    spec: an index (``34`` or ``"34"``), a WordNet id (``"n01945685"``) or
      a readable name (``"slug"``; surrounding spaces ignored, and case too
      where that leaves one class: ``"cardigan"`` and ``"Cardigan"``, the
      corgi, are both classes).

  Raises:
    ValueError: the index is out of range, no class has that id or name,
      or the name matches several classes once case is ignored.

  Examples:
    >>> from dsv_jax.data import imagenet
    >>> imagenet.class_index("slug"), imagenet.class_index("n01945685")
    (114, 114)
  """
  if isinstance(spec, bool):
    raise ValueError(f"ImageNet class {spec!r}: not an index, id or name.")
  text = str(spec).strip()
  if isinstance(spec, int) or text.isdigit():
    index = int(text)
    if not 0 <= index < NUM_CLASSES:
      raise ValueError(
        f"ImageNet class index {index} is out of range [0, {NUM_CLASSES})."
      )
    return index
  wnids, names = _classes()
  if text in wnids:
    return wnids.index(text)
  if text in names:  # Exact first: "Cardigan" (a corgi), "cardigan".
    return names.index(text)
  folded = [i for i, n in enumerate(names) if n.lower() == text.lower()]
  if len(folded) == 1:
    return folded[0]
  if folded:
    raise ValueError(
      f"ImageNet class {spec!r} is ambiguous: "
      + ", ".join(f"{names[i]!r} ({i})" for i in folded)
      + "; give the exact name or the index."
    )
  close = [n for n in names if text.lower() in n.lower()][:5]
  hint = f"; names containing it: {close}" if close else ""
  raise ValueError(
    f"ImageNet class {spec!r} is neither an index, a WordNet id "
    f"(e.g. n01945685) nor a class name (e.g. 'slug'){hint}."
  )


__all__ = [
  "DEFAULT_IMAGE_SIZE",
  "MEAN",
  "NAME",
  "NUM_CLASSES",
  "RESIZE_RATIO",
  "STD",
  "TRAIN_SIZE",
  "VALIDATION_SIZE",
  "class_index",
  "class_names",
  "eval_transform",
  "imagenet_info",
  "resize_size",
  "wordnet_ids",
]
