"""Judges of synthesized samples that share nothing with the classifier.

Agreement of an independently trained ConvNet with a DSV's target shares
the architecture's inductive bias (adversarial features transfer), so it
can call noise a digit. These judges cannot:

* **classical agreement**: scikit-learn classifiers fitted on the real
  training pixels (raw values in [0, 1], flattened) -- logistic regression,
  an RBF SVM and 1-nearest-neighbour -- predict each sample's target
  class; the fraction they get right, per judge and on average;
* **nearest-real distance**: the L2 distance from each sample to the
  nearest real training image of its target class, in raw pixels and
  (optionally) in the classifier's penultimate features, next to the same
  distance for real held-out images (the scale of "looks like data").

They judge only: synthesis never sees them (no real data beyond its own
initialisation, no judge in the loss).
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from dsv_jax import checks

JUDGES = ("logistic", "rbf_svm", "1nn")


def _raw(images: np.ndarray, info: Any) -> np.ndarray:
  """Normalised images -> raw pixels in [0, 1], flattened ``[N, D]``."""
  images = checks.host_float32_images(images, "images")
  raw = np.clip(info.denormalize(images), 0.0, 1.0)
  return raw.reshape(len(raw), -1).astype(np.float32)


def _subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
  """A stratified random subset of at most ``size`` indices."""
  n = len(labels)
  if size <= 0 or size >= n:
    return np.arange(n)
  rng = np.random.default_rng(seed)
  picked = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    take = max(1, round(size * len(idx) / n))
    picked.append(rng.choice(idx, min(take, len(idx)), replace=False))
  return np.sort(np.concatenate(picked))


def fit_classical(
  images: np.ndarray,
  labels: np.ndarray,
  info: Any,
  *,
  max_train: int = 20000,
  svm_max_train: int = 5000,
  seed: int = 0,
) -> dict[str, Any]:
  """Fits the classical judges on real training images.

  Args:
    images: ``[N, H, W, C]`` normalised training images.
    labels: int ``[N]``.
    info: the dataset's `DatasetInfo` (for the raw pixel values).
    max_train: stratified subset size for logistic regression and 1-NN
      (20k keeps Fashion-MNIST's fit within a minute on 2 cores).
    svm_max_train: subset size for the RBF SVM (its fit is quadratic).
    seed: seed of the subsets.

  Returns:
    ``{name: fitted scikit-learn classifier}`` for every name in `JUDGES`.
  """
  labels = np.asarray(labels)
  raw = _raw(images, info)
  idx = _subset(labels, max_train, seed)
  svm_idx = _subset(labels, svm_max_train, seed)
  return {
    "logistic": LogisticRegression(max_iter=500).fit(raw[idx], labels[idx]),
    "rbf_svm": SVC(kernel="rbf", gamma="scale").fit(
      raw[svm_idx], labels[svm_idx]
    ),
    "1nn": KNeighborsClassifier(n_neighbors=1).fit(raw[idx], labels[idx]),
  }


def classical_agreement(
  judges: dict[str, Any], images: np.ndarray, targets: np.ndarray, info: Any
) -> dict[str, float]:
  """Fraction of samples each judge assigns to its target class.

  Args:
    judges: from `fit_classical`.
    images: ``[M, H, W, C]`` normalised samples (e.g. DSVs).
    targets: int ``[M]`` target classes (argmax of soft targets).
    info: the dataset's `DatasetInfo`.

  Returns:
    ``{judge: agreement}`` plus ``"mean"`` over the judges.
  """
  targets = np.asarray(targets)
  if len(images) == 0:
    raise ValueError("No samples to judge.")
  raw = _raw(images, info)
  out = {
    name: float(np.mean(judge.predict(raw) == targets))
    for name, judge in judges.items()
  }
  out["mean"] = float(np.mean(list(out.values())))
  return out


def _nearest_same_class(
  queries: np.ndarray,
  query_labels: np.ndarray,
  refs: np.ndarray,
  ref_labels: np.ndarray,
) -> np.ndarray:
  """Per query, the L2 distance to the nearest reference of its class."""
  out = np.empty(len(queries))
  for c in np.unique(query_labels):
    q = queries[query_labels == c].astype(np.float64)
    r = refs[ref_labels == c].astype(np.float64)
    if not len(r):
      raise ValueError(f"No reference sample of class {c}.")
    sq = (q * q).sum(1)[:, None] - 2 * q @ r.T + (r * r).sum(1)[None]
    out[query_labels == c] = np.sqrt(np.maximum(sq.min(1), 0))
  return out


def nearest_real_distance(
  images: np.ndarray,
  targets: np.ndarray,
  train_images: np.ndarray,
  train_labels: np.ndarray,
  info: Any,
  *,
  reference_images: np.ndarray | None = None,
  reference_labels: np.ndarray | None = None,
  features_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
  """Mean distance from each sample to the nearest real image of its class.

  In raw pixels (``pixels``) and, with ``features_fn`` (normalised images
  -> ``[M, F]`` features, e.g. the classifier's penultimate layer), in
  features (``features``). With ``reference_images`` (real held-out
  images, e.g. the validation split) the same distances of those real
  images are returned too (``*_real``): the scale a data-like sample
  should match.
  """
  targets = np.asarray(targets)
  train_labels = np.asarray(train_labels)
  out = {
    "pixels": float(
      _nearest_same_class(
        _raw(images, info), targets, _raw(train_images, info), train_labels
      ).mean()
    )
  }
  if reference_images is not None:
    out["pixels_real"] = float(
      _nearest_same_class(
        _raw(reference_images, info),
        np.asarray(reference_labels),
        _raw(train_images, info),
        train_labels,
      ).mean()
    )
  if features_fn is not None:
    train_f = features_fn(train_images)
    out["features"] = float(
      _nearest_same_class(
        features_fn(images), targets, train_f, train_labels
      ).mean()
    )
    if reference_images is not None:
      out["features_real"] = float(
        _nearest_same_class(
          features_fn(reference_images),
          np.asarray(reference_labels),
          train_f,
          train_labels,
        ).mean()
      )
  return out


__all__ = [
  "JUDGES",
  "classical_agreement",
  "fit_classical",
  "nearest_real_distance",
]
