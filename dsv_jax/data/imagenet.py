"""ImageNet-1k classes and normalisation, for pretrained ImageNet classifiers.

The 1000 classes are in the standard label-index order shared by
torchvision's pretrained weights and TFDS `imagenet2012` (WordNet ids
sorted: index 0 is n01440764, tench). `imagenet_classes.tsv`, shipped
with the package, holds one ``wnid<TAB>readable name`` row per class
(torchvision's readable names, which are unique). The normalisation is
the one every torchvision ImageNet model was trained with, kept here and
nowhere else: images in the package's normalised space, NHWC.
"""

import functools
import importlib.resources

from dsv_jax.data.core import DatasetInfo

NAME = "imagenet2012"
NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


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
  "STD",
  "class_index",
  "class_names",
  "imagenet_info",
  "wordnet_ids",
]
