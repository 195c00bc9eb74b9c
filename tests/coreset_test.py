"""Coreset baselines: herding's greedy rule and EL2N against references."""

import functools

import jax
import numpy as np
import pytest

from dsv_jax import coreset, models, retrain

SHAPE = (4, 4, 1)
C = 3


def test_herding_known_answer():
  # Class 0 in 1-D features (normalised to unit length in 2-D): the mean
  # direction is 45 degrees; the first pick is the sample nearest to it, the
  # second the one that brings the running mean back towards it.
  ang = np.deg2rad([0.0, 40.0, 90.0, 80.0])
  feats = np.stack([np.cos(ang), np.sin(ang)], 1) * [[1], [3], [2], [5]]
  labels = np.array([0, 0, 0, 0, 1, 1])
  feats = np.concatenate([feats, [[1.0, 0.0], [0.0, 1.0]]])
  got = coreset.herding(feats, labels, 2, 2)
  # Reference: the greedy rule written out with explicit loops.
  phi = feats / np.linalg.norm(feats, axis=1, keepdims=True)
  want = []
  for c in range(2):
    idx = list(np.flatnonzero(labels == c))
    mu = phi[idx].mean(0)
    chosen = []
    for t in range(1, 3):
      best = min(
        (i for i in idx if i not in chosen),
        key=lambda i: np.linalg.norm(mu - (phi[chosen].sum(0) + phi[i]) / t),
      )
      chosen.append(best)
    want += chosen
  np.testing.assert_array_equal(got, want)
  assert got[0] == 1  # 40 degrees: nearest to the 52.5-degree mean.
  with pytest.raises(ValueError, match="class 1 has 2 samples"):
    coreset.herding(feats, labels, 2, 3)


@functools.cache
def _mlp(seed):
  return models.functional(
    models.build_model(
      "mlp",
      image_shape=SHAPE,
      num_classes=C,
      key=jax.random.key(seed),
      hidden=(8,),
    )
  )


def test_el2n_scores_match_the_trained_models():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, *SHAPE)).astype(np.float32)
  y = (np.arange(30) % C).astype(np.int32)
  recipe = {
    "steps": 4,
    "learning_rate": 1e-2,
    "batch_size": 8,
    "weight_decay": 5e-3,
    "flip": False,
    "max_shift": 0,
    "seed": 1,
  }
  got = coreset.el2n_scores(
    _mlp, x, y, num_models=2, eval_batch_size=7, **recipe
  )
  res = retrain.retrain(
    _mlp, x, y, x[:1], y[:1], num_models=2, vectorize="unroll", **recipe
  )
  fm = _mlp(0)
  norms = []
  for k in range(2):
    params = jax.tree.map(lambda a, k=k: a[k], res.params)
    state = jax.tree.map(lambda a, k=k: a[k], res.model_state)
    p = np.asarray(jax.nn.softmax(fm.eval_apply(params, state, x)))
    norms.append(np.linalg.norm(p - np.eye(C)[y], axis=1))
  np.testing.assert_allclose(got, np.mean(norms, 0), rtol=1e-5, atol=1e-6)
  assert got.shape == (30,) and np.all((got >= 0) & (got <= np.sqrt(2)))


def test_features_of_batches():
  fm = _mlp(0)
  x = np.random.default_rng(1).normal(size=(11, *SHAPE)).astype(np.float32)
  fn = lambda p, xx: fm.eval_features(p, fm.state, xx)  # noqa: E731
  got = coreset.features_of(fn, fm.params, x, batch_size=4)
  np.testing.assert_allclose(got, fn(fm.params, x), rtol=1e-6)
  assert got.shape == (11, 8)
