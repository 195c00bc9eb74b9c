"""Specification tests of `dsv_jax.select`'s outputs: every number a fit or
a selection returns is recomputed here from its documented definition
(`FitInfo`, `Selection`, `scores`, `precision_recall_at_k`,
`random_per_class`), with numpy and the public `kkt` products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import kkt, select

N, D, H, C = 30, 4, 3, 3


def apply_fn(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  params = {
    "w1": jnp.asarray(rng.standard_normal((D, H)), jnp.float32),
    "w2": jnp.asarray(rng.standard_normal((H, C)), jnp.float32),
    "b": jnp.asarray(0.3 * rng.standard_normal(C), jnp.float32),
  }
  x = rng.standard_normal((N, D)).astype(np.float32)
  labels = (np.arange(N) % C).astype(np.int32)
  # "b" is left out of the fit, so the represented part of theta* and the
  # whole of it differ.
  mask = {"w1": True, "w2": True, "b": False}
  return params, x, labels, mask


# Few iterations: lambda is still spread over many samples, so every
# rank of the selection is decided by a distinct score.
FIT = dict(max_iters=3, chunk_size=16)


@pytest.fixture(scope="module")
def fitted(problem):
  params, x, labels, mask = problem
  return select.fit_lambdas(apply_fn, params, x, labels, wrt=mask, **FIT)


def _sq(tree, keep=None):
  leaves = jax.tree.leaves(tree)
  keep = [True] * len(leaves) if keep is None else keep
  return sum(
    float(np.vdot(a, a)) for a, k in zip(leaves, keep, strict=True) if k
  )


def test_residuals_and_distance_have_their_documented_denominators(
  problem, fitted
):
  params, x, labels, mask = problem
  lambdas, info = fitted
  g = kkt.weighted_loss_grad(apply_fn, params, x, labels, lambdas)
  r = jax.tree.map(jnp.add, params, g)
  keep = jax.tree.leaves(mask)
  # residual: ||theta_S + (G lambda)_S|| / ||theta_S||, S the represented
  # leaves; residual_all: the same over all of theta*.
  want = np.sqrt(_sq(r, keep) / _sq(params, keep))
  want_all = np.sqrt(_sq(r) / _sq(params))
  assert abs(want - want_all) > 0.05  # the two must be told apart
  np.testing.assert_allclose(info.residual, want, rtol=2e-4)
  np.testing.assert_allclose(info.residual_all, want_all, rtol=2e-4)
  # distance (default l2_sq) over the represented part only.
  np.testing.assert_allclose(info.distance, _sq(r, keep), rtol=5e-4)
  # The stand-alone diagnostic returns the same pair, in that order.
  got = select.stationarity_residuals(
    apply_fn, params, x, labels, lambdas, mask=mask, chunk_size=16
  )
  np.testing.assert_allclose(got, (want, want_all), rtol=2e-4)


def test_l1_mean_distance_is_a_mean_over_the_represented_scalars(problem):
  params, x, labels, mask = problem
  lambdas, info = select.fit_lambdas(
    apply_fn,
    params,
    x,
    labels,
    wrt=mask,
    distance="l1_mean",
    max_iters=3,
    chunk_size=16,
  )
  g = kkt.weighted_loss_grad(apply_fn, params, x, labels, lambdas)
  r = np.concatenate([np.ravel(params[k] + g[k]) for k in params if mask[k]])
  np.testing.assert_allclose(info.distance, np.mean(np.abs(r)), rtol=5e-4)


def test_weights_scores_and_rankable_follow_their_definitions(problem, fitted):
  params, x, labels, _ = problem
  lambdas, info = fitted
  logits = np.asarray(apply_fn(params, x), np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  weights = np.linalg.norm(p - np.eye(C)[labels], axis=1)
  np.testing.assert_allclose(info.weights, weights, rtol=1e-4)
  assert lambdas.shape == (N,) and np.all(lambdas >= 0)
  # Rankable samples are classified as their target.
  correct = logits.argmax(1) == labels
  assert info.rankable.any() and not info.rankable[~correct].any()
  # scores: the contribution lambda_i ||p_i - y_i||, 0 where not rankable.
  want = np.where(info.rankable, lambdas * weights, 0.0)
  np.testing.assert_allclose(info.scores, want, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(info.contribution, np.sum(lambdas * weights), 1e-4)
  assert np.count_nonzero(info.scores) > C  # a ranking with content


def _top_by_hand(s, labels, k):
  out = []
  for c in range(C):
    idx = np.flatnonzero(labels == c)
    order = sorted(idx, key=lambda i: (-s[i], i))
    out.extend(order[:k])
  return np.array(out)


@pytest.mark.parametrize("score", select.SCORES)
def test_selection_scores_are_the_ranking_it_used(problem, fitted, score):
  params, x, labels, mask = problem
  lambdas, info = fitted
  k = 4
  sel = select.select_dsvs(
    apply_fn, params, x, labels, k=k, score=score, wrt=mask, **FIT
  )
  np.testing.assert_array_equal(sel.lambdas, lambdas)  # the same fit
  s = np.where(
    info.rankable, lambdas * (info.weights if score == "contribution" else 1), 0
  )
  np.testing.assert_array_equal(sel.indices, _top_by_hand(s, labels, k))
  np.testing.assert_array_equal(sel.labels, labels[sel.indices])
  np.testing.assert_allclose(sel.scores, s[sel.indices], rtol=1e-5)
  # Class by class, the highest score first.
  per_class = sel.scores.reshape(C, k)
  assert np.all(np.diff(per_class, axis=1) <= 0)
  if score == "contribution":
    np.testing.assert_allclose(sel.scores, info.scores[sel.indices], 1e-6)


def test_precision_recall_at_k_known_answer():
  scores = np.array([0.9, 0.1, 0.8, 0.7, 0.3, 0.2])
  truth = np.array([0, 4])
  # top-3 = {0, 2, 3}: one hit; precision 1/3, recall 1/2 (in that order).
  assert select.precision_recall_at_k(scores, truth, k=3) == (1 / 3, 1 / 2)
  # top-1 = {0}: precision 1, recall 1/2.
  assert select.precision_recall_at_k(scores, truth, k=1) == (1.0, 0.5)
  # k defaults to |truth| = 2: top-2 = {0, 2}, precision = recall = 1/2.
  assert select.precision_recall_at_k(scores, truth) == (0.5, 0.5)
  # Ties go to the lower index.
  tied = np.array([1.0, 1.0, 1.0])
  assert select.precision_recall_at_k(tied, [0], k=1) == (1.0, 1.0)
  assert select.precision_recall_at_k(tied, [2], k=1) == (0.0, 0.0)


def test_rank_and_top_per_class_known_answer():
  s = np.array([0.5, 0.9, 0.5, 0.1, 0.7, 0.3])
  y = np.array([0, 1, 0, 1, 0, 1])
  ranking = select.rank_per_class(s, y, 2)
  np.testing.assert_array_equal(ranking[0], [4, 0, 2])  # tie 0/2: index
  np.testing.assert_array_equal(ranking[1], [1, 5, 3])
  np.testing.assert_array_equal(select.top_per_class(s, y, 2, 2), [4, 0, 1, 5])


def test_random_per_class_draws_each_class_uniformly_and_independently():
  labels = np.repeat(np.arange(3), 8)[np.random.default_rng(0).permutation(24)]
  k, trials = 3, 200
  counts = np.zeros(24)
  same_positions = 0
  draws = set()
  for t in range(trials):
    got = select.random_per_class(jax.random.key(t), labels, 3, k)
    assert got.shape == (3 * k,)
    for c in range(3):
      part = got[c * k : (c + 1) * k]
      assert np.all(labels[part] == c) and len(set(part)) == k
    counts[got] += 1
    # Position within each class of the drawn samples: classes use
    # independent draws, so they rarely coincide.
    pos = [
      tuple(
        np.searchsorted(np.flatnonzero(labels == c), got[c * k : (c + 1) * k])
      )
      for c in range(3)
    ]
    same_positions += pos[0] == pos[1] == pos[2]
    draws.add(tuple(got))
  assert len(draws) == trials  # the key matters
  assert same_positions <= 2
  # Every sample is drawn with probability k / 8 per trial: 75 expected,
  # sd about 6.8.
  assert counts.min() > 45 and counts.max() < 105, counts
  # Same key, same draw.
  np.testing.assert_array_equal(
    select.random_per_class(jax.random.key(5), labels, 3, k),
    select.random_per_class(jax.random.key(5), labels, 3, k),
  )


def test_per_class_sums_and_prob_residual_known_answers():
  np.testing.assert_array_equal(
    select.per_class_sums([1.0, 2.0, 4.0, 8.0], [2, 0, 2, 0], 4),
    [10.0, 0.0, 5.0, 0.0],
  )
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
  # softmax - onehot: for int labels and for the same soft targets.
  want = np.array([[-0.5, 0.25, 0.25], [0.1, 0.2, -0.3]])
  np.testing.assert_allclose(
    select.prob_residual(logits, jnp.array([0, 2])), want, atol=1e-6
  )
  np.testing.assert_allclose(
    select.prob_residual(logits, jnp.eye(3)[jnp.array([0, 2])]),
    want,
    atol=1e-6,
  )


def test_scores_of_each_kind_known_answer():
  lam = np.array([2.0, 1.0, 4.0])
  w = np.array([0.5, 3.0, 0.25])
  np.testing.assert_allclose(select.scores(lam, w), [1.0, 3.0, 1.0])
  np.testing.assert_allclose(select.scores(lam, w, score="lambda"), lam)
  np.testing.assert_allclose(
    select.scores(lam, w, rankable=np.array([True, False, True])),
    [1.0, 0.0, 1.0],
  )
