"""Float32 matmuls in the DeepKKT terms and in selection, whatever the
ambient default precision.

By default TPUs multiply float32 in bfloat16 passes and Ampere+ GPUs in
TF32; XLA:CPU ignores the setting. So the tests look at what CPU can see:

* the lowered programs: under an ambient default of bfloat16, every
  dot_general and convolution carries precision HIGHEST;
* the values, through a model that computes like a TPU: it rounds its
  matmul inputs to bfloat16 unless traced at the highest precision. Under
  an ambient bfloat16 default it must give what the plain float32 model
  gives.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import kkt, select

N, C = 12, 3


def _round_unless_highest(a):
  # The precision in effect when the model is traced (as JAX fixes it).
  if jax.config.jax_default_matmul_precision in ("highest", "float32"):
    return a
  return a.astype(jnp.bfloat16).astype(a.dtype)


def make_apply(tpu_like, seen=None):
  round_ = _round_unless_highest if tpu_like else lambda a: a

  def apply_fn(params, x):
    if seen is not None:
      seen.append(jax.config.jax_default_matmul_precision)
    h = jax.lax.conv_general_dilated(
      round_(x),
      round_(params["conv"]),
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    h = jnp.tanh(h).mean(axis=(1, 2))
    return round_(h) @ round_(params["dense"]) + params["bias"]

  return apply_fn


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "conv": rng.standard_normal((3, 3, 2, 4)) / 3.0,
    "dense": rng.standard_normal((4, C)),
    "bias": 0.1 * rng.standard_normal(C),
  }
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  x = rng.standard_normal((N, 5, 5, 2)).astype(np.float32)
  targets = rng.integers(0, C, N).astype(np.int32)
  lambdas = rng.uniform(0.1, 1.0, N).astype(np.float32)
  return params, x, targets, lambdas


def kkt_functions(apply_fn):
  """Every public DeepKKT path with matmuls, as functions of (x, lambdas)."""
  params, _, targets, _ = make_problem()

  def grad(method, chunk_size):
    kw = dict(method=method, chunk_size=chunk_size)
    loss = lambda x, lam: kkt.deepkkt_loss(
      apply_fn, params, x, targets, lam, **kw
    )[0]
    return jax.value_and_grad(loss, argnums=(0, 1))

  out = {
    f"{method}-{chunk}": grad(method, chunk)
    for method in kkt.METHODS
    for chunk in (None, 8)
  }
  out["residual"] = lambda x, lambdas: kkt.stationarity_residual(
    apply_fn, params, x, targets, lambdas, chunk_size=8
  )
  out["dots"] = lambda x, lambdas: kkt.per_sample_grad_dots(
    apply_fn, params, x, targets, params, chunk_size=8
  )
  out["per_sample"] = lambda x, lambdas: kkt.per_sample_grads(
    apply_fn, params, x, targets
  )
  return out


def test_lowered_matmuls_are_highest_under_a_bfloat16_default():
  _, x, _, lambdas = make_problem()
  with jax.default_matmul_precision("bfloat16"):
    for name, fn in kkt_functions(make_apply(False)).items():
      text = jax.jit(fn).lower(x, lambdas).as_text()
      ops = re.findall(r"stablehlo\.(?:dot_general|convolution).*", text)
      assert ops, name
      for op in ops:
        # dot_general: precision = [HIGHEST, HIGHEST]; convolution:
        # precision_config = [#stablehlo<precision HIGHEST>, ...].
        assert len(re.findall(r"\bHIGHEST\b", op)) == 2, (name, op)


def test_kkt_values_do_not_change_under_a_bfloat16_default():
  _, x, _, lambdas = make_problem()
  exact = kkt_functions(make_apply(False))
  with jax.default_matmul_precision("bfloat16"):
    tpu = kkt_functions(make_apply(True))
    results = {name: jax.jit(fn)(x, lambdas) for name, fn in tpu.items()}
  for name, fn in exact.items():
    jax.tree.map(
      lambda a, b, name=name: np.testing.assert_allclose(
        a, b, rtol=1e-6, atol=1e-9, err_msg=name
      ),
      results[name],
      jax.jit(fn)(x, lambdas),
    )


def test_the_tpu_like_model_rounds_at_default_precision():
  # The model the tests above rely on: it does differ at bfloat16.
  params, x, _, _ = make_problem()
  exact = make_apply(False)(params, x)
  with jax.default_matmul_precision("bfloat16"):
    rounded = make_apply(True)(params, x)
  assert float(jnp.max(jnp.abs(rounded - exact))) > 1e-4


@pytest.mark.parametrize("wrt", ["auto", "all"])
def test_selection_under_a_bfloat16_default(wrt):
  params, x, targets, _ = make_problem(seed=1)
  kw = dict(wrt=wrt, max_iters=15, chunk_size=8)
  lambdas, info = select.fit_lambdas(
    make_apply(False), params, x, targets, **kw
  )
  residuals = select.stationarity_residuals(
    make_apply(False), params, x, targets, lambdas, chunk_size=8
  )
  seen = []
  with jax.default_matmul_precision("bfloat16"):
    tpu_apply = make_apply(True, seen)
    tpu_lambdas, tpu_info = select.fit_lambdas(
      tpu_apply, params, x, targets, **kw
    )
    tpu_residuals = select.stationarity_residuals(
      tpu_apply, params, x, targets, lambdas, chunk_size=8
    )
  # Every trace of the model (the operator, the represented leaves, the
  # weights, the residuals) ran at the highest precision.
  assert seen and set(seen) == {kkt.MATMUL_PRECISION}
  np.testing.assert_allclose(tpu_lambdas, lambdas, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(tpu_info.residual, info.residual, rtol=1e-5)
  assert tpu_info.represented.excluded == info.represented.excluded
  np.testing.assert_allclose(tpu_residuals, residuals, rtol=1e-6)
