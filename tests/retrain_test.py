"""Retraining K fresh models: shapes, determinism, the sequential reference,
soft targets, clear errors, and the `retrain` stage on a tiny workdir.

Models are tiny (an MLP, and a one-block BatchNorm ConvNet where the
non-trainable state matters) and runs take a few steps, so each compiled
step costs seconds.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv_jax import (
  artifacts,
  configs,
  models,
  parallel,
  retrain,
  synthesize,
)
from dsv_jax.experiment import common, registry
from dsv_jax.experiment import workdir as wdir
from dsv_jax.experiment.stages import retrain as retrain_stage

SHAPE = (8, 8, 1)
C = 3


# Cached: building an NNX model runs many small eager ops; retrain never
# mutates the arrays it is given.
@functools.cache
def _mlp(seed):
  return models.functional(
    models.build_model(
      "mlp",
      image_shape=SHAPE,
      num_classes=C,
      key=jax.random.key(seed),
      hidden=(16,),
    )
  )


@functools.cache
def _bn_convnet(seed):
  return models.functional(
    models.build_model(
      "convnet",
      image_shape=SHAPE,
      num_classes=C,
      key=jax.random.key(seed),
      width=4,
      depth=1,
      norm="batch",
    )
  )


def _set(n=12, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = np.asarray(jax.random.normal(kx, (n, *SHAPE)), np.float32)
  y = np.asarray(jax.random.randint(ky, (n,), 0, C), np.int32)
  return x, y


X, Y = _set()
EX, EY = _set(20, seed=1)
RECIPE = {
  "steps": 5,
  "batch_size": 5,
  "weight_decay": 5e-3,
  "flip": True,
  "max_shift": 1,
  "learning_rate": 1e-2,
}


def _accuracies(model_fn, params, model_state, x, y):
  """Accuracy of each of the K stacked models on (x, y), the obvious way."""
  eval_apply = model_fn(0).eval_apply
  out = []
  for k in range(len(jax.tree.leaves(params)[0])):
    p, s = jax.tree.map(lambda a, k=k: a[k], (params, model_state))
    out.append(np.mean(np.argmax(eval_apply(p, s, x), -1) == y))
  return np.array(out)


def test_shapes_and_seed_determinism():
  # 20 eval images in batches of 8: the last batch is padded, and the
  # padding (zero images, label 0) must not count.
  kw = dict(RECIPE, num_models=3, eval_batch_size=8)
  a = retrain.retrain(_mlp, X, Y, EX, EY, seed=2, **kw)
  assert a.accuracies.shape == (3,) and a.final_losses.shape == (3,)
  assert a.steps == 5 and a.time_s > 0
  direct = _accuracies(_mlp, a.params, a.model_state, EX, EY)
  np.testing.assert_allclose(a.accuracies, direct)
  # The check can tell the eval split from the training set and sees the
  # padding: some model predicts the padding's label 0 on a zero image.
  assert not np.allclose(
    direct, _accuracies(_mlp, a.params, a.model_state, X, Y)
  )
  zero = np.zeros((1, *SHAPE), np.float32)
  assert (_accuracies(_mlp, a.params, a.model_state, zero, 0) == 1).any()
  assert np.isclose(a.mean, a.accuracies.mean())
  assert np.isclose(a.std, a.accuracies.std())
  for leaf in jax.tree.leaves(a.params):
    assert leaf.shape[0] == 3
  b = retrain.retrain(_mlp, X, Y, EX, EY, seed=2, **kw)
  np.testing.assert_array_equal(a.accuracies, b.accuracies)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  c = retrain.retrain(_mlp, X, Y, EX, EY, seed=1, **kw)
  diff = jax.tree.map(
    lambda p, q: float(jnp.max(jnp.abs(p - q))), a.params, c.params
  )
  assert max(jax.tree.leaves(diff)) > 1e-3
  # The K models of one run differ from each other too.
  w = jax.tree.leaves(a.params)[0]
  assert float(jnp.max(jnp.abs(w[0] - w[1]))) > 1e-3


def test_reused_compiled_step_equals_a_fresh_one():
  # Rows of a report share one compiled step per architecture and recipe;
  # a second set (other data, other seeds' models) must train exactly as
  # with a freshly built step.
  x2, y2 = _set(seed=5)
  retrain.retrain(_mlp, X, Y, EX, EY, num_models=2, seed=0, **RECIPE)
  reused = retrain.retrain(_mlp, x2, y2, EX, EY, num_models=2, seed=3, **RECIPE)
  assert any(k[1] == _mlp(0).graph for k in retrain._REUSED)
  retrain._REUSED.clear()
  fresh = retrain.retrain(_mlp, x2, y2, EX, EY, num_models=2, seed=3, **RECIPE)
  np.testing.assert_array_equal(reused.final_losses, fresh.final_losses)
  jax.tree.map(np.testing.assert_array_equal, reused.params, fresh.params)
  # Another architecture with the same recipe never gets the MLP's step.
  assert _bn_convnet(0).graph != _mlp(0).graph


def _reference(
  model_fn,
  x,
  targets,
  *,
  num_models,
  seed,
  steps,
  batch_size,
  weight_decay,
  flip,
  max_shift,
  learning_rate,
):
  """K sequential single-model runs, written out step by step.

  The keys follow `retrain`'s documented scheme, derived here by hand, and
  the flip and shift are done in numpy from the same draws.
  """
  tx = optax.chain(
    optax.add_decayed_weights(weight_decay), optax.adam(learning_rate)
  )
  n = len(x)
  b = min(batch_size, n)
  key = jax.random.key(seed)
  init_seeds = jax.random.randint(
    jax.random.fold_in(key, 0), (num_models,), 0, np.iinfo(np.int32).max
  )
  out = []
  for k, s in enumerate(np.asarray(init_seeds)):
    fm = model_fn(int(s))
    params, state, opt = fm.params, fm.state, tx.init(fm.params)
    model_key = jax.random.fold_in(jax.random.fold_in(key, 1), k)
    data_key, aug_key = jax.random.split(model_key)
    for t in range(steps):
      epoch, pos = divmod(t, n // b)
      perm = np.asarray(
        jax.random.permutation(jax.random.fold_in(data_key, epoch), n)
      )
      idx = perm[pos * b : (pos + 1) * b]
      xb = _flip_and_shift(
        jax.random.fold_in(aug_key, t), x[idx], flip=flip, max_shift=max_shift
      )
      yb = targets[idx]

      def loss_fn(p, st, xb=xb, yb=yb, fm=fm):
        logits, new_st = fm.train_apply(p, st, xb)
        if yb.ndim == 1:
          ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        else:
          ce = optax.softmax_cross_entropy(logits, yb)
        return ce.mean(), new_st

      (_, state), g = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
      upd, opt = tx.update(g, opt, params)
      params = optax.apply_updates(params, upd)
    out.append((params, state))
  return out


def _flip_and_shift(key, x, *, flip, max_shift):
  """`augment.flip_and_translate` in numpy: each image flipped with
  probability 1/2, then zero-padded by `max_shift` and cropped at a random
  offset (the draws: the key split in two, a Bernoulli and a randint)."""
  flip_key, shift_key = jax.random.split(key)
  x = np.asarray(x)
  b, h, w, _ = x.shape
  if flip:
    flipped = np.asarray(jax.random.bernoulli(flip_key, 0.5, (b,)))
    x = np.where(flipped[:, None, None, None], x[:, :, ::-1], x)
  m = max_shift
  offsets = np.asarray(jax.random.randint(shift_key, (b, 2), 0, 2 * m + 1))
  padded = np.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
  return np.stack(
    [
      p[dy : dy + h, dx : dx + w]
      for p, (dy, dx) in zip(padded, offsets, strict=True)
    ]
  )


def _close(a, b, *, rtol=1e-4, atol=1e-5, skip=()):
  """allclose over two pytrees, skipping leaves whose path names `skip`."""
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
  ):
    name = jax.tree_util.keystr(path)
    if not any(all(part in name for part in s) for s in skip):
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("vectorize", ["vmap", "unroll"])
def test_batched_models_equal_sequential_reference(vectorize):
  # 12 images, batch 5: two batches per epoch, so epochs re-permute.
  res = retrain.retrain(
    _mlp, X, Y, EX, EY, num_models=3, seed=3, vectorize=vectorize, **RECIPE
  )
  ref = _reference(_mlp, X, Y, num_models=3, seed=3, **RECIPE)
  for k, (params, _) in enumerate(ref):
    _close(jax.tree.map(lambda a, k=k: a[k], res.params), params)


@pytest.mark.parametrize("vectorize", ["vmap", "unroll"])
def test_per_model_sets_equal_the_reference_on_each_set(vectorize):
  # K sets, model k on set k: model k must be exactly the reference's model
  # k trained on set k (same init seed and batch/augmentation key).
  sets = [_set(seed=10 + k) for k in range(3)]
  xs = np.stack([x for x, _ in sets])
  ys = np.stack([y for _, y in sets])
  res = retrain.retrain(
    _mlp, xs, ys, EX, EY, num_models=3, seed=3, vectorize=vectorize, **RECIPE
  )
  for k, (x, y) in enumerate(sets):
    params, _ = _reference(_mlp, x, y, num_models=3, seed=3, **RECIPE)[k]
    _close(jax.tree.map(lambda a, k=k: a[k], res.params), params)
  with pytest.raises(ValueError, match="need K = num_models = 2"):
    retrain.retrain(_mlp, xs, ys, EX, EY, num_models=2, seed=3, **RECIPE)


@pytest.mark.parametrize("per_model", [False, True])
def test_models_split_over_devices_equal_one_device(per_model):
  # K = 4 vmapped models on the 4 fake devices: each device trains one
  # (the stacked parameters come back split), with the same result as all
  # four on one device.
  x, y = X, Y
  if per_model:
    sets = [_set(seed=10 + k) for k in range(4)]
    x, y = np.stack([a for a, _ in sets]), np.stack([b for _, b in sets])
  # The MLP: a conv bias before BatchNorm has a zero gradient up to
  # round-off, which Adam scales to full steps, so any change in the
  # order of operations (a grouped convolution per device) moves it.
  runs = {
    n: retrain.retrain(
      _mlp,
      x,
      y,
      EX,
      EY,
      num_models=4,
      seed=3,
      vectorize="vmap",
      mesh=parallel.make_mesh(n),
      **RECIPE,
    )
    for n in (1, 4)
  }
  leaf = jax.tree.leaves(runs[4].params)[0]
  assert len(leaf.sharding.device_set) == 4
  assert not leaf.sharding.is_fully_replicated
  _close(runs[4].params, runs[1].params)
  np.testing.assert_allclose(runs[4].accuracies, runs[1].accuracies)


def test_auto_vectorize_is_unroll_on_cpu_and_vmap_elsewhere(monkeypatch):
  assert retrain.resolve_vectorize("auto") == "unroll"  # Tests run on CPU.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert retrain.resolve_vectorize("auto") == "vmap"
  assert retrain.resolve_vectorize("unroll") == "unroll"


def test_batchnorm_state_is_carried_per_model():
  res = retrain.retrain(
    _bn_convnet, X, Y, EX, EY, num_models=2, seed=3, **RECIPE
  )
  ref = _reference(_bn_convnet, X, Y, num_models=2, seed=3, **RECIPE)
  # The conv bias feeds BatchNorm, which cancels it: its true gradient is 0
  # and Adam turns float noise into lr-sized steps, so it (and the running
  # mean it shifts) is compared by the MLP test above instead.
  skip = (("convs", "bias"), ("mean",))
  for k, (params, state) in enumerate(ref):
    got = jax.tree.map(lambda a, k=k: a[k], (res.params, res.model_state))
    _close(got, (params, state), skip=skip)
  var = jax.tree_util.tree_leaves_with_path(res.model_state)
  var = [v for p, v in var if "var" in jax.tree_util.keystr(p)][0]
  assert float(jnp.max(jnp.abs(var[0] - var[1]))) > 0  # Per-model stats.


def test_soft_targets_and_full_batch():
  one_hot = np.asarray(jax.nn.one_hot(Y, C), np.float32)
  kw = dict(RECIPE, batch_size=100, flip=False)  # >= N: full batch.
  hard = retrain.retrain(_mlp, X, Y, EX, EY, num_models=2, seed=0, **kw)
  soft = retrain.retrain(_mlp, X, one_hot, EX, EY, num_models=2, seed=0, **kw)
  _close(hard.params, soft.params, rtol=1e-5, atol=1e-6)
  blend = np.asarray(
    synthesize.blend_targets(Y, (Y + 1) % C, 0.4, C), np.float32
  )
  mixed = retrain.retrain(_mlp, X, blend, EX, EY, num_models=2, seed=0, **kw)
  assert np.all(np.isfinite(mixed.final_losses))
  # A 40% second class raises the best achievable loss above the hard one.
  assert mixed.final_losses.mean() > hard.final_losses.mean()


@pytest.mark.parametrize(
  "change, match",
  [
    ({"images": X[:0], "targets": Y[:0]}, "non-empty"),
    (
      {"images": np.where(np.arange(12)[:, None, None, None] == 4, np.nan, X)},
      "NaN",
    ),
    ({"targets": np.full(12, C, np.int32)}, r"\[0, 3\)"),
    ({"targets": Y[:5]}, "do not match the 12 images"),
    ({"targets": np.full((12, C), 0.5, np.float32)}, "summing to 1"),
    ({"targets": Y.astype(np.float32)}, "integer"),
    ({"images": X[:, :4]}, "do not fit the model"),
    ({"eval_images": EX[:, :, :4]}, "eval_images"),
    ({"eval_labels": np.full(20, 7)}, "eval_labels"),
    ({"eval_labels": EY[:3]}, "eval_labels"),
    ({"vectorize": "pmap"}, "vectorize"),
    ({"steps": 0}, "steps"),
  ],
)
def test_clear_errors(change, match):
  args = {"images": X, "targets": Y, "eval_images": EX, "eval_labels": EY}
  kw = dict(RECIPE, num_models=1, seed=0)
  for k, v in change.items():
    (args if k in args else kw)[k] = v
  with pytest.raises(ValueError, match=match):
    retrain.retrain(
      _mlp,
      args["images"],
      args["targets"],
      args["eval_images"],
      args["eval_labels"],
      **kw,
    )


def test_model_errors_keep_their_cause():
  def broken_eval(params, state, x):
    raise ZeroDivisionError("division by zero inside the model")

  model_fn = lambda seed: _mlp(seed)._replace(eval_apply=broken_eval)
  with pytest.raises(ValueError, match="ZeroDivisionError: division") as info:
    retrain.retrain(
      model_fn, X, Y, EX, EY, **dict(RECIPE, num_models=1, seed=0)
    )
  assert isinstance(info.value.__cause__, ZeroDivisionError)


def _save_set(directory, images, targets, info, active=None, source="real"):
  n = len(images)
  artifacts.save_dsv(
    directory,
    artifacts.DSVSet(
      images=images,
      targets=targets,
      lambdas=np.ones(n),
      active=np.ones(n, bool) if active is None else active,
      source=np.full(n, source),
      source_index=np.arange(n),
      confidence=np.ones(n),
      entropy=np.zeros(n),
      margin=np.ones(n),
    ),
    dataset=info.name,
    mean=info.mean,
    std=info.std,
  )


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A workdir with the tiny digits classifier and a synthesized DSV set.

  The set is written directly in the synthesize stage's format (soft
  targets, 2 per class) rather than synthesized: the retrain stage only
  reads it, and this keeps the test file within its time budget.
  """
  wd = str(tmp_path_factory.mktemp("retrain_wd"))
  config = configs.get_config("digits", "tiny")
  registry.run(config, wd, "train")
  ds = common.load_data(config)
  labels = synthesize.class_targets(config.synth.num_per_class, 10)
  x, _ = synthesize.real_init(jax.random.key(0), ds.train, labels)
  soft = synthesize.blend_targets(labels, (labels + 1) % 10, 0.3, 10)
  _save_set(os.path.join(wd, "synthesize"), x, np.asarray(soft), ds.info)
  return wd, config, ds


