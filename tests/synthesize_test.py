"""DSV synthesis: determinism, resume, sharding, soft targets, the active
mask, editing/interpolation and clear errors on bad input.

Every test uses one tiny ConvNet (width 8, depth 2) on 8x8 digits and a few
steps; synthesizers are shared through module fixtures so each distinct
step function compiles once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dsv_jax import augment, checkpoints, data, kkt, models, parallel
from dsv_jax import synthesize as sz
from dsv_jax.experiment import common, synthesis_loop
from dsv_jax.experiment.stages import synthesize as synthesize_stage

SHAPE = (8, 8, 1)
C = 10


@pytest.fixture(scope="module")
def model():
  info = data.load_dataset("digits", max_train=200).info
  net = models.build_model(
    "convnet",
    image_shape=SHAPE,
    num_classes=C,
    key=jax.random.key(0),
    width=8,
    depth=2,
  )
  apply_fn, params = models.nnx_apply_fn(net)
  return apply_fn, params, info


def _kwargs(info, **over):
  kw = {
    "x_tx": optax.adam(0.05),
    "lambda_tx": optax.adam(0.05),
    "eta": 1.0,
    "beta_tv": 0.1,
    "beta_norm": 0.01,
    "dual": "mask",
    "lambda_init": (0.01, 0.02),
    "augment_fn": augment.make_augment(flip=0.0),
    "pixel_min": info.pixel_min,
    "pixel_max": info.pixel_max,
  }
  kw.update(over)
  return kw


@pytest.fixture(scope="module")
def synth(model):
  apply_fn, _, info = model
  return sz.make_synthesizer(apply_fn, **_kwargs(info))


@pytest.fixture(scope="module")
def params(model):
  return model[1]


def _x0(n, seed=0):
  return np.asarray(sz.noise_init(jax.random.key(seed), n, SHAPE))


LABELS = np.arange(8, dtype=np.int32) % C


def test_determinism(synth, params):
  key = jax.random.key(1)
  a = sz.synthesize(synth, params, key, _x0(8), LABELS, steps=4)
  b = sz.synthesize(synth, params, key, _x0(8), LABELS, steps=4)
  np.testing.assert_array_equal(a.x, b.x)
  np.testing.assert_array_equal(a.lambda_param, b.lambda_param)
  c = sz.synthesize(synth, params, jax.random.key(2), _x0(8), LABELS, steps=4)
  assert not np.allclose(a.x, c.x)
  assert int(a.step) == 4


def test_beta_stationarity_changes_the_step_gradients(model):
  # With the primal term and priors off, the synthesizer's x- and
  # lambda-gradients are those of the stationarity term alone and must scale
  # with its weight (they were identical for every beta > 0 before the
  # weight moved inside kkt.deepkkt_loss).
  apply_fn, params, info = model
  x0 = _x0(len(LABELS))

  def grads(beta):
    synth = sz.make_synthesizer(
      apply_fn,
      **_kwargs(
        info, beta_stationarity=beta, beta_primal=0.0, beta_tv=0, beta_norm=0
      ),
    )
    state = synth.init_fn(jax.random.key(0), params, x0, LABELS)
    gx, gl, _ = _grad_fn(synth, params)(
      state.x, state.lambda_param, state.active, jax.random.key(1)
    )
    return gx, gl

  gx1, gl1 = grads(1.0)
  gx3, gl3 = grads(3.0)
  assert np.abs(gx1).max() > 0 and np.abs(gl1).max() > 0
  np.testing.assert_allclose(gx3, 3 * gx1, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(gl3, 3 * gl1, rtol=1e-4, atol=1e-9)


def _grad_fn(synth, params):
  """``(x, lambda_param, active, key) -> (gx, g_lambda, aux)``, jitted."""
  fn = jax.jit(jax.grad(synth.loss_fn, argnums=(1, 2), has_aux=True))

  def grads(x, lambda_param, active, key):
    (gx, gl), aux = fn(params, x, lambda_param, active, LABELS, key)
    return np.asarray(gx), np.asarray(gl), aux

  return grads


def test_loss_is_the_sum_of_its_terms(model):
  # L_total = L_kkt(x) + eta L_kkt(A(x)) + beta_tv TV(x) + beta_norm N(x),
  # every term recomputed on its own: the DeepKKT terms by kkt.deepkkt_loss
  # on x and on A(x) drawn with the step's key, the priors by hand. One
  # candidate is inactive: it leaves every mean.
  info = model[2]
  apply_fn, params = _linear_model()
  aug = augment.make_augment()
  eta, beta_tv, beta_norm = 2.0, 0.3, 0.7
  center = np.asarray(info.pixel_min)
  kw = _kwargs(
    info,
    eta=eta,
    beta_tv=beta_tv,
    beta_norm=beta_norm,
    norm_center=center,
    dual="softplus",
    lambda_init=(0.5, 1.0),
    augment_fn=aug,
  )
  synth = sz.make_synthesizer(apply_fn, **kw)
  x = jnp.asarray(_x0(len(LABELS)))
  lambda_param = jnp.linspace(-1.0, 1.0, len(LABELS))
  keep = np.arange(len(LABELS)) != 5
  active = jnp.asarray(keep)
  key = jax.random.key(4)

  def reference(x, lambda_param):
    lam = jax.nn.softplus(lambda_param)
    clean = kkt.deepkkt_loss(apply_fn, params, x, LABELS, lam, active=active)
    augmented = kkt.deepkkt_loss(
      apply_fn, params, aug(key, x), LABELS, lam, active=active
    )
    priors = beta_tv * sz.tv_prior(x, active) + beta_norm * sz.norm_prior(
      x, active, center
    )
    total = clean[0] + eta * augmented[0] + priors
    return total, (clean[0], augmented[0])

  gx, gl, aux = _grad_fn(synth, params)(x, lambda_param, active, key)
  xs = np.asarray(x, np.float64)[keep]
  tv = np.mean(
    np.mean(np.diff(xs, axis=1) ** 2, axis=(1, 2, 3))
    + np.mean(np.diff(xs, axis=2) ** 2, axis=(1, 2, 3))
  )
  norm = np.mean((xs - center) ** 2)
  (want, (clean, augmented)), (rx, rl) = jax.jit(
    jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)
  )(x, lambda_param)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  close(aux["tv"], tv)
  close(aux["norm"], norm)
  close(aux["kkt"], clean)
  close(aux["kkt_aug"], augmented)
  assert not np.isclose(clean, augmented)  # A(x) is not x.
  close(aux["total"], clean + eta * augmented + beta_tv * tv + beta_norm * norm)
  close(aux["total"], want)
  close(gx, rx)
  close(gl, rl)
  # The stationarity and the augmented terms each move both gradients.
  for off in ({"beta_stationarity": 0.0}, {"eta": 0.0}):
    other = sz.make_synthesizer(apply_fn, **dict(kw, **off))
    ox, ol, _ = _grad_fn(other, params)(x, lambda_param, active, key)
    assert not np.allclose(ox, gx, rtol=1e-3, atol=1e-6), off
    assert not np.allclose(ol, gl, rtol=1e-3, atol=1e-6), off


def test_steps_use_their_own_key_and_the_optimiser_update(model):
  # Step t draws A(x) with fold_in(key, t) and moves x by the optimiser's
  # update of the gradient, clipped to the pixel box.
  info = model[2]
  apply_fn, params = _linear_model()
  tx = optax.adam(0.05)
  synth = sz.make_synthesizer(
    apply_fn, **_kwargs(info, x_tx=tx, dual="softplus")
  )
  key = jax.random.key(6)
  state = synth.init_fn(jax.random.key(0), params, _x0(len(LABELS)), LABELS)
  step = jax.jit(synth.step_fn)
  grads = _grad_fn(synth, params)
  for t in range(2):
    at = (state.x, state.lambda_param, state.active)
    gx, _, want = grads(*at, jax.random.fold_in(key, t))
    _, _, other = grads(*at, key)
    update, _ = tx.update(jnp.asarray(gx), state.opt_x, state.x)
    new_x = np.clip(state.x + update, info.pixel_min, info.pixel_max)
    state, metrics = step(state, params, LABELS, key)
    np.testing.assert_allclose(metrics["kkt_aug"], want["kkt_aug"], rtol=1e-5)
    assert not np.isclose(metrics["kkt_aug"], other["kkt_aug"])
    np.testing.assert_allclose(state.x, new_x, rtol=1e-5, atol=1e-6)


def test_clipping_is_per_channel():
  # Three channels with different bounds, as on CIFAR: every channel is
  # clipped to its own [pixel_min, pixel_max] and reaches it.
  info = data.DatasetInfo(
    "rgb",
    C,
    tuple(str(i) for i in range(C)),
    (8, 8, 3),
    (0.2, 0.5, 0.7),
    (0.1, 0.3, 0.2),
    "tfds",
  )
  lo, hi = info.pixel_min, info.pixel_max
  apply_fn, params = _linear_model(info.image_shape)
  synth = sz.make_synthesizer(apply_fn, **_kwargs(info))
  x0 = 10 * np.asarray(
    sz.noise_init(jax.random.key(1), len(LABELS), info.image_shape)
  )
  state = synth.init_fn(jax.random.key(0), params, x0, LABELS)
  np.testing.assert_array_equal(state.x, np.clip(x0, lo, hi))
  state, _ = jax.jit(synth.step_fn)(state, params, LABELS, jax.random.key(2))
  x = np.asarray(state.x)
  for ch in range(3):
    assert x[..., ch].min() == lo[ch] and x[..., ch].max() == hi[ch], ch


def test_norm_prior_pulls_towards_its_center(model):
  apply_fn, params, info = model
  x = np.asarray(jax.random.normal(jax.random.key(3), (3, *SHAPE)))
  c = np.asarray(info.pixel_min, np.float32)
  np.testing.assert_allclose(
    sz.norm_prior(x, center=c), np.mean((x - c) ** 2), rtol=1e-5
  )
  assert float(sz.norm_prior(np.broadcast_to(c, x.shape), center=c)) == 0.0
  # In the synthesizer the norm term's x-gradient is beta (2 / D)(x - c)
  # per image (the mean over active images and pixels): with every other
  # term off, it points from the center to x.
  x0 = _x0(len(LABELS))
  d = int(np.prod(SHAPE))
  synth = sz.make_synthesizer(
    apply_fn,
    **_kwargs(
      info,
      beta_stationarity=0.0,
      beta_primal=0.0,
      eta=0.0,
      beta_tv=0.0,
      beta_norm=1.0,
      norm_center=c,
    ),
  )
  state = synth.init_fn(jax.random.key(0), params, x0, LABELS)
  gx, _, _ = _grad_fn(synth, params)(
    state.x, state.lambda_param, state.active, jax.random.key(1)
  )
  want = 2.0 * (np.asarray(state.x) - c) / (d * len(LABELS))
  np.testing.assert_allclose(gx, want, rtol=1e-4, atol=1e-8)


def test_resume_from_checkpoint_equals_uninterrupted(synth, params, tmp_path):
  key = jax.random.key(3)
  full = sz.synthesize(synth, params, key, _x0(8), LABELS, steps=6)
  half = sz.synthesize(synth, params, key, _x0(8), LABELS, steps=3)
  ckptr = checkpoints.RunCheckpointer(tmp_path / "ckpt")
  ckptr.save(3, half, {})
  target = synth.init_fn(jax.random.key(9), params, _x0(8), LABELS)
  step, restored, _ = ckptr.restore(target)
  ckptr.close()
  assert step == 3
  resumed = sz.synthesize(
    synth, params, key, _x0(8), LABELS, steps=6, state=restored
  )
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6),
    resumed,
    full,
  )


def test_active_mask_removes_candidates(synth, model):
  apply_fn, params, info = model
  state = synth.init_fn(jax.random.key(0), params, _x0(8), LABELS)
  lam = np.array([1.0, -0.5, 1.0, -0.5, 1.0, 1.0, -0.5, 1.0], np.float32)
  state = state._replace(lambda_param=jnp.asarray(lam))
  step = jax.jit(synth.step_fn, donate_argnums=(0,))
  state, _ = step(state, params, LABELS, jax.random.key(0))
  expected = lam >= 0
  np.testing.assert_array_equal(state.active, expected)
  # Disqualified candidates are frozen from then on ...
  x_before = np.asarray(state.x)
  for _ in range(3):
    state, metrics = step(state, params, LABELS, jax.random.key(0))
  x_after = np.asarray(state.x)
  np.testing.assert_array_equal(x_after[~expected], x_before[~expected])
  assert not np.allclose(x_after[expected], x_before[expected])
  assert int(metrics["num_active"]) == expected.sum()
  # ... and contribute nothing, to the augmented term too: the loss equals
  # that of the active subset. A(x) is a fixed flip here, so that dropping
  # rows changes no other row's augmentation.
  plain = sz.make_synthesizer(
    apply_fn,
    **_kwargs(info, eta=2.0, augment_fn=lambda key, x: x[:, :, ::-1]),
  )
  k = jax.random.key(0)
  loss = jax.jit(plain.loss_fn)
  full, _ = loss(params, state.x, state.lambda_param, state.active, LABELS, k)
  sub, _ = loss(
    params,
    state.x[expected],
    state.lambda_param[expected],
    jnp.ones(expected.sum(), bool),
    LABELS[expected],
    k,
  )
  np.testing.assert_allclose(full, sub, rtol=1e-5)


def test_soft_targets_and_softplus(model):
  apply_fn, params, info = model
  soft = sz.blend_targets(LABELS, (LABELS + 1) % C, 0.6, C)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(soft[0, 0], 0.4)
  np.testing.assert_allclose(soft[0, 1], 0.6)
  synth = sz.make_synthesizer(apply_fn, **_kwargs(info, dual="softplus"))
  key = jax.random.key(4)
  # One-hot soft targets are the hard labels.
  hard = sz.synthesize(synth, params, key, _x0(8), LABELS, steps=3)
  onehot = sz.synthesize(
    synth, params, key, _x0(8), sz.one_hot(LABELS, C), steps=3
  )
  np.testing.assert_allclose(hard.x, onehot.x, rtol=1e-5, atol=1e-5)
  # Soft targets move the candidates elsewhere; softplus keeps lambda > 0
  # and never disqualifies anyone.
  blended = sz.synthesize(synth, params, key, _x0(8), soft, steps=3)
  assert not np.allclose(blended.x, onehot.x)
  assert (np.asarray(synth.lambdas_fn(blended)) > 0).all()
  assert np.asarray(blended.active).all()


def test_sharded_equals_single_device(synth, params):
  assert len(jax.devices()) >= 4, "conftest should provide 4 CPU devices"
  key = jax.random.key(5)
  out = {}
  for devices in (1, 4):
    state, n, _, _ = synthesis_loop.run_synthesis_loop(
      synth,
      params,
      key,
      _x0(8),
      LABELS,
      steps=3,
      mesh=parallel.make_mesh(devices),
      log_every=3,
    )
    assert n == 8
    if devices == 4:
      assert state.x.sharding.spec == P("data")
      assert state.lambda_param.sharding.spec == P("data")
      assert len(state.x.sharding.device_set) == 4
    out[devices] = state
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5),
    jax.device_get(out[1]),
    jax.device_get(out[4]),
  )


def test_padding_rows_stay_inactive(synth, params):
  state, n, _, _ = synthesis_loop.run_synthesis_loop(
    synth,
    params,
    jax.random.key(6),
    _x0(6),
    LABELS[:6],
    steps=2,
    mesh=parallel.make_mesh(4),
    log_every=2,
  )
  assert n == 6 and state.x.shape[0] == 8
  assert not np.asarray(state.active)[6:].any()


def _linear_model(shape=SHAPE):
  # Editing needs a classifier whose every class is reachable inside the
  # pixel box; a random tiny ConvNet may not be. A random linear softmax
  # model is, and compiles in a blink.
  k1, k2 = jax.random.split(jax.random.key(11))
  params = {
    "w": jax.random.normal(k1, (int(np.prod(shape)), C)) * 0.3,
    "b": jax.random.normal(k2, (C,)) * 0.1,
  }

  def apply_fn(p, x):
    return x.reshape(x.shape[0], -1) @ p["w"] + p["b"]

  return apply_fn, params


def test_edit_and_interpolate_reach_targets(model):
  info = model[2]
  apply_fn, params = _linear_model()
  kw = _kwargs(info, x_tx=optax.adam(0.1), beta_tv=0.0, dual="softplus")
  images = _x0(C, seed=7)
  new = (np.arange(C, dtype=np.int32) + 1) % C
  edited, lambdas, active = sz.edit(
    apply_fn, params, images, new, jax.random.key(7), steps=40, **kw
  )
  assert edited.shape == images.shape and lambdas.shape == (C,)
  pred = np.asarray(jnp.argmax(apply_fn(params, edited), -1))
  np.testing.assert_array_equal(pred, new)
  x, targets = sz.interpolate(
    apply_fn,
    params,
    images[0],
    2,
    5,
    [0.0, 0.5, 1.0],
    jax.random.key(8),
    steps=40,
    num_classes=C,
    **kw,
  )
  np.testing.assert_allclose(targets[1, [2, 5]], [0.5, 0.5])
  probs = np.asarray(jax.nn.softmax(apply_fn(params, x), -1))
  assert probs[0].argmax() == 2 and probs[-1].argmax() == 5
  assert probs[0, 5] < probs[1, 5] < probs[2, 5]


def test_nan_weights_are_rejected_not_synthesised(synth, params):
  # NaN weights made every image NaN without a word (issue 31).
  bad = jax.tree.map(np.array, params)
  leaf = jax.tree.leaves(bad)[0]
  leaf.flat[0] = np.nan
  with pytest.raises(ValueError, match="params contains NaN or inf values"):
    sz.synthesize(synth, bad, jax.random.key(0), _x0(8), LABELS, steps=1)


def test_bad_input_errors(synth, params):
  key = jax.random.key(0)
  x = _x0(8)
  bad = x.copy()
  bad[3, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf in 1 image"):
    synth.init_fn(key, params, bad, LABELS)
  with pytest.raises(ValueError, match="does not fit the model"):
    synth.init_fn(key, params, np.zeros((8, 28, 28, 1), np.float32), LABELS)
  with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
    synth.init_fn(key, params, x, LABELS + 5)
  with pytest.raises(ValueError, match="summing to 1"):
    synth.init_fn(key, params, x, np.full((8, C), 0.5, np.float32))
  with pytest.raises(ValueError, match="do not match the 8 candidates"):
    synth.init_fn(key, params, x, LABELS[:7])
  with pytest.raises(ValueError, match="delta must lie"):
    sz.blend_targets(LABELS, LABELS, 1.5, C)
  with pytest.raises(ValueError, match="dual must be one of"):
    sz.make_synthesizer(lambda p, x: x, dual="relu")


def test_model_errors_keep_their_cause():
  # A bug inside the model is reported with its type and first line, and
  # chained: its traceback is not lost behind "does not fit the model".
  def broken(params, x):
    raise ZeroDivisionError("division by zero inside the model")

  with pytest.raises(ValueError, match="ZeroDivisionError: division") as info:
    sz.check_candidates(broken, {}, _x0(8), LABELS)
  assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_missing_classifier_is_a_clear_error(tmp_path):
  config = pipelines_config()
  with pytest.raises(
    FileNotFoundError, match="run `--stage train` for this workdir"
  ):
    synthesize_stage.run(config, str(tmp_path))


def pipelines_config():
  from dsv_jax import configs

  return configs.get_config("digits", "tiny")


def test_augmentations_are_per_sample_and_keyed():
  x = jnp.asarray(_x0(16))
  key = jax.random.key(0)
  aug = augment.make_augment()
  a, b = aug(key, x), aug(key, x)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(aug(jax.random.key(1), x), a)
  np.testing.assert_allclose(augment.random_crop_resize(key, x, scale=0.0), x)
  same = jnp.broadcast_to(x[:1], x.shape)
  cropped = augment.random_crop_resize(key, same, scale=0.5)
  assert not np.allclose(cropped[0], cropped[1])  # Independent per image.
  holes = augment.random_cutout(key, jnp.ones((4, 8, 8, 1)), size=0.25)
  zeros = (np.asarray(holes) == 0).reshape(4, -1).sum(1)
  assert (zeros >= 1).all() and (zeros <= 4).all()
  noisy = augment.gaussian_noise(key, jnp.zeros((2, 8, 8, 1)), std=0.1)
  assert 0.05 < float(jnp.std(noisy)) < 0.2
  # Gradients flow through the whole augmentation.
  g = jax.grad(lambda z: jnp.sum(aug(key, z) ** 2))(x)
  assert np.isfinite(np.asarray(g)).all() and np.abs(g).sum() > 0
  with pytest.raises(ValueError, match="crop"):
    augment.make_augment(crop=1.0)


def test_init_helpers(model):
  info = model[2]
  split = {
    "image": np.arange(12 * 64, dtype=np.float32).reshape(12, 8, 8, 1),
    "label": np.repeat(np.arange(3), 4).astype(np.int32),
  }
  labels = np.array([0, 0, 2, 1], np.int32)
  imgs, idx = sz.real_init(jax.random.key(0), split, labels)
  np.testing.assert_array_equal(split["label"][idx], labels)
  assert len(set(idx.tolist())) == 4
  with pytest.raises(ValueError, match="only 4 available"):
    sz.real_init(jax.random.key(0), split, np.zeros(5, np.int32))
  big = data.DatasetInfo(
    "other", 3, ("a", "b", "c"), (16, 16, 3), (0.5,) * 3, (0.25,) * 3, "tfds"
  )
  other = np.zeros((5, 16, 16, 3), np.float32)  # Raw 0.5 everywhere.
  x, oidx = sz.other_init(
    jax.random.key(0), other, 3, src_info=big, dst_info=info
  )
  assert x.shape == (3, *SHAPE) and len(set(oidx.tolist())) == 3
  expected = info.normalize(np.full((3, *SHAPE), 0.5, np.float32))
  np.testing.assert_allclose(x, expected, atol=1e-5)


def test_config_reaches_the_synthesizer():
  c = pipelines_config()
  info = data.load_dataset("digits", max_train=200).info
  values = {
    "eta": 2.5,
    "beta_primal": 0.125,
    "beta_stationarity": 0.75,
    "beta_tv": 0.0625,
    "beta_norm": 0.03125,
    "gated": False,
    "distance": "l2_sq",
  }
  for k, v in values.items():
    c.kkt[k] = v
  c.kkt.norm_center = "min"
  c.synth.lambda_low, c.synth.lambda_high = 0.3, 0.9
  kw = common.synth_kwargs(c, info)
  assert {k: kw[k] for k in values} == values
  assert kw["lambda_init"] == (0.3, 0.9)
  np.testing.assert_array_equal(kw["norm_center"], info.pixel_min)
  np.testing.assert_array_equal(kw["pixel_min"], info.pixel_min)
  np.testing.assert_array_equal(kw["pixel_max"], info.pixel_max)


@pytest.mark.parametrize("before,after", [(4, 2), (2, 4)])
def test_checkpoint_resumes_on_another_device_count(
  synth, params, tmp_path, before, after
):
  """Six candidates pad to 8 on 4 devices, to 6 on 2: a checkpoint holds
  the real rows only, so it resumes on either mesh (`synth.num_devices`)
  and ends where an uninterrupted run does."""
  key = jax.random.key(12)

  def run(devices, steps, ckptr=None):
    state, n, resumed, _ = synthesis_loop.run_synthesis_loop(
      synth,
      params,
      key,
      _x0(6),
      LABELS[:6],
      steps=steps,
      mesh=parallel.make_mesh(devices),
      checkpointer=ckptr,
      ckpt_every=3,
      log_every=steps,
    )
    rows = (state.x, state.lambda_param, state.active)
    return [np.asarray(a)[:n] for a in rows], resumed

  full, _ = run(before, 6)
  with checkpoints.RunCheckpointer(tmp_path / "ckpt") as ckptr:
    run(before, 3, ckptr)  # Stopped at its checkpoint of step 3.
  with checkpoints.RunCheckpointer(tmp_path / "ckpt") as ckptr:
    resumed, resumed_from = run(after, 6, ckptr)
  assert resumed_from == 3
  for u, v in zip(resumed, full, strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_metrics_rows_every_log_every_and_at_the_last_step(synth, params):
  key = jax.random.key(4)
  rows = []
  state = sz.synthesize(
    synth,
    params,
    key,
    _x0(8),
    LABELS,
    steps=5,
    on_metrics=rows.append,
    log_every=2,
  )
  assert [r["step"] for r in rows] == [2, 4, 5]
  assert all(
    isinstance(v, float) for r in rows for k, v in r.items() if k != "step"
  )
  # The last row's loss is that of the last step: rerunning its 4 steps
  # and taking one more step by hand gives the same value.
  four = sz.synthesize(synth, params, key, _x0(8), LABELS, steps=4)
  _, metrics = synth.step(
    jax.tree.map(jnp.copy, four),
    params,
    jnp.asarray(LABELS),
    jax.random.fold_in(key, 1),
  )
  assert set(rows[-1]) == {"step", *metrics}
  for k, v in metrics.items():
    np.testing.assert_allclose(rows[-1][k], float(v), rtol=1e-6, atol=1e-8)
  assert int(state.step) == 5


def test_callback_is_a_deprecated_alias_of_on_metrics(synth, params):
  got = []
  with pytest.warns(DeprecationWarning, match="on_metrics"):
    sz.synthesize(
      synth,
      params,
      jax.random.key(4),
      _x0(8),
      LABELS,
      steps=3,
      callback=lambda t, m: got.append((t, m)),
      log_every=1,
    )
  assert [t for t, _ in got] == [1, 2, 3]
  assert all(m and "step" not in m for _, m in got)


def test_synthesis_loss_and_make_synthesizer_share_their_defaults():
  # synthesis_loss is Eq. 9 for direct callers; make_synthesizer is the
  # same objective behind an optimiser. The same keyword must mean the same
  # default in both, or the two entry points optimise different losses.
  import inspect

  loss = inspect.signature(sz.synthesis_loss).parameters
  synth = inspect.signature(sz.make_synthesizer).parameters
  shared = [
    n for n, p in loss.items() if p.kind is p.KEYWORD_ONLY and n in synth
  ]
  assert len(shared) >= 10, shared
  assert {n: loss[n].default for n in shared} == {
    n: synth[n].default for n in shared
  }
