"""Pretrained ImageNet classifiers: torchvision's ResNet-50 weights in Flax.

`torchvision_classifier()` downloads the weights through torchvision's own
loader (the `[torch]` extra) once, converts them (`torch_convert`) and
caches the result as an ordinary dsv_jax classifier directory (Orbax arrays
and a JSON record, `checkpoints.save_classifier`): every later call, on any
machine that has the cache, needs neither torch nor the network.

Images are NHWC in ImageNet's normalised space (``(x - MEAN) / STD`` of
pixels in [0, 1], `data.imagenet`), the space the whole package works in;
`data.imagenet.imagenet_info` describes it, and the DSV sets and PNG grids
undo it with the same statistics.
"""

import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from dsv_jax import checkpoints, models, torch_convert
from dsv_jax.data import DatasetInfo, imagenet
from dsv_jax.types import ApplyFn, Params

# torchvision model name -> its weights enum (torchvision.models.<enum>).
TORCHVISION_MODELS = {"resnet50": "ResNet50_Weights"}
DEFAULT_WEIGHTS = "IMAGENET1K_V1"  # The classic weights (76.1% top-1).
DEFAULT_CACHE_DIR = "~/.cache/dsv_jax/pretrained"

# (name, weights) -> a torchvision state_dict; `torchvision_state_dict` by
# default, replaced in tests (offline) and by users with their own files.
StateDictFn = Callable[[str, str], Mapping[str, Any]]


class Pretrained(NamedTuple):
  """A pretrained classifier in the package's terms."""

  apply_fn: ApplyFn  # (params, images) -> logits, inference mode.
  params: Params
  info: DatasetInfo
  path: str  # Its classifier directory in the cache.


def cache_path(name: str, weights: str, cache_dir: str | None = None) -> str:
  """Where `torchvision_classifier` keeps the converted classifier."""
  root = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
  return os.path.abspath(os.path.join(root, f"torchvision-{name}-{weights}"))


def torchvision_state_dict(name: str, weights: str) -> Mapping[str, Any]:
  """The state_dict of torchvision weights ``<name>`` / ``<weights>``.

  Downloads through torchvision's loader (cached by torch hub in
  ``$TORCH_HOME``).

  Raises:
    ImportError: torch/torchvision are not installed (the message says
      how to install them).
    OSError: the download failed (offline, say), in one line.
  """
  try:
    import torchvision
  except ImportError as e:
    raise ImportError(
      "Pretrained torchvision weights need torch and torchvision: "
      "pip install 'dsv_jax[torch]'."
    ) from e
  enum = getattr(torchvision.models, TORCHVISION_MODELS[name])
  if weights not in enum.__members__:
    raise ValueError(
      f"torchvision has no {name} weights {weights!r}; known: "
      f"{sorted(enum.__members__)}."
    )
  spec = enum[weights]
  try:
    return spec.get_state_dict(progress=True, check_hash=True)
  except Exception as e:  # urllib, http and hash errors alike.
    raise OSError(
      f"Could not download torchvision {name} weights {weights} from "
      f"{spec.url} ({type(e).__name__}: {e}). Run once where the network "
      "is reachable, or copy the converted cache directory there."
    ) from e


def _model(info: DatasetInfo, name: str):
  return models.build_model(
    name,
    image_shape=info.image_shape,
    num_classes=info.num_classes,
    key=jax.random.key(0),
  )


def _build(info: DatasetInfo, name: str):
  return models.functional(_model(info, name))


