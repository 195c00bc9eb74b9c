"""Specification tests of `retrain`'s reuse of compiled steps: a retraining
gives the same models whatever ran before it in the process.

`retrain` reuses one compiled K-model step per architecture and recipe.
For every hyperparameter of the step (learning rate, weight decay, batch
size, flip, shift, K, per-model sets) and the architecture, a run that
differs from an earlier one only in it must train as if nothing had run
before: here, as the same run with a model that carries no architecture
identity (``graph=None``, which is never reused), and, for one of them, as
a fresh Python process.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsv_jax import models, parallel, retrain

SHAPE, C, N = (6, 6, 1), 3, 10
BASE = dict(
  steps=3,
  batch_size=4,
  weight_decay=5e-3,
  flip=True,
  max_shift=1,
  learning_rate=1e-2,
  num_models=2,
  seed=0,
  vectorize="unroll",
)

VARIANTS = {
  "learning_rate": dict(learning_rate=3e-2),
  "weight_decay": dict(weight_decay=0.5),
  "batch_size": dict(batch_size=7),
  "flip": dict(flip=False),
  "max_shift": dict(max_shift=2),
  "num_models": dict(num_models=3),
  "per_model": dict(per_model=True),
  "architecture": dict(hidden=(8, 8)),
}


@functools.cache
def mlp(seed, reusable=True, hidden=(8,)):
  fm = models.functional(
    models.build_model(
      "mlp",
      image_shape=SHAPE,
      num_classes=C,
      key=jax.random.key(seed),
      hidden=hidden,
    )
  )
  return fm if reusable else fm._replace(graph=None)


def data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((N, *SHAPE)).astype(np.float32)
  y = (np.arange(N) % C).astype(np.int32)
  return x, y, x[::-1].copy(), y[::-1].copy()


def run(reusable=True, per_model=False, hidden=(8,), **overrides):
  kw = {**BASE, **overrides}
  x, y, ex, ey = data()
  if per_model:  # One set per model: the set, and the set reversed.
    x = np.stack([x, x[::-1]][: kw["num_models"]])
    y = np.stack([y, y[::-1]][: kw["num_models"]])
  model_fn = functools.partial(mlp, reusable=reusable, hidden=hidden)
  # One device: the same program, compiled faster than one replicated
  # over the test session's four fake devices.
  mesh = parallel.make_mesh(1)
  return retrain.retrain(model_fn, x, y, ex, ey, mesh=mesh, **kw)


def summary(res):
  """Everything a run returns that depends on the training, as floats."""
  return {
    "final_losses": np.asarray(res.final_losses, np.float64).tolist(),
    "accuracies": np.asarray(res.accuracies, np.float64).tolist(),
    "params": [
      np.asarray(leaf, np.float64).ravel().tolist()
      for leaf in jax.tree.leaves(res.params)
    ],
  }


def _assert_same(a, b, what):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(
      np.concatenate([np.ravel(v) for v in a[key]])
      if key == "params"
      else a[key],
      np.concatenate([np.ravel(v) for v in b[key]])
      if key == "params"
      else b[key],
      err_msg=f"{what}: {key}",
    )


@pytest.fixture(scope="module")
def base():
  return summary(run())


@pytest.mark.parametrize("name", VARIANTS)
def test_each_hyperparameter_gets_its_own_step(base, name):
  after = summary(run(**VARIANTS[name]))  # the base recipe ran before it
  # A step built for the base recipe would have reproduced the base run
  # (same seeds, same data).
  assert after["final_losses"] != base["final_losses"], name
  # And the base recipe, run again, still gets its own step.
  _assert_same(summary(run()), base, f"base after {name}")


def test_a_reused_step_trains_as_a_freshly_built_one(base):
  del base  # the base recipe has run in this process
  variant = VARIANTS["learning_rate"]
  after = summary(run(**variant))
  _assert_same(after, summary(run(reusable=False, **variant)), "fresh step")


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_trains_as_a_freshly_built_step(base, name):
  del base
  variant = VARIANTS[name]
  after = summary(run(**variant))
  _assert_same(after, summary(run(reusable=False, **variant)), name)


@pytest.mark.slow
def test_second_call_in_a_process_equals_a_fresh_process(base):
  del base  # the base recipe has run in this process
  here = summary(run(**VARIANTS["learning_rate"]))
  tests = os.path.dirname(os.path.abspath(__file__))
  code = (
    f"import sys, json; sys.path.insert(0, {tests!r}); "
    "import spec_retrain_test as m; "
    "print(json.dumps(m.summary(m.run(**m.VARIANTS['learning_rate']))))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
    env={**os.environ, "PYTHONPATH": os.path.dirname(tests)},
  )
  fresh = json.loads(out.stdout.strip().splitlines()[-1])
  _assert_same(here, fresh, "fresh process")