def test_run_retrain_stage(tiny_workdir, monkeypatch):
  wd, config, ds = tiny_workdir
  # Every retraining the stage runs, with its models.
  calls, real = [], retrain.retrain

  def recording(model_fn, images, targets, *args, **kwargs):
    res = real(model_fn, images, targets, *args, **kwargs)
    calls.append((model_fn, images, res))
    return res

  monkeypatch.setattr(retrain, "retrain", recording)
  # A selected set as the select stage writes it: real training images,
  # one of them disqualified (left out).
  idx = np.flatnonzero(ds.train["label"] < 3)[:5]
  _save_set(
    os.path.join(wd, "select"),
    ds.train["image"][idx],
    ds.train["label"][idx],
    ds.info,
    active=np.arange(5) < 4,
    source="train",
  )
  summary = registry.run(config, wd, "retrain")["retrain"]
  with open(os.path.join(wd, "retrain", "results.json")) as f:
    full = json.load(f)
  rows = full["rows"]
  assert set(rows) == {"dsv", "random_dsv", "select", "random_select"}
  k = config.retrain.num_models
  for name, row in rows.items():
    assert len(row["accuracies"]) == k, name
    assert summary[f"{name}_mean"] == pytest.approx(row["mean"])
  per_class = config.synth.num_per_class
  assert rows["dsv"]["per_class"] == [per_class] * 10
  assert rows["dsv"]["targets"] == "hard"  # argmax of the soft targets.
  assert rows["random_dsv"]["per_class"] == rows["dsv"]["per_class"]
  assert rows["select"]["num_images"] == 4
  assert rows["random_select"]["per_class"] == rows["select"]["per_class"]
  assert full["eval_split"] == "test"
  # Every row's accuracies are its models evaluated on the test split (539
  # images: the last eval batch is padded), and the random rows train on
  # training images.
  names = ("dsv", "random_dsv", "select", "random_select")
  for name, (model_fn, images, res) in zip(names, calls, strict=True):
    direct = _accuracies(
      model_fn, res.params, res.model_state, ds.test["image"], ds.test["label"]
    )
    np.testing.assert_allclose(rows[name]["accuracies"], direct, err_msg=name)
    if name.startswith("random"):
      flat = ds.train["image"].reshape(len(ds.train["image"]), -1)
      for img in images.reshape(len(images), -1):
        assert (flat == img).all(axis=1).any(), name
  record = wdir.stage_record(wd, "retrain")
  assert record["config_hash"] == registry.stage_hash(config, wd, "retrain")
  assert record["results"] == summary


