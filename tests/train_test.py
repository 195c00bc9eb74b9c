"""Classifier training: batching, augmentation, learning, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import augment, checkpoints, data, models, train


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
      train._batch_indices(key, jnp.int32(s), num_examples=12, batch_size=4)
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
  shifted = augment.random_translate(jax.random.key(3), x, max_shift=2)
  assert shifted.shape == x.shape
  # Every output is the input shifted by (dy, dx) in [-2, 2]^2, zero-filled.
  for i in range(16):
    matches = []
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        padded = np.pad(np.asarray(x[i]), ((2, 2), (2, 2), (0, 0)))
        crop = padded[2 + dy : 2 + dy + 6, 2 + dx : 2 + dx + 5]
        matches.append(np.array_equal(crop, shifted[i]))
    assert any(matches)
  # Different keys, different shifts; same key, same result.
  again = augment.random_translate(jax.random.key(3), x, max_shift=2)
  np.testing.assert_array_equal(shifted, again)


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
