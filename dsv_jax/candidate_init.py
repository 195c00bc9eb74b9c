"""Candidates of synthesis: input checks and initialisations.

Synthesis starts from noise (`noise_init`), real images of the target
classes (`real_init`, the k-shot rows) or images of another dataset
(`other_init`, the 0-shot rows); `check_images` and `check_candidates`
check candidates against the model and their targets.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv_jax import checks, kkt
from dsv_jax.types import ApplyFn, Params


def check_images(
  x: Any, image_shape: Sequence[int] | None = None, *, name: str = "x0"
) -> None:
  """Checks candidate images; raises a clear `ValueError`.

  Checks rank 4, the per-image shape (if given), a floating dtype (images
  normalised as ``DatasetInfo.normalize`` does: integer pixels are never
  converted silently) and that every pixel is finite. Tracers (inside jit)
  get the shape and dtype checks only.
  """
  if checks.is_concrete(x):
    x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"{name} must be images [N, H, W, C], got {x.shape}.")
  if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
    raise ValueError(
      f"{name} has images of shape {tuple(x.shape[1:])}; the model expects "
      f"{tuple(image_shape)}."
    )
  checks.check_floating_images(x, name)
  if not checks.is_concrete(x):
    return
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(
      f"{name} contains NaN or Inf in {bad.size} image(s), first at index "
      f"{bad[0]}."
    )


def check_candidates(
  apply_fn: ApplyFn, params: Params, x0: jax.Array, targets: jax.Array
) -> None:
  """Raises ValueError unless candidates fit the model and their targets.

  ``x0`` must be images ``[N, H, W, C]`` the model accepts; ``targets``
  int labels ``[N]`` or soft targets ``float[N, C]`` matching the logits
  (label range and soft-row sums checked when concrete).
  """
  x0 = jnp.asarray(x0)
  targets = jnp.asarray(targets)
  check_images(x0)
  if x0.ndim != 4:
    raise ValueError(f"x0 must be images [N, H, W, C], got {x0.shape}.")
  try:
    out = jax.eval_shape(apply_fn, params, x0)
  except Exception as e:  # noqa: BLE001 -- reported, with e as the cause.
    raise ValueError(
      f"x0 of shape {x0.shape} does not fit the model "
      f"({checks.error_summary(e)})."
    ) from e
  if targets.ndim not in (1, 2) or targets.shape[0] != x0.shape[0]:
    raise ValueError(
      f"targets of shape {targets.shape} do not match the {x0.shape[0]} "
      "candidates of x0 (need int [N] or soft float [N, C])."
    )
  kkt.primal_loss(jnp.zeros(out.shape, jnp.float32), targets)


def noise_init(
  key: jax.Array, num: int, image_shape: Sequence[int], *, scale: float = 1.0
) -> jax.Array:
  """``num`` images of N(0, scale^2) noise in normalised space (Alg. 1)."""
  return scale * jax.random.normal(key, (num, *image_shape), jnp.float32)


def class_targets(num_per_class: int, num_classes: int) -> np.ndarray:
  """int32 ``[num_per_class * C]`` labels, class-major (0,0,..,1,1,..)."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), num_per_class)


def real_init(
  key: jax.Array, split: dict, labels: jax.typing.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
  """Real images of the requested classes (k-shot initialisation).

  For each class, distinct images of that class are drawn without
  replacement (a permutation from ``key``), in order of ``labels``.

  Args:
    key: PRNG key of the draw.
    split: ``{"image": [M, H, W, C], "label": [M]}``, e.g. the training split.
    labels: int ``[N]`` classes wanted.

  Returns:
    ``(images[N, H, W, C], indices[N])`` into ``split``.

  Raises:
    ValueError: a class has fewer images than requested.
  """
  labels = np.asarray(labels)
  split_labels = np.asarray(split["label"])
  order = np.asarray(jax.random.permutation(key, len(split_labels)))
  idx = np.empty(len(labels), np.int32)
  for c in np.unique(labels):
    pool = order[split_labels[order] == c]
    want = np.flatnonzero(labels == c)
    if len(pool) < len(want):
      raise ValueError(
        f"class {c}: {len(want)} real images requested, only {len(pool)} "
        "available."
      )
    idx[want] = pool[: len(want)]
  return np.asarray(split["image"])[idx], idx


def other_init(
  key: jax.Array,
  images: jax.typing.ArrayLike,
  num: int,
  *,
  src_info: Any,
  dst_info: Any,
) -> tuple[np.ndarray, np.ndarray]:
  """Images of another dataset mapped into this one (the 0-shot rows).

  Draws ``num`` images (without replacement) from ``images`` (normalised
  with ``src_info``), maps them to raw pixels, resizes them (bilinear,
  antialiased) to ``dst_info.image_shape``, converts channels (mean over
  channels to go to grey, repetition to go to colour) and normalises them
  with ``dst_info``.

  Returns:
    ``(images[num, H, W, C], indices[num])`` into ``images``.
  """
  images = np.asarray(images)
  checks.check_floating_images(images, "images")
  if num > len(images):
    raise ValueError(f"{num} images requested, {len(images)} available.")
  idx = np.asarray(jax.random.permutation(key, len(images)))[:num]
  raw = jnp.asarray(src_info.denormalize(images[idx]))
  h, w, c = dst_info.image_shape
  raw = jax.image.resize(raw, (num, h, w, raw.shape[-1]), "linear")
  if raw.shape[-1] != c:
    raw = jnp.mean(raw, axis=-1, keepdims=True)
    raw = jnp.repeat(raw, c, axis=-1)
  out = dst_info.normalize(np.asarray(jnp.clip(raw, 0.0, 1.0)))
  return out.astype(np.float32), idx.astype(np.int32)


__all__ = [
  "check_candidates",
  "check_images",
  "class_targets",
  "noise_init",
  "other_init",
  "real_init",
]
