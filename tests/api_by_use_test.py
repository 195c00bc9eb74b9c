"""The public API used the way README.md shows it, from a script (issue 18).

Three classifiers go through every public function of `kkt`, `select`,
`synthesize`, `retrain` and `artifacts` (and the baseline, which runs on
the synthesizer's loop): a Linen ConvNet with BatchNorm
(`models.linen_apply_fn`), an NNX ConvNet (`models.nnx_apply_fn`) and a
plain function of a params dict. The calls are eager, as in the README,
and under `jax.jit`, `jax.vmap` over independent problems and `jax.grad`
with respect to params.

Every input is a jax array, and every input is read again after the call
(`_reused`): a call that donates or deletes a caller's array fails there
with "Array has been deleted". A numpy input would hide that, because JAX
copies it onto the device first. Integer images and negative multipliers
must fail at the edge, with a message that says what is expected.

Kept tiny: 8x8x1 images, 3 classes, 12 training samples, 2-3 steps.
"""

import functools
import inspect
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv_jax import (
  artifacts,
  augment,
  baseline,
  data,
  kkt,
  models,
  parallel,
  retrain,
  select,
  synthesize,
)

SHAPE = (8, 8, 1)
C = 3
PER_CLASS = 4
N = C * PER_CLASS
INFO = data.DatasetInfo(
  name="toy",
  num_classes=C,
  class_names=("a", "b", "c"),
  image_shape=SHAPE,
  mean=(0.5,),
  std=(0.25,),
  source="digits",
)
KEY = jax.random.key(0)


def _host(a: jax.Array) -> np.ndarray:
  """A host copy; raises ``RuntimeError: Array has been deleted``."""
  if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  return np.array(a)


def _reused(fn, *args, **kwargs):
  """``fn(*args, **kwargs)``, then reads every input jax array again.

  Each must still be readable (not donated or deleted) and unchanged.
  """
  arrays = [
    a for a in jax.tree.leaves((args, kwargs)) if isinstance(a, jax.Array)
  ]
  before = [_host(a) for a in arrays]
  out = fn(*args, **kwargs)
  for a, b in zip(arrays, before, strict=True):
    np.testing.assert_array_equal(_host(a), b)
  return out


def _assert_finite(tree) -> None:
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf)))


# ----------------------------------------------------------------------------
# The three classifiers.