def _convert_into(path: str, name: str, weights: str, fn: StateDictFn) -> None:
  """Converts the weights and writes them at `path`, atomically: a run
  killed mid-write leaves no half-written cache, only a temp directory the
  next call removes."""
  arrays = torch_convert.resnet50_from_torch(fn(name, weights))
  info = imagenet.imagenet_info()
  num_classes = arrays["params"]["fc"]["bias"].shape[0]
  if num_classes != info.num_classes:
    raise ValueError(
      f"torchvision {name} {weights} has {num_classes} classes; ImageNet-1k "
      f"has {info.num_classes}."
    )
  # Every array must fit the Flax model before anything is cached. Shapes
  # only: initialising 25.6M parameters to discard them costs seconds.
  fm = models.functional(nnx.eval_shape(lambda: _model(info, name)))
  want = jax.tree.map(np.shape, {"params": fm.params, "model_state": fm.state})
  got = jax.tree.map(np.shape, arrays)
  if want != got:
    raise ValueError(f"Converted {name} {weights} does not fit the model.")
  meta = {
    "model": {"name": name, "kwargs": {}},
    "dataset": info.to_dict(),
    "seed": 0,
    "source": f"torchvision:{name}:{weights}",
  }
  tmp = f"{path}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  checkpoints.save_classifier(tmp, arrays, meta)
  try:
    os.replace(tmp, path)
  except OSError:
    # Another process sharing the cache (several hosts on one file system)
    # finished first: its copy is the same conversion.
    if not os.path.isfile(os.path.join(path, "meta.json")):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def ensure_cached(
  name: str = "resnet50",
  *,
  weights: str = DEFAULT_WEIGHTS,
  cache_dir: str | None = None,
  state_dict_fn: StateDictFn | None = None,
) -> str:
  """The cached classifier directory of torchvision ``name``/``weights``,
  downloading and converting it first if it is not there yet."""
  if name not in TORCHVISION_MODELS:
    raise ValueError(
      f"No pretrained torchvision model {name!r}; known: "
      f"{sorted(TORCHVISION_MODELS)}."
    )
  path = cache_path(name, weights, cache_dir)
  if not os.path.isfile(os.path.join(path, "meta.json")):
    if jax.process_count() > 1:
      # Orbax saves collectively, and hosts of a pod slice have disks of
      # their own: converting inside a multi-process run would leave the
      # cache on one host only.
      raise FileNotFoundError(
        f"No converted {name} {weights} in {path}: in a multi-process run "
        "it must be cached on every host first; run `python -m "
        "dsv_jax.pretrained` there (one process)."
      )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _convert_into(path, name, weights, state_dict_fn or torchvision_state_dict)
  return path


def torchvision_classifier(
  name: str = "resnet50",
  *,
  weights: str = DEFAULT_WEIGHTS,
  cache_dir: str | None = None,
  state_dict_fn: StateDictFn | None = None,
) -> Pretrained:
  """torchvision's pretrained ``name`` as ``(apply_fn, params, info, path)``.

  Args:
    name: a torchvision model (`TORCHVISION_MODELS`).
    weights: a member of its weights enum (``IMAGENET1K_V1``, ...).
    cache_dir: folder of converted classifiers (default
      ``~/.cache/dsv_jax/pretrained``).
    state_dict_fn: ``(name, weights) -> state_dict``, called only when the
      cache misses (default: torchvision's download).

  Returns:
    A `Pretrained`: ``apply_fn(params, x[B, H, W, 3]) -> logits[B, 1000]``
    with BatchNorm on its running statistics, for normalised images of any
    size (the network pools globally; it was trained at 224).

  Examples:
    >>> from dsv_jax import pretrained
    >>> apply_fn, params, info, _ = pretrained.torchvision_classifier(
    ...     "resnet50")  # doctest: +SKIP
  """
  path = ensure_cached(
    name, weights=weights, cache_dir=cache_dir, state_dict_fn=state_dict_fn
  )
  meta = checkpoints.load_classifier_meta(path)
  info = DatasetInfo.from_dict(meta["dataset"])
  fm = _build(info, name)
  arrays = checkpoints.load_classifier_arrays(
    path, {"params": fm.params, "model_state": fm.state}
  )
  state = arrays["model_state"]

  def apply_fn(params, x):
    return fm.eval_apply(params, state, x)

  return Pretrained(apply_fn, arrays["params"], info, path)


def main(argv: list[str] | None = None) -> None:
  """`python -m dsv_jax.pretrained [--name resnet50] [--weights W]
  [--cache_dir DIR]`: download and convert once, print the cache path."""
  import argparse

  p = argparse.ArgumentParser(prog="python -m dsv_jax.pretrained")
  p.add_argument(
    "--name", default="resnet50", choices=sorted(TORCHVISION_MODELS)
  )
  p.add_argument("--weights", default=DEFAULT_WEIGHTS)
  p.add_argument("--cache_dir", default=None)
  args = p.parse_args(argv)
  print(
    ensure_cached(args.name, weights=args.weights, cache_dir=args.cache_dir)
  )


__all__ = [
  "DEFAULT_CACHE_DIR",
  "DEFAULT_WEIGHTS",
  "TORCHVISION_MODELS",
  "Pretrained",
  "cache_path",
  "ensure_cached",
  "torchvision_classifier",
  "torchvision_state_dict",
]


if __name__ == "__main__":
  main()
