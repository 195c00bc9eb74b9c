"""Reader for the IDX format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number -- two zero bytes, a type code, the
number of dimensions -- then one big-endian uint32 per dimension, then the
values in C order, big-endian. Files may be gzip-compressed (``.gz``).
"""

import gzip
import os
import zlib

import numpy as np

# IDX type code -> numpy dtype (big-endian, as the format stores values).
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}

# File stems of the two splits, as distributed by LeCun and Zalando.
_SPLIT_STEMS = {"train": "train", "test": "t10k"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (plain or ``.gz``) into a numpy array.

  Args:
    path: the file; a name ending in ``.gz`` is decompressed.

  Returns:
    The array, with the file's dimensions and native-endian dtype.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not valid IDX: bad gzip stream, wrong magic
      number, unknown type code, or a size that does not match the header.
  """
  path = os.fspath(path)
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated gzip data ({e}).") from e

  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(
      f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; "
      "expected two zero bytes, a type code and a dimension count)."
    )
  type_code, ndim = raw[2], raw[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(
      f"{path}: unknown IDX type code {type_code:#04x}; expected one of "
      f"{[hex(c) for c in _IDX_DTYPES]}."
    )
  if ndim == 0:
    raise ValueError(f"{path}: IDX header declares 0 dimensions.")
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise ValueError(
      f"{path}: truncated IDX header ({len(raw)} bytes, need {header_size})."
    )
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  dtype = _IDX_DTYPES[type_code]
  expected = header_size + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
      f"{path}: {len(raw)} bytes but the header (shape {shape}, "
      f"{dtype.name}) implies {expected}; the file is truncated or corrupt."
    )
  data = np.frombuffer(raw, dtype, offset=header_size).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _find_file(folder: str, stem: str, kind: str) -> str | None:
  """The first existing spelling of an IDX file, plain preferred over .gz."""
  ndim = 3 if kind == "images" else 1
  # Both `train-images-idx3-ubyte` (original) and `train-images.idx3-ubyte`
  # (common re-distribution) spellings are in circulation.
  for sep in ("-", "."):
    for ext in ("", ".gz"):
      path = os.path.join(folder, f"{stem}-{kind}{sep}idx{ndim}-ubyte{ext}")
      if os.path.isfile(path):
        return path
  return None


def has_idx_files(folder: str) -> bool:
  """Whether `folder` holds the four IDX files of a train/test dataset."""
  return all(
    _find_file(folder, stem, kind) is not None
    for stem in _SPLIT_STEMS.values()
    for kind in ("images", "labels")
  )


def load_idx_folder(folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads the train and test splits of an IDX folder.

  Args:
    folder: directory with ``train-images-idx3-ubyte[.gz]``,
      ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
      ``t10k-labels-idx1-ubyte[.gz]``.

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}`` with images
    ``uint8[N, H, W, 1]`` and labels ``int32[N]``.

  Raises:
    FileNotFoundError: a file is missing (the message lists the names).
    ValueError: a file is not valid IDX, images are not 8-bit 3-D, or labels
      are not 1-D.
  """
  splits = {}
  for split, stem in _SPLIT_STEMS.items():
    paths = {
      kind: _find_file(folder, stem, kind) for kind in ("images", "labels")
    }
    for kind, path in paths.items():
      if path is None:
        ndim = 3 if kind == "images" else 1
        raise FileNotFoundError(
          f"No {stem}-{kind}-idx{ndim}-ubyte[.gz] in {folder}."
        )
    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"])
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(
        f"{paths['images']}: expected 8-bit images [N, H, W], got "
        f"{images.dtype} with shape {images.shape}."
      )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
        f"{paths['labels']}: expected integer labels [N], got "
        f"{labels.dtype} with shape {labels.shape}."
      )
    splits[split] = (images[..., None], labels.astype(np.int32))
  return splits
