"""Ranking of a fit's samples: scores, the top of every class, metrics."""

from typing import Literal, get_args

import jax
import numpy as np

from dsv_jax import checks

Score = Literal["contribution", "lambda"]
SCORES: tuple[Score, ...] = get_args(Score)
DEFAULT_SCORE: Score = "contribution"


def scores(
  lambdas: np.ndarray,
  weights: np.ndarray,
  *,
  score: Score = DEFAULT_SCORE,
  rankable: np.ndarray | None = None,
) -> np.ndarray:
  """Per-sample ranking scores.

  Args:
    lambdas: ``float[N]`` fitted multipliers.
    weights: ``||p_i - y_i||`` per sample (`FitInfo.weights`).
    score: ``"contribution"`` (``lambda_i ||p_i - y_i||``) or ``"lambda"``.
    rankable: optional ``bool[N]`` (`FitInfo.rankable`); the others score 0.

  Returns:
    ``float32[N]``; higher ranks first.
  """
  checks.check_choice("score", score, SCORES)
  lambdas = np.asarray(lambdas, np.float32)
  out = (
    lambdas * np.asarray(weights, np.float32)
    if score == "contribution"
    else lambdas
  )
  if rankable is not None:
    out = np.where(np.asarray(rankable, bool), out, 0).astype(np.float32)
  return out


def rank_per_class(
  scores: np.ndarray, labels: np.ndarray, num_classes: int
) -> list[np.ndarray]:
  """Indices of each class's samples, highest score first (ties: index)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    out.append(idx[np.argsort(-scores[idx], kind="stable")])
  return out


def top_per_class(
  scores: np.ndarray, labels: np.ndarray, num_classes: int, k: int
) -> np.ndarray:
  """The ``k`` highest-scoring indices of every class, class by class.

  Raises:
    ValueError: ``k < 1``, a class without samples, or a class with fewer
      than ``k`` samples.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  ranking = rank_per_class(scores, labels, num_classes)
  for c, idx in enumerate(ranking):
    if len(idx) == 0:
      raise ValueError(f"class {c} has no samples: nothing to select.")
  checks.check_class_sizes([len(idx) for idx in ranking], k, "to select")
  return np.concatenate([idx[:k] for idx in ranking])


def random_per_class(
  key: jax.Array, labels: np.ndarray, num_classes: int, k: int
) -> np.ndarray:
  """``k`` random indices of every class (the comparison set)."""
  labels = np.asarray(labels)
  sizes = [np.count_nonzero(labels == c) for c in range(num_classes)]
  checks.check_class_sizes(sizes, k, "to draw")
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    perm = np.asarray(
      jax.random.permutation(jax.random.fold_in(key, c), len(idx))
    )
    out.append(idx[perm[:k]])
  return np.concatenate(out)


def precision_recall_at_k(
  scores: np.ndarray, truth: np.ndarray, k: int | None = None
) -> tuple[float, float]:
  """Precision and recall of the top-``k`` scores against a true index set.

  ``k`` defaults to the size of the true set (then precision == recall).
  """
  truth = set(np.asarray(truth).tolist())
  k = len(truth) if k is None else k
  top = set(np.argsort(-np.asarray(scores), kind="stable")[:k].tolist())
  hits = len(top & truth)
  return hits / max(k, 1), hits / max(len(truth), 1)


def per_class_sums(
  values: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray:
  """``sum_{i in class c} values_i`` for every class c."""
  return np.bincount(
    np.asarray(labels),
    weights=np.asarray(values, np.float64),
    minlength=num_classes,
  )
