"""Classifier training: batching, augmentation, learning, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import augment, checkpoints, data, models, parallel, train


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits", max_train=256)


def _fm(info, seed=0):
  model = models.build_model(
    "convnet",
    image_shape=info.image_shape,
    num_classes=info.num_classes,
    key=jax.random.key(seed),
    width=8,
    depth=2,
  )
  return models.functional(model)


def test_epochs_are_permutations():
  key = jax.random.key(0)
  idx = [
    np.asarray(
      train.batch_indices(key, jnp.int32(s), num_examples=12, batch_size=4)
    )
    for s in range(6)
  ]
  for epoch in range(2):
    seen = np.concatenate(idx[3 * epoch : 3 * epoch + 3])
    np.testing.assert_array_equal(np.sort(seen), np.arange(12))
  assert not np.array_equal(np.concatenate(idx[:3]), np.concatenate(idx[3:]))


def test_augmentations():
  x = jax.random.normal(jax.random.key(0), (16, 6, 5, 2))
  np.testing.assert_array_equal(
    augment.random_translate(jax.random.key(1), x, max_shift=0), x
  )
  flipped = augment.random_flip(jax.random.key(2), x, prob=1.0)
  np.testing.assert_array_equal(flipped, x[:, :, ::-1])
  # Every image is flipped or not, independently: both occur, and another
  # key flips other images.
  flips = [_flips(x, augment.random_flip(jax.random.key(k), x)) for k in (2, 3)]
  assert 0 < flips[0].sum() < 16 and not np.array_equal(*flips)

  # Every output is the input shifted by (dy, dx) in [-2, 2]^2, zero-filled;
  # the shifts differ between images and between keys, and are not all 0.
  shifts = [_shifts(x, jax.random.key(k)) for k in (3, 4)]
  for s in shifts:
    assert len(set(s)) > 4 and s.count((0, 0)) < 8
  assert shifts[0] != shifts[1]
  # Same key, same result.
  np.testing.assert_array_equal(
    augment.random_translate(jax.random.key(3), x, max_shift=2),
    augment.random_translate(jax.random.key(3), x, max_shift=2),
  )

  # The classifier's augmentation: a flip, then a shift, per image.
  both = augment.flip_and_translate(
    jax.random.key(5), x, flip=True, max_shift=1
  )
  found = set()
  for i in range(16):
    found |= {
      (f, dy, dx)
      for f in (0, 1)
      for dy in range(-1, 2)
      for dx in range(-1, 2)
      if np.array_equal(_shift(x[i, :, :: 1 - 2 * f], dy, dx, 1), both[i])
    }
  assert {f for f, _, _ in found} == {0, 1}
  assert len({(dy, dx) for _, dy, dx in found}) > 2


def _shift(img, dy, dx, max_shift):
  """`img` [H, W, C] shifted by (dy, dx), zero-filled (the obvious way)."""
  h, w = img.shape[:2]
  m = max_shift
  padded = np.pad(np.asarray(img), ((m, m), (m, m), (0, 0)))
  return padded[m + dy : m + dy + h, m + dx : m + dx + w]


def _shifts(x, key):
  """The (dy, dx) `random_translate` drew for every image of `x`."""
  out = augment.random_translate(key, x, max_shift=2)
  assert out.shape == x.shape
  shifts = []
  for i in range(len(x)):
    found = [
      (dy, dx)
      for dy in range(-2, 3)
      for dx in range(-2, 3)
      if np.array_equal(_shift(x[i], dy, dx, 2), out[i])
    ]
    assert len(found) == 1, found  # Random normal pixels: one match.
    shifts.append(found[0])
  return shifts


def _flips(x, out):
  """bool per image: was it flipped left-right (else left alone)?"""
  flipped = np.all(np.asarray(out) == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2, 3))
  assert np.all(flipped ^ kept)
  return flipped


def test_training_learns_and_is_deterministic(digits):
  fm = _fm(digits.info)
  kw = {"steps": 60, "batch_size": 32, "learning_rate": 5e-3, "log_every": 60}
  state_a, last = train.train_classifier(
    fm, digits.train, jax.random.key(0), **kw
  )
  state_b, _ = train.train_classifier(fm, digits.train, jax.random.key(0), **kw)
  assert int(state_a.step) == 60
  jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
  evaluate = train.make_eval_fn(fm, batch_size=50)
  before = evaluate(fm.params, fm.state, digits.validation)
  after = evaluate(state_a.params, state_a.model_state, digits.validation)
  assert after["loss"] < before["loss"]
  assert after["accuracy"] > 0.6 > before["accuracy"]
  assert last["step"] == 60 and "steps_per_s" in last


def test_a_batch_split_over_devices_trains_the_same_model(digits):
  # No normalisation: a conv bias before a norm layer has a zero gradient
  # up to round-off, which Adam scales to full steps, so it would differ
  # with any change in the order of the sums.
  model = models.build_model(
    "convnet",
    image_shape=digits.info.image_shape,
    num_classes=digits.info.num_classes,
    key=jax.random.key(0),
    width=8,
    depth=2,
    norm="none",
  )
  fm = models.functional(model)
  kw = {"steps": 20, "batch_size": 32, "learning_rate": 5e-3, "log_every": 20}
  runs = {
    n: train.train_classifier(
      fm, digits.train, jax.random.key(0), mesh=parallel.make_mesh(n), **kw
    )[0]
    for n in (1, 4)
  }
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    runs[4].params,
    runs[1].params,
  )
  # Each device computes a quarter of the batch, and the gradients are
  # summed across devices.
  mesh = parallel.make_mesh(4)
  step = train.make_train_step(
    fm, train.make_optimizer(), jax.random.key(0), batch_size=32, mesh=mesh
  )
  data_ = parallel.replicate(
    {"image": digits.train["image"], "label": digits.train["label"]}, mesh
  )
  state = parallel.replicate(train.init_state(fm, train.make_optimizer()), mesh)
  hlo = jax.jit(step).lower(state, data_).compile().as_text()
  assert "all-reduce" in hlo
  assert "f32[8,8,8,1]" in hlo  # A device's share of the 32 images.


def test_eval_matches_direct_computation(digits):
  fm = _fm(digits.info, seed=3)
  split = digits.validation
  # 126 examples in batches of 50: the last batch is padded and masked.
  got = train.make_eval_fn(fm, batch_size=50)(fm.params, fm.state, split)
  logits = fm.eval_apply(fm.params, fm.state, split["image"])
  acc = np.mean(np.argmax(logits, -1) == split["label"])
  logp = jax.nn.log_softmax(logits)
  loss = -np.mean(np.take_along_axis(logp, split["label"][:, None], 1))
  np.testing.assert_allclose(got["accuracy"], acc, rtol=1e-6)
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
  # Health: entropy, margin and logit scale, written out the slow way.
  logits, labels = np.asarray(logits, np.float64), split["label"]
  probs = np.exp(logp)
  entropy = -np.sum(probs * np.asarray(logp), -1)
  margins = [
    logits[i, labels[i]] - np.delete(logits[i], labels[i]).max()
    for i in range(len(labels))
  ]
  np.testing.assert_allclose(got["entropy"], entropy.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["margin"], np.mean(margins), rtol=1e-5)
  np.testing.assert_allclose(
    got["logit_std"], np.std(logits, -1).mean(), rtol=1e-5
  )
  with pytest.raises(ValueError, match="empty split"):
    train.make_eval_fn(fm)(
      fm.params, fm.state, {"image": split["image"][:0], "label": []}
    )


def test_resume_equals_uninterrupted(digits, tmp_path):
  fm = _fm(digits.info)
  kw = {"batch_size": 32, "flip": True, "max_shift": 1, "log_every": 5}
  full, _ = train.train_classifier(
    fm, digits.train, jax.random.key(7), steps=12, **kw
  )
  ckptr = checkpoints.RunCheckpointer(tmp_path / "ckpt")
  # "Interrupted" after 8 steps with a checkpoint every 4, then resumed.
  train.train_classifier(
    fm,
    digits.train,
    jax.random.key(7),
    steps=8,
    checkpointer=ckptr,
    ckpt_every=4,
    **kw,
  )
  assert ckptr.latest_step() == 8
  resumed, _ = train.train_classifier(
    fm,
    digits.train,
    jax.random.key(7),
    steps=12,
    checkpointer=ckptr,
    ckpt_every=4,
    **kw,
  )
  assert ckptr.latest_step() == 12
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    (full.params, full.opt_state),
    (resumed.params, resumed.opt_state),
  )
  ckptr.close()


def test_batch_larger_than_data_is_rejected(digits):
  fm = _fm(digits.info)
  tiny = {k: v[:10] for k, v in digits.train.items()}
  with pytest.raises(ValueError, match="batch_size 32 exceeds the 10"):
    train.train_classifier(fm, tiny, jax.random.key(0), steps=1, batch_size=32)


def test_coupled_weight_decay():
  """add_decayed_weights before Adam: the decay enters Adam's moments."""
  tx = train.make_optimizer(learning_rate=0.1, weight_decay=0.5)
  params = {"w": jnp.array([2.0])}
  updates, _ = tx.update({"w": jnp.array([0.0])}, tx.init(params), params)
  # Zero loss gradient: the whole update comes from the decay, normalised
  # by Adam to -lr * sign.
  np.testing.assert_allclose(updates["w"], [-0.1], rtol=1e-4)