class _LinenNet(nn.Module):
  """Conv, BatchNorm (running statistics in eval mode), tanh, dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = jnp.tanh(x)
    return nn.Dense(C)(x.reshape(x.shape[0], -1))


@functools.cache
def _linen_fm(seed: int) -> models.FunctionalModel:
  module = _LinenNet()
  variables = module.init(jax.random.key(seed), jnp.zeros((1, *SHAPE)))

  def train_apply(p, s, x):
    return module.apply(
      {"params": p, **s}, x, train=True, mutable=["batch_stats"]
    )

  def eval_apply(p, s, x):
    return module.apply({"params": p, **s}, x)

  state = {"batch_stats": variables["batch_stats"]}
  return models.FunctionalModel(
    variables["params"], state, train_apply, eval_apply
  )


def _linen():
  fm = _linen_fm(0)
  # Running statistics away from their init (mean 0, variance 1), so the
  # closed-over BatchNorm state matters.
  stats = jax.tree.map(lambda a: a + 0.5, fm.state["batch_stats"])
  variables = {"params": fm.params, "batch_stats": stats}
  apply_fn, params = models.linen_apply_fn(_LinenNet(), variables)
  return apply_fn, params, _linen_fm


# The ConvNet of the experiments (instance norm: `select` leaves its
# scale-invariant leaves out), as small as it goes.
CONVNET = {"image_shape": SHAPE, "num_classes": C, "width": 4, "depth": 1}


@functools.cache
def _nnx_fm(seed: int) -> models.FunctionalModel:
  return models.functional(_nnx_net(seed))


def _nnx_net(seed: int):
  return models.build_model("convnet", key=jax.random.key(seed), **CONVNET)


def _nnx():
  apply_fn, params = models.nnx_apply_fn(_nnx_net(0))
  return apply_fn, params, _nnx_fm


def _mlp_apply(p, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


@functools.cache
def _function_fm(seed: int) -> models.FunctionalModel:
  rng = np.random.default_rng(seed)
  params = {
    "w1": rng.standard_normal((64, 8), np.float32) / 8,
    "b1": np.zeros(8, np.float32),
    "w2": rng.standard_normal((8, C), np.float32),
    "b2": np.zeros(C, np.float32),
  }
  return models.FunctionalModel(
    _jax(params),
    {},
    lambda p, s, x: (_mlp_apply(p, x), s),
    lambda p, s, x: _mlp_apply(p, x),
  )


def _function():
  return _mlp_apply, _function_fm(0).params, _function_fm


class Model(NamedTuple):
  apply_fn: models.ApplyFn
  params: models.Params
  model_fn: retrain.ModelFn  # seed -> FunctionalModel, for retraining
  x: jax.Array  # f32[N, 8, 8, 1] training images
  labels: jax.Array  # int32[N]


# Test data and reference arithmetic are numpy: every eager jax op on a new
# shape compiles a program, and compiling dominates the run time here.


def _jax(tree):
  """A numpy pytree as jax arrays (a copy onto the device, no compile)."""
  return jax.tree.map(jnp.asarray, tree)


def _host_tree(tree):
  return jax.tree.map(np.asarray, tree)


def _train_set():
  """``PER_CLASS`` noise images of every class."""
  x = np.random.default_rng(7).standard_normal((N, *SHAPE), np.float32)
  return _jax((x, np.arange(N, dtype=np.int32) % C))


@pytest.fixture(scope="module", params=["linen_batchnorm", "nnx", "function"])
def model(request) -> Model:
  build = {"linen_batchnorm": _linen, "nnx": _nnx, "function": _function}
  apply_fn, params, model_fn = build[request.param]()
  return Model(apply_fn, params, model_fn, *_train_set())


def _lambdas() -> jax.Array:
  return jnp.asarray(np.linspace(0.5, 1.5, N, dtype=np.float32))


def _mask() -> jax.Array:
  return jnp.asarray(np.arange(N) % 4 != 3)


@functools.cache
def _value_and_grads(apply_fn):
  """``jit(value_and_grad)`` of `kkt.make_deepkkt_loss` with respect to
  params, x and lambdas: one compilation per model, shared by the tests
  (each costs about a second)."""
  loss = kkt.make_deepkkt_loss(apply_fn)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3), has_aux=True))


def test_every_public_function_is_used_here():
  with open(__file__) as f:
    source = f.read()
  modules = (kkt, select, synthesize, retrain, artifacts)
  missing = [
    f"{m.__name__}.{name}"
    for m in modules
    for name in m.__all__
    if inspect.isfunction(getattr(m, name))
    and f"{m.__name__.rsplit('.', 1)[1]}.{name}" not in source
  ]
  assert not missing, missing


# ----------------------------------------------------------------------------
# kkt


def test_kkt_as_in_the_readme(model):
  apply_fn, params, _, x, labels = model
  lambdas, mask = _lambdas(), _mask()
  direction = _jax(jax.tree.map(np.ones_like, _host_tree(params)))

  g = _reused(kkt.weighted_loss_grad, apply_fn, params, x, labels, lambdas)
  # A user's own function at the precision the DeepKKT functions use.
  precise = kkt.full_precision(lambda p, xx: apply_fn(p, xx))
  np.testing.assert_allclose(
    _reused(jax.jit(precise), params, x),
    apply_fn(params, x),
    rtol=1e-5,
    atol=1e-6,
  )
  r = _reused(kkt.stationarity_residual, apply_fn, params, x, labels, lambdas)
  loss = _reused(kkt.stationarity_loss, apply_fn, params, x, labels, lambdas)
  total, aux = _reused(
    kkt.deepkkt_loss, apply_fn, params, x, labels, lambdas, active=mask
  )
  dots = _reused(
    kkt.per_sample_grad_dots, apply_fn, params, x, labels, direction
  )
  # The explicit O(N P) reference, jitted: eager, it is the slowest call.
  per_sample_grads = jax.jit(kkt.per_sample_grads, static_argnums=0)
  per_sample = _reused(per_sample_grads, apply_fn, params, x, labels)

  assert jax.tree.structure(g) == jax.tree.structure(params)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
  lam, m = np.asarray(lambdas), np.asarray(mask)
  g, r, per_sample = _host_tree((g, r, per_sample))
  jax.tree.map(
    lambda gi, per: close(gi, np.tensordot(lam, per, 1)), g, per_sample
  )
  jax.tree.map(lambda ri, p, gi: close(ri, p + gi), r, _host_tree(params), g)
  per_dots = sum(
    per.reshape(N, -1).sum(-1) for per in jax.tree.leaves(per_sample)
  )  # direction is all ones
  close(dots, per_dots)
  assert int(aux["num_active"]) == m.sum()
  _assert_finite((loss, total, aux))

  logits = apply_fn(params, x)
  ce = _reused(kkt.cross_entropy, logits, labels)
  primal = _reused(kkt.primal_loss, logits, labels, active=mask, gated=False)
  close(primal, np.asarray(ce)[m].mean())
  l2 = _reused(kkt.distance_fn("l2_sq"), params, _jax(g))
  close(l2, sum(np.sum(ri**2) for ri in jax.tree.leaves(r)))
  assert kkt.num_scalars(params) == sum(a.size for a in jax.tree.leaves(params))


def test_kkt_under_jit_vmap_and_grad(model):
  apply_fn, params, _, x, labels = model
  lambdas, mask = _lambdas(), _mask()
  loss = kkt.make_deepkkt_loss(apply_fn)
  eager, _ = _reused(loss, params, x, labels, lambdas, mask)

  # Jitted, with gradients with respect to x and lambdas (synthesis) and
  # params (a bilevel outer loop over theta).
  value_and_grads = _value_and_grads(apply_fn)
  (total, aux), (gp, gx, gl) = _reused(
    value_and_grads, params, x, labels, lambdas, mask
  )
  np.testing.assert_allclose(total, eager, rtol=1e-5)
  assert jax.tree.structure(gp) == jax.tree.structure(params)
  assert gx.shape == x.shape and gl.shape == lambdas.shape
  _assert_finite((aux, gp, gx, gl))

  # Two independent problems, batched: own parameters, images, targets,
  # multipliers and masks; each equals its unbatched loss.
  one = _host_tree((params, x, labels, lambdas, mask))
  p, xh, lh, lam, m = one
  half = jax.tree.map(lambda a: 0.5 * a, p)
  two = (half, xh[::-1], lh[::-1], lam[::-1], ~m)
  problems = (one, two)
  stacked = jax.tree.map(lambda *a: np.stack(a), *problems)
  batched, _ = _reused(jax.jit(jax.vmap(loss)), *_jax(stacked))
  for i, problem in enumerate(problems):
    (alone, _), _ = value_and_grads(*_jax(problem))
    np.testing.assert_allclose(batched[i], alone, rtol=1e-5)


# ----------------------------------------------------------------------------
# select


def test_select_as_in_the_readme(model):
  apply_fn, params, _, x, labels = model
  sel = _reused(
    select.select_dsvs, apply_fn, params, x, labels, k=1, max_iters=3
  )
  np.testing.assert_array_equal(np.asarray(labels)[sel.indices], np.arange(C))
  assert 0 <= sel.fit.residual and sel.fit.iterations <= 3

  # Resumed from its state (on the parameters it represented) with no
  # iteration left, the fit returns the same lambdas.
  lambdas, fit = _reused(
    select.fit_lambdas,
    apply_fn,
    params,
    x,
    labels,
    wrt=sel.fit.represented.mask,
    max_iters=sel.fit.iterations,
    state=sel.fit.state,
  )
  np.testing.assert_array_equal(lambdas, sel.lambdas)
  assert fit.iterations == sel.fit.iterations and np.all(lambdas >= 0)
  # This process's rows (every row, with one process): given as such, with
  # N, the same fit; gathering every process's rows is then the identity.
  n, mesh = len(labels), parallel.make_mesh()
  rows = _reused(select.process_rows, n, chunk_size=1024, mesh=mesh)
  np.testing.assert_array_equal(rows, np.arange(n))
  own, _ = _reused(
    select.fit_lambdas,
    apply_fn,
    params,
    np.asarray(x)[rows],
    np.asarray(labels)[rows],
    num_samples=n,
    wrt=sel.fit.represented.mask,
    max_iters=sel.fit.iterations,
    state=sel.fit.state,
  )
  np.testing.assert_array_equal(own, lambdas)
  gathered = _reused(select.gather_rows, own, n, chunk_size=1024, mesh=mesh)
  np.testing.assert_array_equal(gathered, own)
  state = _reused(select.gather_state, fit.state, n, chunk_size=1024, mesh=mesh)
  assert state is fit.state

  rep = _reused(select.represented_leaves, apply_fn, params, x, labels)
  assert jax.tree.structure(rep.mask) == jax.tree.structure(params)
  every = _reused(select.resolve_wrt, "all", apply_fn, params, x, labels)
  assert all(jax.tree.leaves(every.mask))
  # The accelerator strategy, chosen by hand on CPU: the same residuals.
  assert select.resolve_strategy("device") == "device"
  residuals = {
    strategy: _reused(
      select.stationarity_residuals,
      apply_fn,
      params,
      x,
      labels,
      jnp.asarray(lambdas),
      mask=rep.mask,
      strategy=strategy,
    )
    for strategy in ("auto", "device")
  }
  res, res_all = residuals["auto"]
  assert np.isfinite(res) and np.isfinite(res_all)
  on_device = residuals["device"]
  np.testing.assert_allclose(on_device, (res, res_all), rtol=1e-5)

  lambdas, weights = jnp.asarray(lambdas), jnp.asarray(fit.weights)
  scores = _reused(
    select.scores, lambdas, weights, rankable=jnp.asarray(fit.rankable)
  )
  ranking = _reused(select.rank_per_class, jnp.asarray(scores), labels, C)
  top = _reused(select.top_per_class, jnp.asarray(scores), labels, C, 2)
  np.testing.assert_array_equal(top[::2], [r[0] for r in ranking])
  drawn = _reused(select.random_per_class, KEY, labels, C, 2)
  assert drawn.shape == (2 * C,)
  precision, recall = _reused(
    select.precision_recall_at_k, jnp.asarray(scores), jnp.asarray(top)
  )
  assert 0 <= precision <= 1 and 0 <= recall <= 1
  sums = _reused(select.per_class_sums, lambdas, labels, C)
  np.testing.assert_allclose(sums.sum(), float(lambdas.sum()), rtol=1e-5)
  residual = _reused(select.prob_residual, apply_fn(params, x), labels)
  np.testing.assert_allclose(residual.sum(-1), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------
# synthesize, the baseline, artifacts and retrain


def test_synthesize_save_load_retrain(model, tmp_path):
  # The README's path: synthesize within the dataset's pixel range, save
  # the DSV set, load it back and retrain fresh models on it.
  apply_fn, params, model_fn, x, labels = model
  targets = jnp.asarray(synthesize.class_targets(2, C))
  x0 = synthesize.noise_init(jax.random.key(1), len(targets), SHAPE)
  synth = synthesize.make_synthesizer(
    apply_fn,
    pixel_min=INFO.pixel_min,
    pixel_max=INFO.pixel_max,
    augment_fn=augment.make_augment(),
  )
  state = _reused(
    synthesize.synthesize, synth, params, KEY, x0, targets, steps=2
  )
  assert int(state.step) == 2
  assert np.asarray(state.x).min() >= INFO.pixel_min.min() - 1e-6

  lambdas = _reused(synth.lambdas_fn, state)
  _assert_finite(lambdas)
  desc = _reused(synthesize.describe, apply_fn, params, state.x, targets)
  same = _reused(synthesize.describe_logits, apply_fn(params, state.x), targets)
  jax.tree.map(np.testing.assert_array_equal, desc, same)

  dsv = artifacts.DSVSet(
    images=state.x,
    targets=targets,
    lambdas=lambdas,
    active=state.active,
    source=np.array(["noise"] * len(targets)),
    source_index=jnp.asarray(np.full(len(targets), -1, np.int32)),
    confidence=desc["confidence"],
    entropy=desc["entropy"],
    margin=desc["margin"],
  )
  _reused(
    artifacts.save_dsv,
    tmp_path,
    dsv,
    dataset=INFO.name,
    mean=INFO.mean,
    std=INFO.std,
  )
  for orbax in (False, True):
    back, meta = artifacts.load_dsv(tmp_path, orbax=orbax)
    np.testing.assert_array_equal(back.images, np.asarray(state.x))
    np.testing.assert_array_equal(back.targets, np.asarray(targets))
    assert meta["dataset"] == INFO.name

  res = _reused(
    retrain.retrain,
    model_fn,
    jnp.asarray(back.images),
    jnp.asarray(back.targets),
    x,
    labels,
    num_models=2,
    steps=2,
    batch_size=4,
    weight_decay=5e-3,
    flip=False,
    max_shift=1,
    seed=0,
  )
  assert res.accuracies.shape == (2,) and res.steps == 2
  _assert_finite(res.final_losses)

  # The one-model step `retrain` batches (run above): evaluated abstractly
  # here, since compiling it once more would only cost time.
  fm = model_fn(int(retrain.model_seeds(0, 1)[0]))
  tx = optax.adam(1e-3)
  step = retrain.make_step(fm, tx, batch_size=4, flip=False, max_shift=0)
  carry = (fm.params, fm.state, tx.init(fm.params))
  out, step_loss = jax.eval_shape(
    step, *carry, x, labels, retrain.model_key(0, 0), 0
  )
  assert jax.tree.structure(out) == jax.tree.structure(carry)
  assert step_loss.shape == ()


# The objective does not matter to who owns the buffers: the primal term
# alone compiles in a fraction of the time of the DeepKKT one.
CHEAP = {"eta": 0.0, "beta_stationarity": 0.0}


def test_synthesis_never_deletes_its_inputs(model):
  # Without pixel bounds the synthesizer used x0 itself as its state,
  # and the donating step deleted the caller's array (issue 18).
  apply_fn, params, _, x, _ = model
  targets = jnp.asarray(synthesize.class_targets(2, C))
  x0 = synthesize.noise_init(jax.random.key(1), len(targets), SHAPE)
  active = jnp.asarray(np.ones(len(targets), bool))
  synth = synthesize.make_synthesizer(apply_fn, **CHEAP)
  _reused(synthesize.check_candidates, apply_fn, params, x0, targets)

  state = _reused(
    synthesize.synthesize, synth, params, KEY, x0, targets, steps=2
  )
  # Resuming from a state leaves the caller's state usable.
  later = _reused(
    synthesize.synthesize,
    synth,
    params,
    KEY,
    x0,
    targets,
    steps=3,
    state=state,
  )
  assert int(state.step) == 2 and int(later.step) == 3

  # The factory's own loop, as the module docstring shows it: only the
  # state init_fn made is donated, never x0, active or params.
  def run(params, x0, targets, active):
    state = synth.init_fn(KEY, params, x0, targets, active)
    return synth.step(state, params, targets, KEY)

  new, metrics = _reused(run, params, x0, targets, active)
  assert int(new.step) == 1
  _assert_finite(metrics)
  # A synthesizer assembled from pure functions (as the baseline does)
  # gets the same jitted step.
  rebuilt = synthesize.synthesizer(
    synth.init_fn, synth.step_fn, synth.lambdas_fn, synth.loss_fn
  )
  again, _ = rebuilt.step(
    synth.init_fn(KEY, params, x0, targets, active), params, targets, KEY
  )
  np.testing.assert_allclose(again.x, new.x, rtol=1e-6, atol=1e-6)

  edited, lambdas, kept = _reused(
    synthesize.edit,
    apply_fn,
    params,
    x[:3],
    jnp.asarray([1, 2, 0], jnp.int32),
    KEY,
    steps=2,
    **CHEAP,
  )
  assert edited.shape == (3, *SHAPE) and lambdas.shape == kept.shape == (3,)
  images, soft = _reused(
    synthesize.interpolate,
    apply_fn,
    params,
    x[0],
    0,
    1,
    [0.0, 0.5, 1.0],
    KEY,
    steps=2,
    num_classes=C,
    **CHEAP,
  )
  assert images.shape == (3, *SHAPE) and soft.shape == (3, C)

  recon = baseline.make_reconstructor(apply_fn)
  done = _reused(
    synthesize.synthesize, recon, params, KEY, x0, targets, steps=2
  )
  assert int(done.step) == 2


def test_synthesize_helpers_keep_their_inputs():
  x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
  labels = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
  other = jnp.asarray([1, 2, 0, 2, 0, 1], jnp.int32)
  soft = _reused(synthesize.blend_targets, labels, other, jnp.float32(0.6), C)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(_reused(synthesize.target_labels, soft), other)
  np.testing.assert_array_equal(
    _reused(synthesize.one_hot, labels, C).argmax(-1), labels
  )
  mask = jnp.asarray([True] * 5 + [False])
  assert float(_reused(synthesize.tv_prior, x, mask)) > 0
  center = jnp.asarray(INFO.pixel_min)
  assert float(_reused(synthesize.norm_prior, x, mask, center)) > 0
  _reused(synthesize.check_images, x, SHAPE)
  split = {"image": x, "label": labels}
  images, idx = _reused(synthesize.real_init, KEY, split, labels[:3])
  np.testing.assert_array_equal(images, np.asarray(x)[idx])
  mapped, idx = _reused(
    synthesize.other_init, KEY, x, 2, src_info=INFO, dst_info=INFO
  )
  assert mapped.shape == (2, *SHAPE) and mapped.dtype == np.float32
  state = _reused(
    synthesize.initial_state,
    x,
    jnp.zeros(6),
    mask,
    x_tx=optax.adam(0.1),
    lambda_tx=optax.adam(0.1),
  )
  assert int(state.step) == 0 and not bool(state.active[5])
  np.testing.assert_array_equal(state.x, x)
  w = jax.random.normal(KEY, (int(np.prod(SHAPE)), C))
  linear = lambda p, xx: xx.reshape(len(xx), -1) @ p
  loss, metrics = _reused(
    synthesize.synthesis_loss, linear, w, x, jnp.ones(6), mask, labels, KEY
  )
  assert np.isfinite(float(loss)) and "stationarity" in metrics


# ----------------------------------------------------------------------------
# Integer images are rejected at every edge, naming the expected range.

INTEGER_IMAGES = "floating point.*DatasetInfo"


def _uint8(n=N):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, 256, (n, *SHAPE)), jnp.uint8)


# The smallest retraining: the image check fires before any of it runs.
_RETRAIN = dict(
  num_models=1,
  steps=1,
  batch_size=4,
  weight_decay=0.0,
  flip=False,
  max_shift=0,
  seed=0,
)

INTEGER_EDGES = {
  "kkt.weighted_loss_grad": lambda m, u: kkt.weighted_loss_grad(
    m.apply_fn, m.params, u, m.labels, _lambdas()
  ),
  "kkt.stationarity_residual": lambda m, u: kkt.stationarity_residual(
    m.apply_fn, m.params, u, m.labels, _lambdas()
  ),
  "kkt.stationarity_loss": lambda m, u: kkt.stationarity_loss(
    m.apply_fn, m.params, u, m.labels, _lambdas()
  ),
  "kkt.deepkkt_loss": lambda m, u: kkt.deepkkt_loss(
    m.apply_fn, m.params, u, m.labels, _lambdas()
  ),
  "kkt.make_deepkkt_loss": lambda m, u: jax.jit(
    kkt.make_deepkkt_loss(m.apply_fn)
  )(m.params, u, m.labels, _lambdas()),
  "kkt.per_sample_grads": lambda m, u: kkt.per_sample_grads(
    m.apply_fn, m.params, u, m.labels
  ),
  "kkt.per_sample_grad_dots": lambda m, u: kkt.per_sample_grad_dots(
    m.apply_fn, m.params, u, m.labels, m.params
  ),
  "select.select_dsvs": lambda m, u: select.select_dsvs(
    m.apply_fn, m.params, u, m.labels, k=1, max_iters=1
  ),
  "select.fit_lambdas": lambda m, u: select.fit_lambdas(
    m.apply_fn, m.params, u, m.labels, max_iters=1
  ),
  "select.represented_leaves": lambda m, u: select.represented_leaves(
    m.apply_fn, m.params, u, m.labels
  ),
  "select.stationarity_residuals": lambda m, u: select.stationarity_residuals(
    m.apply_fn, m.params, u, m.labels, _lambdas()
  ),
  "synthesize.synthesize": lambda m, u: synthesize.synthesize(
    synthesize.make_synthesizer(m.apply_fn),
    m.params,
    KEY,
    u,
    m.labels,
    steps=1,
  ),
  "synthesize.edit": lambda m, u: synthesize.edit(
    m.apply_fn, m.params, u, m.labels, KEY, steps=1
  ),
  "synthesize.interpolate": lambda m, u: synthesize.interpolate(
    m.apply_fn, m.params, u[0], 0, 1, [0.5], KEY, steps=1, num_classes=C
  ),
  "synthesize.other_init": lambda m, u: synthesize.other_init(
    KEY, u, 2, src_info=INFO, dst_info=INFO
  ),
  "baseline.make_reconstructor": lambda m, u: baseline.make_reconstructor(
    m.apply_fn
  ).init_fn(KEY, m.params, u, m.labels),
  "retrain.retrain images": lambda m, u: retrain.retrain(
    m.model_fn, u, m.labels, m.x, m.labels, **_RETRAIN
  ),
  "retrain.retrain eval_images": lambda m, u: retrain.retrain(
    m.model_fn, m.x, m.labels, u, m.labels, **_RETRAIN
  ),
}


@pytest.mark.parametrize("edge", list(INTEGER_EDGES))
def test_integer_images_are_rejected(model, edge):
  with pytest.raises(ValueError, match=INTEGER_IMAGES):
    INTEGER_EDGES[edge](model, _uint8())


def test_integer_images_are_not_saved(tmp_path):
  n = 3
  dsv = artifacts.DSVSet(
    images=_uint8(n),
    targets=np.arange(n),
    lambdas=np.ones(n),
    active=np.ones(n, bool),
    source="noise",
    source_index=np.full(n, -1),
    confidence=np.ones(n),
    entropy=np.ones(n),
    margin=np.ones(n),
  )
  with pytest.raises(ValueError, match=INTEGER_IMAGES):
    artifacts.save_dsv(tmp_path, dsv, dataset="toy", mean=[0.5], std=[0.25])
  with pytest.raises(ValueError, match=INTEGER_IMAGES):
    synthesize.check_images(np.asarray(_uint8(n)))


# ----------------------------------------------------------------------------
# Negative multipliers: rejected where concrete, allowed on inactive rows.

NEGATIVE = "lambdas must be >= 0"


def _negative() -> jax.Array:
  lambdas = np.linspace(0.5, 1.5, N, dtype=np.float32)
  lambdas[1] = -0.5
  return jnp.asarray(lambdas)


NEGATIVE_EDGES = {
  "kkt.weighted_loss_grad": lambda m: kkt.weighted_loss_grad(
    m.apply_fn, m.params, m.x, m.labels, _negative()
  ),
  "kkt.stationarity_residual": lambda m: kkt.stationarity_residual(
    m.apply_fn, m.params, m.x, m.labels, _negative()
  ),
  "kkt.stationarity_loss": lambda m: kkt.stationarity_loss(
    m.apply_fn, m.params, m.x, m.labels, _negative()
  ),
  "kkt.deepkkt_loss": lambda m: kkt.deepkkt_loss(
    m.apply_fn, m.params, m.x, m.labels, _negative()
  ),
  "kkt.make_deepkkt_loss": lambda m: kkt.make_deepkkt_loss(m.apply_fn)(
    m.params, m.x, m.labels, _negative()
  ),
  "select.stationarity_residuals": lambda m: select.stationarity_residuals(
    m.apply_fn, m.params, m.x, m.labels, _negative()
  ),
}


@pytest.mark.parametrize("edge", list(NEGATIVE_EDGES))
def test_negative_multipliers_are_rejected(model, edge):
  with pytest.raises(ValueError, match=NEGATIVE):
    NEGATIVE_EDGES[edge](model)


def test_negative_multipliers_of_inactive_rows_or_traced_pass(model):
  apply_fn, params, _, x, labels = model
  # The mask's disqualified candidates: lambda went negative, active False.
  inactive = jnp.asarray(np.arange(N) != 1)
  total, aux = kkt.deepkkt_loss(
    apply_fn, params, x, labels, _negative(), active=inactive
  )
  assert np.isfinite(float(total)) and int(aux["num_active"]) == N - 1
  # Traced values are unknown when the check runs: not checked.
  (traced, _), _ = _value_and_grads(apply_fn)(
    params, x, labels, _negative(), _mask()
  )
  assert np.isfinite(float(traced))
