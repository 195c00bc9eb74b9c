"""Selection: the matrix-free solver, the SVM property, the select stage."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls
from sklearn.svm import SVC

from dsv_jax import (
  artifacts,
  checkpoints,
  configs,
  kkt,
  parallel,
  select,
)
from dsv_jax.experiment import common, registry
from dsv_jax.experiment import workdir as wdir
from dsv_jax.experiment.stages import select as select_stage
from dsv_jax.select import progress


def _linear(p, x):
  return x @ p["w"] + p["b"]


def _mlp(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]


def _mlp_problem(n=40, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w1": jax.random.normal(k[0], (4, 3)),
    "w2": jax.random.normal(k[1], (3, 3)),
    "b": 0.1 * jax.random.normal(k[2], (3,)),
  }
  x = np.asarray(jax.random.normal(k[3], (n, 4)))
  labels = np.arange(n, dtype=np.int32) % 3
  return params, x, labels


def _flat(tree, n):
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(a).reshape(n, -1) for a in leaves], 1).T


def _linear_problem(n=40):
  k = jax.random.split(jax.random.key(0), 3)
  params = {
    "w": jax.random.normal(k[0], (6, 3)),
    "b": 0.1 * jax.random.normal(k[1], (3,)),
  }
  x = np.asarray(jax.random.normal(k[2], (n, 6)))
  return params, x, np.arange(n, dtype=np.int32) % 3


def test_matches_dense_nnls_and_lambda_nonnegative():
  # A linear softmax model with logits small enough that the reference's
  # autodiff per-sample gradients do not round (1 - p_y stays >> 1e-7).
  params, x, labels = _linear_problem()
  gmat = _flat(kkt.per_sample_grads(_linear, params, x, labels), len(x))
  theta = np.concatenate([np.ravel(a) for a in jax.tree.leaves(params)])
  lam_ref, _ = nnls(gmat.astype(np.float64), -theta.astype(np.float64))
  ref = np.linalg.norm(gmat @ lam_ref + theta) / np.linalg.norm(theta)
  lam, info = select.fit_lambdas(
    _linear,
    params,
    x,
    labels,
    distance="l2_sq",
    slackness=0.0,
    init="zero",
    max_iters=150,
    tol=1e-7,
    chunk_size=40,
    mesh=parallel.make_mesh(1),
  )
  assert (lam >= 0).all()
  assert 0.05 < ref < 0.99  # A problem where the cone constraint binds.
  np.testing.assert_allclose(info.residual, ref, rtol=1e-3)
  # The reported residual is that of the returned lambda.
  mine = np.linalg.norm(gmat @ lam + theta) / np.linalg.norm(theta)
  np.testing.assert_allclose(mine, info.residual, rtol=1e-3)
  assert info.iterations == len(info.history) <= 150


def _plane(seed, n=160):
  """2-D points around a random line, with a gap: linearly separable.

  benchmarks/svm_sanity.py's "plane2" data set.
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=2)
  w /= np.linalg.norm(w)
  b = rng.uniform(-0.3, 0.3)
  x = np.zeros((0, 2))
  while len(x) < n:
    cand = rng.uniform(-1.5, 1.5, size=(4 * n, 2))
    cand = cand[np.abs(cand @ w + b) > 0.15]
    x = np.concatenate([x, cand])[:n]
  return x.astype(np.float32), (x @ w + b > 0).astype(np.int32)