def test_schedules():
  params = {"w": jnp.array([2.0])}
  grads = {"w": jnp.array([1.0])}
  tx = train.make_optimizer(
    learning_rate=0.1, weight_decay=0.0, schedule="cosine", steps=4
  )
  state = tx.init(params)
  sizes = []
  for _ in range(4):
    updates, state = tx.update(grads, state, params)
    sizes.append(abs(float(updates["w"][0])))
  # Adam's normalised step is ~lr: it follows the cosine decay to 0.
  np.testing.assert_allclose(sizes, [0.1, 0.0854, 0.05, 0.0146], atol=2e-3)
  with pytest.raises(ValueError, match="needs the number of steps"):
    train.make_optimizer(schedule="cosine")
  with pytest.raises(ValueError, match="Unknown schedule 'step'"):
    train.make_optimizer(schedule="step")


def test_health_warning_names_the_numbers():
  assert train.health_warning(0.2, 10) is None
  assert train.health_warning(0.5 * np.log(10) - 1e-6, 10) is None
  msg = train.health_warning(2.27, 10)
  assert "near-uniform" in msg and "2.270" in msg and "2.303" in msg


def _mlp_problem(seed=0, n=40):
  rng = np.random.default_rng(seed)
  params = {
    "hidden": {
      "w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
      "b": jnp.zeros(5),
    },
    "head": {
      "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
      "b": jnp.zeros(3),
    },
  }

  def apply_fn(p, x):
    h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
    return h @ p["head"]["w"] + p["head"]["b"]

  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = (np.arange(n) % 3).astype(np.int32)
  return apply_fn, params, x, y


