"""Coreset baselines that DSV selection is measured against.

A coreset of k training images per class is judged by training fresh models
on it (`dsv_jax.retrain`). Besides random images, two standard selections
serve as yardsticks:

* **herding** (Welling 2009; iCaRL's exemplar selection; a baseline of the
  dataset-condensation papers): per class, greedily pick the sample that
  brings the mean of the picked samples' (L2-normalised) penultimate
  features closest to the class mean -- a representative, not a boundary,
  set;
* **EL2N** (Paul et al., 2021): the error L2 norm ``||softmax(f(x)) - y||``
  averaged over a few models trained briefly on the full set; the highest
  scores are the hardest samples (the data-pruning papers keep them).

Everything here is a pure function of arrays (or of a ``model_fn`` for
EL2N); the report's coreset section combines them.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv_jax import checks, retrain
from dsv_jax.types import Params, PyTree


def features_of(
  features_fn: Callable[[Params, jax.Array], jax.Array],
  params: Params,
  images: np.ndarray,
  *,
  batch_size: int = 1000,
) -> np.ndarray:
  """``features_fn(params, x)`` over ``images`` in batches, ``float32[N, F]``.

  The function is jitted with ``params`` as an argument (one compile).
  """
  checks.check_floating_images(images, "images")
  fn = jax.jit(features_fn)
  out = [
    np.asarray(fn(params, images[i : i + batch_size]))
    for i in range(0, len(images), batch_size)
  ]
  return np.concatenate(out).astype(np.float32)


def herding(
  features: np.ndarray, labels: np.ndarray, num_classes: int, k: int
) -> np.ndarray:
  """Herding selection: ``k`` indices per class, class by class.

  Within class c, features are L2-normalised and the t-th pick is the
  not-yet-picked sample minimising ``||mu_c - (phi_1 + ... + phi_t) / t||``
  with ``mu_c`` the class mean (iCaRL's exemplar rule).

  Args:
    features: ``[N, F]`` penultimate features of the training samples.
    labels: int ``[N]``.
    num_classes: C.
    k: samples per class.

  Returns:
    int ``[C * k]`` indices, in pick order within each class.
  """
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  if features.ndim != 2 or len(features) != len(labels):
    raise ValueError(
      f"features must be [N, F] with N = {len(labels)} labels, got "
      f"{features.shape}."
    )
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  phi = features / np.maximum(norms, 1e-12)
  sizes = [np.count_nonzero(labels == c) for c in range(num_classes)]
  checks.check_class_sizes(sizes, k, "to pick")
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    f = phi[idx]
    mu = f.mean(0)
    total = np.zeros_like(mu)
    free = np.ones(len(idx), bool)
    for t in range(1, k + 1):
      dist = np.linalg.norm(mu[None] - (total[None] + f) / t, axis=1)
      dist[~free] = np.inf
      j = int(np.argmin(dist))
      free[j] = False
      total += f[j]
      out.append(idx[j])
  return np.asarray(out, np.int64)


def el2n_scores(
  model_fn: retrain.ModelFn,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_models: int,
  steps: int,
  learning_rate: float,
  batch_size: int,
  weight_decay: float,
  flip: bool,
  max_shift: int,
  seed: int,
  eval_batch_size: int = 1000,
) -> np.ndarray:
  """EL2N scores: ``E_models ||softmax(f(x_i)) - y_i||`` early in training.

  Trains ``num_models`` fresh models (``model_fn`` seeds from ``seed``) on
  the whole set for ``steps`` steps of the given recipe (Paul et al. score
  after a small fraction of training) and averages the error L2 norm over
  them. Higher = harder.

  Returns:
    ``float32[N]``.
  """
  images = checks.host_float32_images(images, "images")
  labels = np.asarray(labels, np.int32)
  res = retrain.retrain(
    model_fn,
    images,
    labels,
    images[:1],
    labels[:1],
    num_models=num_models,
    steps=steps,
    learning_rate=learning_rate,
    batch_size=batch_size,
    weight_decay=weight_decay,
    flip=flip,
    max_shift=max_shift,
    seed=seed,
    vectorize="unroll",
  )
  fm = model_fn(0)

  @jax.jit
  def error_norms(params: PyTree, state: PyTree, x, y):
    logits = jax.vmap(fm.eval_apply, in_axes=(0, 0, None))(params, state, x)
    r = jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[-1])
    return jnp.mean(jnp.sqrt(jnp.sum(r * r, -1)), 0)

  out = [
    np.asarray(
      error_norms(
        res.params,
        res.model_state,
        images[i : i + eval_batch_size],
        labels[i : i + eval_batch_size],
      )
    )
    for i in range(0, len(images), eval_batch_size)
  ]
  return np.concatenate(out).astype(np.float32)


__all__ = ["el2n_scores", "features_of", "herding"]