def test_svm_sanity_top_contributions_are_support_vectors():
  x, y = _plane(0)
  truth = SVC(kernel="linear", C=1e6).fit(x, y).support_

  def loss(p):
    return jnp.mean(kkt.cross_entropy(_linear(p, x), y))

  # Normalised gradient descent from zero to a tiny loss: the direction
  # approaches the max-margin one.
  @jax.jit
  def train(p):
    def body(carry):
      i, p, val = carry
      g = jax.grad(loss)(p)
      p = jax.tree.map(lambda a, b: a - 0.5 * b / val, p, g)
      return i + 1, p, loss(p)

    carry = (0, p, loss(p))
    return jax.lax.while_loop(lambda c: c[2] > 1e-5, body, carry)[1]

  params = train({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
  # Nothing but the library's defaults: the one documented call.
  sel = select.select_dsvs(
    _linear, params, x, y, k=1, mesh=parallel.make_mesh(1)
  )
  precision, recall = select.precision_recall_at_k(sel.fit.scores, truth)
  assert precision == recall == 1.0
  assert sel.fit.residual < 0.2  # Slackness 0.3 trades some residual.
  # The top sample of each class is a support vector, ranked by the
  # contribution (FitInfo.scores).
  assert set(sel.indices) <= set(truth)
  np.testing.assert_array_equal(
    sel.indices, select.top_per_class(sel.fit.scores, y, 2, 1)
  )
  np.testing.assert_allclose(sel.fit.scores, sel.lambdas * sel.fit.weights)


def _instance_norm_convnet(seed=0):
  from dsv_jax import models

  net = models.build_model(
    "convnet",
    image_shape=(8, 8, 1),
    num_classes=3,
    key=jax.random.key(seed),
    width=4,
    depth=2,
    norm="instance",
  )
  apply_fn, params = models.nnx_apply_fn(net)
  rng = np.random.default_rng(seed)
  # Trained-looking values: non-zero biases and scales away from 1 (at
  # init a norm's bias is 0, and its scale alone is then invariant too).
  params = jax.tree.map(
    lambda a: a + 0.3 * rng.normal(size=a.shape).astype(a.dtype), params
  )
  x = rng.normal(size=(24, 8, 8, 1)).astype(np.float32)
  return apply_fn, params, x, np.arange(24, dtype=np.int32) % 3


def _scaled(params, paths, factor):
  def scale(path, a):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return a * factor if any(name.startswith(p) for p in paths) else a

  return jax.tree_util.tree_map_with_path(scale, params)


def test_represented_leaves_finds_the_invariant_groups():
  apply_fn, params, x, y = _instance_norm_convnet()
  rep = select.represented_leaves(apply_fn, params, x, y)
  # Both conv blocks feed an instance norm (kernel: scale-invariant; bias:
  # removed by the mean subtraction), and the first norm's scale and bias
  # feed the second block's norm: invariant together, not one by one.
  assert set(rep.groups) == {"convs", "norms/0"}
  assert set(rep.excluded) == {
    "convs/0/bias",
    "convs/0/kernel",
    "convs/1/bias",
    "convs/1/kernel",
    "norms/0/bias",
    "norms/0/scale",
  }
  flags = jax.tree_util.tree_leaves_with_path(rep.mask)
  kept = {
    jax.tree_util.keystr(p, simple=True, separator="/") for p, f in flags if f
  }
  assert kept == {"head/bias", "head/kernel", "norms/1/bias", "norms/1/scale"}
  sq = {
    jax.tree_util.keystr(p, simple=True, separator="/"): float(np.vdot(a, a))
    for p, a in jax.tree_util.tree_leaves_with_path(params)
  }
  share = sum(v for k, v in sq.items() if k not in kept) / sum(sq.values())
  np.testing.assert_allclose(rep.excluded_share, share, rtol=1e-6)

  # The obvious check of what "invariant" means: scaling an excluded group
  # leaves every logit unchanged (up to the norms' epsilon); scaling a kept
  # leaf, or one leaf of an invariant pair, does not.
  base = np.asarray(apply_fn(params, x))

  def change(paths):
    moved = np.asarray(apply_fn(_scaled(params, paths, 1.7), x))
    return np.abs(moved - base).max() / np.abs(base).max()

  for group in ("convs/0/kernel", "convs/1/kernel", "norms/0"):
    assert change([group]) < 2e-3, group
  for group in ("norms/0/scale", "norms/1", "head/kernel"):
    assert change([group]) > 0.01, group

  # A model without normalisation has nothing to exclude.
  params_l, xl, yl = _mlp_problem()
  rep = select.represented_leaves(_mlp, params_l, xl, yl)
  assert rep.excluded == () and rep.excluded_share == 0.0


def test_fit_on_represented_leaves_equals_fit_over_closed_over_rest():
  # The slow, obvious reference: close over the excluded leaves in apply_fn
  # and fit only the kept ones (the kkt module's subset recipe).
  apply_fn, params, x, y = _instance_norm_convnet(seed=1)
  kwargs = {"max_iters": 8, "chunk_size": 24, "mesh": parallel.make_mesh(1)}
  lam, info = select.fit_lambdas(apply_fn, params, x, y, **kwargs)
  assert info.represented.groups == ("convs", "norms/0")
  frozen = {k: v for k, v in params.items() if k != "head"}
  frozen["norms"] = {0: params["norms"][0]}
  kept = {"head": params["head"], "norms1": params["norms"][1]}

  def sub_apply(p, xx):
    full = {
      "convs": params["convs"],
      "norms": {0: params["norms"][0], 1: p["norms1"]},
      "head": p["head"],
    }
    return apply_fn(full, xx)

  ref, ref_info = select.fit_lambdas(sub_apply, kept, x, y, wrt="all", **kwargs)
  np.testing.assert_allclose(lam, ref, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(info.residual, ref_info.residual, rtol=1e-3)
  assert info.residual_all > info.residual
  # Over every leaf, the invariant ones set a floor on the residual: it is at
  # least the excluded share of ||theta||.
  _, all_info = select.fit_lambdas(apply_fn, params, x, y, wrt="all", **kwargs)
  floor = np.sqrt(info.represented.excluded_share)
  assert all_info.residual >= 0.99 * floor


@pytest.mark.parametrize(
  "devices,strategy", [(1, "host"), (4, "host"), (4, "device")]
)
def test_stationarity_residuals_match_explicit_gradients(devices, strategy):
  apply_fn, params, x, y = _instance_norm_convnet(seed=2)
  # 21 samples in chunks of 7, 8 on 4 devices: the last chunk is padded
  # there, and a padding slot must add nothing to G lambda.
  x, y = x[:21], y[:21]
  rep = select.represented_leaves(apply_fn, params, x, y)
  lam = np.linspace(0.5, 2.0, len(y)).astype(np.float32)
  got_rep, got_all = select.stationarity_residuals(
    apply_fn,
    params,
    x,
    y,
    lam,
    mask=rep.mask,
    chunk_size=7,
    mesh=parallel.make_mesh(devices),
    strategy=strategy,
  )
  r = kkt.stationarity_residual(apply_fn, params, x, y, lam)
  r_leaves = jax.tree.leaves(r)
  p_leaves = jax.tree.leaves(params)
  keep = jax.tree.leaves(rep.mask)

  def rel(flags):
    num = sum(
      float(np.vdot(a, a)) for a, f in zip(r_leaves, flags, strict=True) if f
    )
    den = sum(
      float(np.vdot(a, a)) for a, f in zip(p_leaves, flags, strict=True) if f
    )
    return np.sqrt(num / den)

  np.testing.assert_allclose(got_rep, rel(keep), rtol=1e-4)
  np.testing.assert_allclose(got_all, rel([True] * len(keep)), rtol=1e-4)


def test_select_dsvs_errors():
  params, x, labels = _mlp_problem(n=12)
  with pytest.raises(ValueError, match="class 0 has 4 samples, fewer than"):
    select.select_dsvs(_mlp, params, x, labels, k=5)
  with pytest.raises(ValueError, match="labels must lie in"):
    select.select_dsvs(_mlp, params, x, labels + 1, k=1)
  with pytest.raises(ValueError, match="wrt excludes every parameter"):
    select.fit_lambdas(
      _mlp, params, x, labels, wrt=jax.tree.map(lambda _: False, params)
    )


def test_sharded_equals_single_device():
  assert jax.device_count() >= 4  # tests/conftest.py
  params, x, labels = _linear_problem(n=30)  # Not a multiple of 4: padding.
  kwargs = {"distance": "l1_mean", "max_iters": 4, "chunk_size": 8}
  single, a = select.fit_lambdas(
    _linear, params, x, labels, mesh=parallel.make_mesh(1), **kwargs
  )
  sharded, b = select.fit_lambdas(
    _linear, params, x, labels, mesh=parallel.make_mesh(4), **kwargs
  )
  assert a.iterations == b.iterations == 4
  np.testing.assert_allclose(sharded, single, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(b.residual, a.residual, rtol=1e-4)


def test_resume_state_continues_exactly():
  params, x, labels = _linear_problem()
  kwargs = {
    "distance": "l1_mean",
    "chunk_size": 16,
    "tol": 0.0,
    "mesh": parallel.make_mesh(1),
  }
  full, _ = select.fit_lambdas(
    _linear, params, x, labels, max_iters=6, **kwargs
  )
  _, half = select.fit_lambdas(
    _linear, params, x, labels, max_iters=3, **kwargs
  )
  resumed, info = select.fit_lambdas(
    _linear, params, x, labels, max_iters=6, state=half.state, **kwargs
  )
  assert info.iterations == 6 and len(info.history) == 3
  np.testing.assert_array_equal(resumed, full)
  with pytest.raises(ValueError, match="another problem"):
    select.fit_lambdas(
      _linear, params, x[:20], labels[:20], state=half.state, **kwargs
    )


@pytest.mark.parametrize("before,after", [(4, 2), (2, 4)])
def test_checkpoint_resumes_on_another_device_count(tmp_path, before, after):
  """The solver state holds N lambdas and parameter-shaped products, no
  padding: checkpointed on one mesh (`select.num_devices`), it resumes on
  another and ends where an uninterrupted run does."""
  params, x, labels = _linear_problem(n=30)  # Pads to 32 on 4 devices.
  kwargs = {"distance": "l1_mean", "chunk_size": 8, "tol": 0.0}

  def fit(devices, iters, state=None):
    mesh = parallel.make_mesh(devices)
    return select.fit_lambdas(
      _linear,
      params,
      x,
      labels,
      max_iters=iters,
      mesh=mesh,
      state=state,
      **kwargs,
    )

  full, _ = fit(before, 6)
  with checkpoints.RunCheckpointer(tmp_path / "ckpt") as ckptr:
    ckptr.save(3, fit(before, 3)[1].state, {})
  with checkpoints.RunCheckpointer(tmp_path / "ckpt") as ckptr:
    step, state, _ = ckptr.restore(progress.checkpoint_target(params, 30))
  assert step == 3
  resumed, info = fit(after, 6, state)
  assert info.iterations == 6 and len(info.history) == 3
  np.testing.assert_allclose(resumed, full, rtol=1e-4, atol=1e-7)


def test_resume_from_converged_state_does_no_iteration():
  # SolverState.converged: before it existed, a fit resumed from the state
  # of a converged fit (e.g. its checkpoint) iterated on, past the tol it
  # had met.
  params, x, labels = _linear_problem()
  kwargs = {"tol": 1e-2, "chunk_size": 16, "mesh": parallel.make_mesh(1)}
  lambdas, info = select.fit_lambdas(
    _linear, params, x, labels, max_iters=300, **kwargs
  )
  assert info.converged and info.iterations < 300
  assert bool(info.state.converged)
  rows = []
  resumed, again = select.fit_lambdas(
    _linear,
    params,
    x,
    labels,
    max_iters=300,
    state=info.state,
    on_metrics=rows.append,
    **kwargs,
  )
  assert rows == [] and again.history == []
  assert again.iterations == info.iterations and again.converged
  np.testing.assert_array_equal(resumed, lambdas)


def test_solver_state_checkpoints_old_and_new_restore(tmp_path):
  params, x, labels = _linear_problem()
  kwargs = {"tol": 1e-2, "chunk_size": 16, "mesh": parallel.make_mesh(1)}
  _, info = select.fit_lambdas(
    _linear, params, x, labels, max_iters=300, **kwargs
  )
  fields = [f for f in select.SolverState._fields if f != "converged"]
  old = {f: getattr(info.state, f) for f in fields}  # Written before it.
  # The select stage's restore target: a zero state, `converged` left out.
  target = select.SolverState(**jax.tree.map(jnp.zeros_like, old))
  for name, state, converged in [
    ("old", old, False),
    ("new", info.state, True),
  ]:
    ckptr = checkpoints.RunCheckpointer(tmp_path / name)
    ckptr.save(int(info.state.step), state, {})
    step, restored, _ = ckptr.restore(target)
    assert isinstance(restored, select.SolverState)
    assert bool(restored.converged) is converged
    np.testing.assert_array_equal(
      restored.contributions, info.state.contributions
    )
    _, resumed = select.fit_lambdas(
      _linear, params, x, labels, max_iters=step + 2, state=restored, **kwargs
    )
    # An old checkpoint does not know it converged: it iterates again.
    assert bool(resumed.history) is not converged


def test_slackness_caps_samples_pushing_away():
  # Random weights: some samples push away from theta*; they get no
  # contribution reward and lambda at most the best constant lambda (a soft
  # margin), which keeps the objective bounded.
  params, x, labels = _mlp_problem()
  gmat = _flat(kkt.per_sample_grads(_mlp, params, x, labels), len(x))
  theta = np.concatenate([np.ravel(a) for a in jax.tree.leaves(params)])
  away = gmat.T @ theta >= 0
  assert 0 < away.sum() < len(x)
  # The cap, the obvious way: min_c ||theta + c G 1||.
  g1 = gmat.sum(1)
  cap = max(-(theta @ g1) / (g1 @ g1), 0.0)
  lam, info = select.fit_lambdas(
    _mlp, params, x, labels, distance="l2_sq", slackness=0.1, max_iters=200
  )
  assert info.capped == away.sum()
  assert np.isfinite(lam).all() and (lam >= 0).all()
  assert (lam[away] <= cap * (1 + 1e-4)).all()
  assert lam[~away].max() > 2 * cap  # The rewarded ones are not capped.
  # Samples pushing away, and misclassified ones, are part of the
  # representation but not DSVs: they are never ranked (primal
  # feasibility).
  correct = np.argmax(_mlp(params, x), -1) == labels
  assert 0 < (~correct & ~away).sum()  # Misclassified yet not pushing away.
  np.testing.assert_array_equal(info.rankable, ~away & correct)
  assert (info.scores[~info.rankable] == 0).all()
  assert info.scores[info.rankable].max() > 0
  sel = select.select_dsvs(
    _mlp, params, x, labels, k=2, distance="l2_sq", slackness=0.1
  )
  assert info.rankable[sel.indices].all()
  # The fit starts from the best constant lambda, for every sample.
  lam0, _ = select.fit_lambdas(
    _mlp, params, x, labels, distance="l2_sq", slackness=0.1, max_iters=0
  )
  np.testing.assert_allclose(lam0, cap, rtol=1e-3)
  # The solver's cached G lambda is that of the returned lambda.
  mine = np.linalg.norm(gmat @ lam + theta) / np.linalg.norm(theta)
  np.testing.assert_allclose(mine, info.residual, rtol=1e-3)
  assert info.history[-1]["backtracks"] < 5
  # Every sample pushing away (labels = the least likely class): no support.
  params, x, _ = _linear_problem()
  worst = np.asarray(jnp.argmin(_linear(params, x), -1), np.int32)
  with pytest.raises(ValueError, match="ill-defined; use slackness=0"):
    select.fit_lambdas(_linear, params, x, worst, slackness=0.1)


@pytest.mark.parametrize(
  "kwargs,message",
  [
    ({"distance": "l3"}, "distance must be one of"),
    ({"distance": "cosine", "slackness": 0.1}, "scale of lambda"),
    ({"slackness": -1.0}, "slackness must be >= 0"),
    ({"chunk_size": 0}, "chunk_size"),
  ],
)
def test_bad_arguments(kwargs, message):
  params, x, labels = _mlp_problem(n=8)
  with pytest.raises(ValueError, match=message):
    select.fit_lambdas(_mlp, params, x, labels, **kwargs)


def test_bad_inputs():
  params, x, labels = _mlp_problem(n=8)
  bad = x.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match="x contains NaN"):
    select.fit_lambdas(_mlp, params, bad, labels)
  with pytest.raises(ValueError, match=r"int targets must lie in \[0, 3\)"):
    select.fit_lambdas(_mlp, params, x, labels + 3)
  scores = np.arange(6.0)
  with pytest.raises(ValueError, match="class 2 has no samples"):
    select.top_per_class(scores, np.array([0, 1, 0, 1, 0, 1]), 3, 1)
  with pytest.raises(ValueError, match="class 1 has 1 samples, fewer than"):
    select.top_per_class(scores, np.array([0, 1, 0, 0, 0, 0]), 2, 2)
  top = select.top_per_class(scores, np.array([0, 1, 0, 1, 0, 1]), 2, 2)
  np.testing.assert_array_equal(top, [4, 2, 5, 3])


# ----------------------------------------------------------------------------
# The select stage.


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("clf")
  registry.run(configs.get_config("digits", "tiny"), str(wd), "train")
  return wd


def _workdir(classifier_dir, path):
  shutil.copytree(classifier_dir / "classifier", path / "classifier")
  return str(path)


def _config(**select_overrides):
  c = configs.get_config("digits", "tiny")
  c.select.ckpt_every = 2
  for k, v in select_overrides.items():
    c.select[k] = v
  return c


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_stage_outputs_resume_and_mismatch(
  classifier_dir, tmp_path, monkeypatch
):
  # An interrupted run (after the checkpoint of iteration 4) and its resume.
  killed = _workdir(classifier_dir, tmp_path / "killed")
  fit = select.fit_lambdas

  def interrupted(*args, **kwargs):
    def stop_after_4(state):
      if int(state.step) == 4:
        raise KeyboardInterrupt

    return fit(*args, on_state=stop_after_4, **kwargs)

  monkeypatch.setattr(select, "fit_lambdas", interrupted)
  with pytest.raises(KeyboardInterrupt):
    select_stage.run(_config(), killed)
  monkeypatch.setattr(select, "fit_lambdas", fit)
  res = select_stage.run(_config(), killed)
  assert res["resumed_from_iteration"] == 4 and res["iterations"] == 6

  clean = _workdir(classifier_dir, tmp_path / "clean")
  clean_res = select_stage.run(_config(), clean)
  a = np.load(os.path.join(killed, "select", "lambdas.npz"))
  b = np.load(os.path.join(clean, "select", "lambdas.npz"))
  np.testing.assert_array_equal(a["lambdas"], b["lambdas"])
  assert res["residual"] == clean_res["residual"]

  # Outputs.
  assert (a["lambdas"] >= 0).all() and len(a["lambdas"]) == 200
  n_cls = 10
  assert len(a["class_start"]) == n_cls + 1 and a["class_start"][-1] == 200
  dsv, meta = artifacts.load_dsv(os.path.join(clean, "select"))
  assert len(dsv.images) == 2 * n_cls and set(dsv.source) == {"train"}
  np.testing.assert_array_equal(dsv.targets, a["labels"][dsv.source_index])
  np.testing.assert_array_equal(
    dsv.source_index[::2], a["order"][a["class_start"][:-1]]
  )
  assert meta["config_hash"] == registry.stage_hash(_config(), clean, "select")
  for name in ("grid.png", "metrics.jsonl", "dsv.npz"):
    assert os.path.getsize(os.path.join(clean, "select", name)) > 0
  rows = [
    int(line.split('"step": ')[1].split(",")[0])
    for line in open(os.path.join(killed, "select", "metrics.jsonl"))
  ]
  assert rows == [2, 4, 6]
  _check_selection_by_hand(_config(), clean, a, dsv, clean_res)
  record = wdir.stage_record(clean, "select")
  assert record["results"]["iterations"] == 6

  # A checkpoint of another config is not silently resumed.
  with pytest.raises(ValueError, match="different config"):
    select_stage.run(_config(slackness=0.5), clean)


def _entropy(logits):
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
  return -np.sum(np.exp(logp) * logp, axis=-1)


def _check_selection_by_hand(config, workdir, z, dsv, res):
  """The select stage's outputs, recomputed from lambdas.npz by hand."""
  s, n_cls = config.select, 10
  lam, w, labels = z["lambdas"], z["weights"], z["labels"]
  # The score: the contribution lambda_i ||p_i - y_i|| of rankable samples.
  score = np.where(z["rankable"], lam * w, 0.0)
  np.testing.assert_allclose(z["scores"], score, rtol=1e-6)
  # The set: the highest scores of every class, class by class.
  per_class = [np.flatnonzero(labels == c) for c in range(n_cls)]
  top = np.concatenate(
    [
      i[np.argsort(-score[i], kind="stable")][: s.num_per_class]
      for i in per_class
    ]
  )
  np.testing.assert_array_equal(dsv.source_index, top)
  np.testing.assert_allclose(dsv.lambdas, lam[top], rtol=1e-6)
  sums = [lam[i].sum() for i in per_class]
  np.testing.assert_allclose(res["lambda_sum_per_class"], sums, rtol=1e-5)
  contributions = [(lam * w)[i].sum() for i in per_class]
  np.testing.assert_allclose(
    res["contribution_sum_per_class"], contributions, rtol=1e-5
  )
  # The boundary statistics: the selected images, and random ones drawn
  # with the stage's key, under the classifier.
  clf = common.load_classifier(workdir)
  x = common.load_data(config).train["image"]
  rand = select.random_per_class(
    jax.random.fold_in(jax.random.key(config.seed), 6),
    labels,
    n_cls,
    s.num_random_per_class,
  )
  assert set(rand.tolist()) != set(top.tolist())
  for name, idx in (("selected", top), ("random", rand)):
    entropy = _entropy(clf.apply_fn(clf.params, x[idx]))
    np.testing.assert_allclose(
      res[f"{name}_entropy_mean"], entropy.mean(), rtol=1e-4, err_msg=name
    )


def test_stage_rejects_too_few_samples_per_class(classifier_dir, tmp_path):
  wd = _workdir(classifier_dir, tmp_path / "wd")
  with pytest.raises(ValueError, match="fewer than the 50 per class"):
    select_stage.run(_config(num_per_class=50), wd)
  with pytest.raises(ValueError, match="select.distance"):
    select_stage.run(_config(distance="l3"), wd)


def test_library_defaults_are_the_configs_defaults():
  # One source of truth: the library's defaults are the validated recipe,
  # and the packaged configs read them.
  import inspect

  sig = inspect.signature(select.fit_lambdas).parameters
  assert sig["distance"].default == select.DEFAULT_DISTANCE == "l2_sq"
  assert sig["slackness"].default == select.DEFAULT_SLACKNESS > 0
  assert sig["init"].default == select.DEFAULT_INIT
  assert sig["wrt"].default == "auto"
  assert sig["max_iters"].default == select.DEFAULT_MAX_ITERS
  score = inspect.signature(select.select_dsvs).parameters["score"].default
  assert score == select.DEFAULT_SCORE == "contribution"
  for name in configs.CONFIGS:
    s = configs.get_config(name).select
    assert (s.distance, s.slackness, s.init, s.score, s.wrt) == (
      select.DEFAULT_DISTANCE,
      select.DEFAULT_SLACKNESS,
      select.DEFAULT_INIT,
      select.DEFAULT_SCORE,
      "auto",
    )


def test_a_finished_unconverged_fit_extends_under_all(classifier_dir, tmp_path):
  # Raising select.max_iters resumes the finished fit from its last
  # checkpoint; the hash leaves max_iters out, so the checkpoint is this
  # config's and `all` sees the record as out of date.
  wd = _workdir(classifier_dir, tmp_path / "wd")
  short = _config(max_iters=3, tol=0.0)
  first = select_stage.run(short, wd)
  assert first["iterations"] == 3 and not first["converged"]
  longer = _config(max_iters=5, tol=0.0)
  assert select_stage.stage_hash(longer, wd) == select_stage.stage_hash(
    short, wd
  )
  record = wdir.stage_record(wd, "select")
  assert select_stage.is_current(record, short)
  assert not select_stage.is_current(record, longer)
  res = select_stage.run(longer, wd)
  assert res["resumed_from_iteration"] == 3 and res["iterations"] == 5
  # A converged fit is current whatever the budget.
  record["results"]["converged"] = True
  assert select_stage.is_current(record, _config(max_iters=500))


def test_fit_reports_rows_states_and_checkpoints_like_every_loop(tmp_path):
  # The library's one convention: on_metrics(row) with the row's "step"
  # every log_every steps and at the last; a checkpointer saved every
  # ckpt_every steps and at the end, and resumed from.
  params, x, labels = _linear_problem()
  kw = {"tol": 0.0, "chunk_size": 16, "mesh": parallel.make_mesh(1)}
  whole, whole_info = select.fit_lambdas(
    _linear, params, x, labels, max_iters=7, **kw
  )
  rows, steps = [], []
  with checkpoints.RunCheckpointer(tmp_path / "ckpt") as ckptr:
    _, info = select.fit_lambdas(
      _linear,
      params,
      x,
      labels,
      max_iters=5,
      on_metrics=rows.append,
      log_every=2,
      on_state=lambda s: steps.append(int(s.step)),
      checkpointer=ckptr,
      ckpt_every=3,
      ckpt_meta={"run": "a"},
      **kw,
    )
    assert ckptr._manager.all_steps() == [3, 5]
    assert ckptr.read_meta() == {"run": "a"}
  assert steps == [1, 2, 3, 4, 5]
  assert [r["step"] for r in rows] == [2, 4, 5]
  assert rows == [info.history[i] for i in (1, 3, 4)]
  with checkpoints.RunCheckpointer(tmp_path / "ckpt") as ckptr:
    resumed, again = select.fit_lambdas(
      _linear, params, x, labels, max_iters=7, checkpointer=ckptr, **kw
    )
  assert again.iterations == 7 and len(again.history) == 2
  np.testing.assert_allclose(resumed, whole, rtol=1e-5, atol=1e-8)
  assert whole_info.iterations == 7


def test_fit_callback_is_a_deprecated_alias():
  params, x, labels = _linear_problem()
  got = []
  with pytest.warns(DeprecationWarning, match="on_state"):
    _, info = select.fit_lambdas(
      _linear,
      params,
      x,
      labels,
      max_iters=3,
      tol=0.0,
      chunk_size=16,
      callback=lambda state, row: got.append((int(state.step), row)),
    )
  assert got == [(i + 1, row) for i, row in enumerate(info.history)]


@pytest.mark.parametrize("kwargs", [{"log_every": 0}, {"ckpt_every": -1}])
def test_fit_rejects_bad_reporting_intervals(kwargs):
  params, x, labels = _linear_problem()
  name = next(iter(kwargs))
  with pytest.raises(ValueError, match=name):
    select.fit_lambdas(_linear, params, x, labels, max_iters=1, **kwargs)