def test_random_like_is_fixed_and_class_matched(tiny_workdir):
  ds = tiny_workdir[2]
  labels = np.array([2, 0, 2, 1], np.int32)
  key = jax.random.key(5)
  a, la = retrain_stage.random_like(key, ds.train, labels)
  b, _ = retrain_stage.random_like(key, ds.train, labels)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, [0, 1, 2, 2])
  # Each drawn image is a training image of its class.
  for img, lab in zip(a, la, strict=True):
    hits = np.flatnonzero((ds.train["image"] == img).all(axis=(1, 2, 3)))
    assert lab in ds.train["label"][hits]


def test_set_rows_soft_flag():
  soft = np.asarray(
    synthesize.blend_targets(np.array([0, 1]), np.array([1, 2]), 0.3, C)
  )
  dsv = artifacts.DSVSet(
    images=X[:2],
    targets=soft,
    lambdas=np.ones(2),
    active=np.array([True, False]),
    source=np.full(2, "noise"),
    source_index=np.full(2, -1),
    confidence=np.ones(2),
    entropy=np.zeros(2),
    margin=np.ones(2),
  )
  x, t = retrain_stage.set_rows(dsv, soft=False)
  assert x.shape == (1, *SHAPE) and t.tolist() == [0]
  _, t = retrain_stage.set_rows(dsv, soft=True)
  np.testing.assert_allclose(t, soft[:1])
  with pytest.raises(ValueError, match="no active rows"):
    retrain_stage.set_rows(dsv._replace(active=np.zeros(2, bool)), soft=False)
