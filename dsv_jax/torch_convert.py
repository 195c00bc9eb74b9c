"""torchvision ``state_dict`` -> dsv_jax ResNet-50 params and BatchNorm state.

Needs only numpy: a ``state_dict`` of torch tensors is read through
``.detach().cpu().numpy()`` (or of numpy arrays as they are), so torch is
needed to *produce* one (the `[torch]` extra), never to import this module.
Layouts: a PyTorch convolution weight ``[out, in, kh, kw]`` becomes a Flax
kernel ``[kh, kw, in, out]``, a linear weight ``[out, in]`` a kernel
``[in, out]``; BatchNorm's ``weight``/``bias`` are the params ``scale``/
``bias`` and ``running_mean``/``running_var`` the state ``mean``/``var``.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from dsv_jax import resnet


def _np(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor.
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def _names() -> list[tuple[str, tuple[Any, ...], str]]:
  """(torch prefix, our path, kind) of every layer of ResNet-50."""
  out = [("conv1", ("conv1",), "conv"), ("bn1", ("bn1",), "bn")]
  for block in resnet.blocks():
    layer = f"layer{block.stage + 1}"
    pre, path = f"{layer}.{block.index}", (layer, block.index)
    for j in (1, 2, 3):
      out.append((f"{pre}.conv{j}", (*path, f"conv{j}"), "conv"))
      out.append((f"{pre}.bn{j}", (*path, f"bn{j}"), "bn"))
    if block.downsample:
      out.append((f"{pre}.downsample.0", (*path, "downsample_conv"), "conv"))
      out.append((f"{pre}.downsample.1", (*path, "downsample_bn"), "bn"))
  out.append(("fc", ("fc",), "linear"))
  return out


def _put(tree: dict, path: tuple[Any, ...], leaf: dict) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = leaf


def resnet50_from_torch(
  state_dict: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
  """Converts torchvision ResNet-50 weights to ``{"params", "model_state"}``.

  The result has the structure of `models.functional(ResNet50(...))`'s
  ``params`` and ``state`` (nested dicts of float32 numpy arrays), for any
  number of classes (read off ``fc.weight``).

  Raises:
    ValueError: a tensor is missing, left over, or has the wrong number of
      dimensions (the message names it), e.g. the state_dict is not a
      ResNet-50's. Sizes within a dimension are not checked here.
  """
  sd = {k: v for k, v in state_dict.items() if "num_batches_tracked" not in k}
  params: dict = {}
  state: dict = {}
  used: set[str] = set()

  def take(name: str, ndim: int) -> np.ndarray:
    if name not in sd:
      raise ValueError(f"state_dict has no {name!r}: not a ResNet-50's.")
    used.add(name)
    value = _np(sd[name])
    if value.ndim != ndim:
      raise ValueError(
        f"state_dict[{name!r}] has shape {value.shape}; expected {ndim} dims."
      )
    return value

  for prefix, path, kind in _names():
    if kind == "conv":
      w = take(f"{prefix}.weight", 4)
      _put(params, path, {"kernel": w.transpose(2, 3, 1, 0)})
    elif kind == "linear":
      _put(
        params,
        path,
        {
          "kernel": take(f"{prefix}.weight", 2).T,
          "bias": take(f"{prefix}.bias", 1),
        },
      )
    else:
      _put(
        params,
        path,
        {
          "scale": take(f"{prefix}.weight", 1),
          "bias": take(f"{prefix}.bias", 1),
        },
      )
      _put(
        state,
        path,
        {
          "mean": take(f"{prefix}.running_mean", 1),
          "var": take(f"{prefix}.running_var", 1),
        },
      )
  extra = sorted(set(sd) - used)
  if extra:
    raise ValueError(
      f"state_dict has {len(extra)} tensors a ResNet-50 does not, e.g. "
      f"{extra[:3]}."
    )
  return {"params": params, "model_state": state}


__all__ = ["resnet50_from_torch"]
