"""Specification tests of `dsv_jax.coreset`: herding against a brute-force
reading of its docstring (within each class, on L2-normalised features,
the t-th pick is the free sample minimising ||mu_c - (phi_1 + ... +
phi_t) / t||), and EL2N against its formula.
"""

import functools

import jax
import numpy as np
import pytest

from dsv_jax import coreset, models, retrain


def brute_force_herding(features, labels, num_classes, k):
  out = []
  for c in range(num_classes):
    members = [i for i in range(len(labels)) if labels[i] == c]
    phi = {i: features[i] / np.sqrt(np.sum(features[i] ** 2)) for i in members}
    mu = sum(phi.values()) / len(members)
    picked = []
    for t in range(1, k + 1):
      best, best_d = None, np.inf
      for i in members:
        if i in picked:
          continue
        mean = (sum(phi[j] for j in picked) + phi[i]) / t
        d = np.sqrt(np.sum((mu - mean) ** 2))
        if d < best_d:
          best, best_d = i, d
      picked.append(best)
    out.extend(picked)
  return np.array(out)


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 5), (2, 7)])
def test_herding_equals_brute_force_greedy(seed, k):
  rng = np.random.default_rng(seed)
  n, f, c = 36, 5, 3
  # Features of very different norms: the rule works on their directions.
  features = rng.standard_normal((n, f)) * rng.uniform(0.1, 10.0, (n, 1))
  features += np.array([1.0, 0.5, 0, 0, 0])  # a shared offset: mu_c != 0
  labels = rng.permutation(np.arange(n) % c)
  got = coreset.herding(features.astype(np.float32), labels, c, k)
  want = brute_force_herding(
    features.astype(np.float32).astype(np.float64), labels, c, k
  )
  np.testing.assert_array_equal(got, want)


def test_herding_known_answer_and_a_whole_class_is_a_permutation():
  # Class 0 in 2-D: directions at 0, 90 and 45 degrees (norms differ).
  # mu = (1 + 0 + 1/sqrt2, 0 + 1 + 1/sqrt2) / 3, along 45 degrees: the
  # first pick is sample 2 (45 degrees); the second, either of the others
  # (mean (phi_2 + phi_j) / 2), the lower index on the tie, sample 0.
  features = np.array([[3.0, 0.0], [0.0, 0.5], [2.0, 2.0], [1.0, 0.0]])
  labels = np.array([0, 0, 0, 1])
  np.testing.assert_array_equal(coreset.herding(features, labels, 2, 1), [2, 3])
  three = coreset.herding(features[:3], labels[:3], 1, 3)
  assert sorted(three.tolist()) == [0, 1, 2] and three[0] == 2


def test_el2n_is_the_mean_error_norm_over_the_models():
  # Learning rate 0: the K models stay at their initialisation
  # (`retrain.model_seeds`), so the score is computable by hand.
  @functools.cache
  def model_fn(seed):
    return models.functional(
      models.build_model(
        "mlp",
        image_shape=(3, 3, 1),
        num_classes=3,
        key=jax.random.key(seed),
        hidden=(4,),
      )
    )

  rng = np.random.default_rng(0)
  x = rng.standard_normal((9, 3, 3, 1)).astype(np.float32)
  y = (np.arange(9) % 3).astype(np.int32)
  got = coreset.el2n_scores(
    model_fn,
    x,
    y,
    num_models=2,
    steps=1,
    learning_rate=0.0,
    batch_size=9,
    weight_decay=0.0,
    flip=False,
    max_shift=0,
    seed=4,
    eval_batch_size=4,  # batches of 4, 4 and 1
  )
  norms = []
  for s in retrain.model_seeds(4, 2):
    fm = model_fn(int(s))
    logits = np.asarray(fm.eval_apply(fm.params, fm.state, x), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    norms.append(np.linalg.norm(p - np.eye(3)[y], axis=1))
  assert got.shape == (9,) and got.dtype == np.float32
  np.testing.assert_allclose(got, np.mean(norms, 0), rtol=1e-5)
  assert not np.allclose(norms[0], norms[1])  # the models differ
