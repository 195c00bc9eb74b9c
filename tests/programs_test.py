"""What the jitted programs hold: parameters are arguments, not constants.

A closed-over parameter becomes a constant of the compiled program: slow
compiles (about 45 MB of literals for a ResNet-18), no compile-cache hit
for another classifier of the same architecture, no effect of placing the
parameters on devices, and an error for arrays that span several hosts.
Every program that `select.fit_lambdas` and a synthesis run compile is
lowered here and its constants measured.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import models, parallel, select, synthesize

_CONSTANT = re.compile(
  r"stablehlo\.constant .*?: tensor<([0-9x]*?)x?[a-z]+[0-9]*>"
)


def _largest_constant(text: str) -> int:
  sizes = [
    int(np.prod([int(d) for d in dims.split("x") if d])) if dims else 1
    for dims in _CONSTANT.findall(text)
  ]
  return max(sizes, default=0)


@pytest.fixture
def lowered(monkeypatch):
  """Records `(name, StableHLO text)` of every call of a `jax.jit` function
  created while the test runs."""
  texts = []
  real_jit = jax.jit

  def recording_jit(fun=None, **kwargs):
    if fun is None:  # Used as partial(jax.jit, ...) decorator.
      return lambda f: recording_jit(f, **kwargs)
    jitted = real_jit(fun, **kwargs)

    @functools.wraps(fun)
    def call(*args, **kw):
      texts.append((fun.__name__, jitted.lower(*args, **kw).as_text()))
      return jitted(*args, **kw)

    return call

  monkeypatch.setattr(jax, "jit", recording_jit)
  return texts


def _classifier():
  # BatchNorm: its statistics are closed over by apply_fn and may stay
  # constants (channel-sized); the weights may not.
  model = models.build_model(
    "convnet",
    image_shape=(8, 8, 1),
    num_classes=10,
    key=jax.random.key(0),
    width=16,
    depth=2,
    norm="batch",
  )
  apply_fn, params = models.nnx_apply_fn(model)
  x = jax.random.normal(jax.random.key(1), (40, 8, 8, 1))
  return apply_fn, params, x, jnp.arange(40) % 10


def _assert_no_parameter_constants(texts, params):
  largest_leaf = max(leaf.size for leaf in jax.tree.leaves(params))
  assert texts, "no jitted program ran"
  for name, text in texts:
    assert _largest_constant(text) < largest_leaf, name


def test_the_selection_programs_take_theta_as_an_argument(lowered):
  apply_fn, params, x, y = _classifier()
  select.fit_lambdas(
    apply_fn, params, np.asarray(x), np.asarray(y), max_iters=3
  )
  _assert_no_parameter_constants(lowered, params)


def test_the_synthesis_step_takes_theta_as_an_argument(lowered):
  apply_fn, params, x, y = _classifier()
  synth = synthesize.make_synthesizer(apply_fn)
  synthesize.synthesize(
    synth, params, jax.random.key(0), x[:10], y[:10], steps=2
  )
  _assert_no_parameter_constants(lowered, params)


def test_the_audit_sees_a_closed_over_parameter(lowered):
  # The check itself: a closure over a weight matrix is caught.
  w = jnp.ones((16, 32))
  jax.jit(lambda v: v @ w)(jnp.ones(16))
  with pytest.raises(AssertionError):
    _assert_no_parameter_constants(lowered, {"w": w})


def test_predict_compiles_a_few_programs_for_any_number_of_images():
  apply_fn, params, x, _ = _classifier()
  x = np.asarray(jax.random.normal(jax.random.key(2), (300, 8, 8, 1)))
  before = models._logits._cache_size()
  for n in (1, 5, 6, 7, 300):
    logits = models.predict(apply_fn, params, x[:n], batch_size=128)
    np.testing.assert_allclose(
      logits, apply_fn(params, x[:n]), rtol=1e-5, atol=1e-5
    )
  # Shapes 1, 8 (for 5, 6 and 7) and 128 (300 = 128 + 128 + 44 padded).
  assert models._logits._cache_size() - before == 3


@pytest.mark.parametrize("devices", [1, 4])
def test_device_resident_selection_equals_host_streaming(devices, lowered):
  # The accelerator strategy (the set on device, one program per pass)
  # against the CPU one (chunks streamed from the host): same lambdas,
  # same residuals, and theta is an argument of its programs too.
  apply_fn, params, x, y = _classifier()
  x, y = np.asarray(x), np.asarray(y)
  kw = {"max_iters": 5, "chunk_size": 12, "mesh": parallel.make_mesh(devices)}
  fits = {
    s: select.fit_lambdas(apply_fn, params, x, y, strategy=s, **kw)
    for s in ("host", "device")
  }
  np.testing.assert_allclose(
    fits["device"][0], fits["host"][0], rtol=1e-4, atol=1e-7
  )
  for key in ("residual", "residual_all", "objective"):
    np.testing.assert_allclose(
      getattr(fits["device"][1], key), getattr(fits["host"][1], key), rtol=1e-4
    )
  _assert_no_parameter_constants(lowered, params)
  ran = {name for name, _ in lowered}
  assert {"add_grad", "matvec_all", "rmatvec_all"} <= ran  # Both ran.
  assert select.resolve_strategy("auto") == "host"  # Tests run on CPU.


def test_a_second_classifier_reuses_the_compiled_synthesis_step():
  # Two classifiers of one architecture (different weights): the
  # synthesizer's jitted step compiles once and serves both.
  def build(seed):
    return models.nnx_apply_fn(
      models.build_model(
        "convnet",
        image_shape=(8, 8, 1),
        num_classes=10,
        key=jax.random.key(seed),
        width=8,
        depth=2,
        norm="none",
      )
    )

  apply_fn, params_a = build(0)
  _, params_b = build(1)
  synth = synthesize.make_synthesizer(apply_fn)
  x0 = jax.random.normal(jax.random.key(1), (10, 8, 8, 1))
  y = jnp.arange(10) % 10
  runs = [
    synthesize.synthesize(synth, p, jax.random.key(0), x0, y, steps=2)
    for p in (params_a, params_b)
  ]
  assert synth.step._cache_size() == 1
  # Each run used its own classifier.
  assert not np.allclose(runs[0].x, runs[1].x)