def _uniform_residual(apply_fn, params, x, y, wd, keep):
  # The obvious reference: theta + sum_i grad L_i / (N wd) from autodiff.
  g = jax.grad(lambda p: jnp.sum(optax_ce(apply_fn(p, x), y)))(params)
  r = jax.tree.map(lambda a, b: a + b / (len(y) * wd), params, g)
  num = sum(float(np.vdot(a, a)) for k, a in _items(r) if keep(k))
  den = sum(float(np.vdot(a, a)) for k, a in _items(params) if keep(k))
  return np.sqrt(num / den)


def optax_ce(logits, y):
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _items(tree):
  return [
    (jax.tree_util.keystr(p, simple=True, separator="/"), a)
    for p, a in jax.tree_util.tree_leaves_with_path(tree)
  ]


def test_finish_full_batch_reaches_a_stationary_point(tmp_path):
  apply_fn, params, x, y = _mlp_problem()
  wd = 0.05
  before = _uniform_residual(apply_fn, params, x, y, wd, lambda k: True)
  out, info = train.finish_full_batch(
    apply_fn,
    params,
    x,
    y,
    weight_decay=wd,
    steps=200,
    tol=1e-3,
    chunk_size=16,  # 40 samples: the last chunk is padded.
  )
  after = _uniform_residual(apply_fn, out, x, y, wd, lambda k: True)
  assert before > 0.5 and info["stopped"] == "tol"
  np.testing.assert_allclose(info["rel_grad_before"], before, rtol=1e-3)
  np.testing.assert_allclose(info["rel_grad_after"], after, rtol=2e-2)
  assert after <= 1.2e-3

  # A mask: only the head moves, and only its stationarity is reached.
  mask = {"hidden": {"w": False, "b": False}, "head": {"w": True, "b": True}}
  out, info = train.finish_full_batch(
    apply_fn, params, x, y, weight_decay=wd, steps=200, tol=1e-3, mask=mask
  )
  np.testing.assert_array_equal(out["hidden"]["w"], params["hidden"]["w"])
  head = _uniform_residual(apply_fn, out, x, y, wd, lambda k: "head" in k)
  assert head <= 1.2e-3 and info["optimised_scalars"] == 18


def test_finish_full_batch_resumes_exactly(tmp_path):
  apply_fn, params, x, y = _mlp_problem(seed=1)
  kw = {"weight_decay": 0.05, "tol": 0.0, "ckpt_every": 2}
  straight, _ = train.finish_full_batch(apply_fn, params, x, y, steps=8, **kw)
  ck = checkpoints.RunCheckpointer(tmp_path / "ck")
  train.finish_full_batch(
    apply_fn, params, x, y, steps=5, checkpointer=ck, **kw
  )
  resumed, info = train.finish_full_batch(
    apply_fn, params, x, y, steps=8, checkpointer=ck, **kw
  )
  ck.close()
  assert info["iterations"] == 8
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  with pytest.raises(ValueError, match="weight_decay > 0"):
    train.finish_full_batch(apply_fn, params, x, y, steps=1, weight_decay=0)
