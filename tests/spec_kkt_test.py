"""Specification tests of the DeepKKT loss's derivatives with respect to
the trained parameters (bilevel and meta-learning users differentiate
there), over the whole grid of the loss's knobs.

The reference is written here from the module docstring's formula,
independently of `dsv_jax.kkt`:

  L_kkt = beta_stat * D(theta, -sum_i lambda_i grad_theta L_i)
          + beta_primal * mean_{active} [gated] CE_i,

with D on the flattened vector theta (l1_mean: mean |theta + g|, l2_sq:
|theta + g|^2, cosine: 1 - cos(theta, -g)); and the synthesis objective
``L_kkt(X) + eta * L_kkt(A(X))`` (`synthesize.make_synthesizer`). Both
methods ("fast", "reverse") must give the reference's value and its
gradients with respect to params, x and lambdas; the reference's own
gradient is checked against central finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dsv_jax import kkt, synthesize

N, D, H, C = 6, 4, 5, 3


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def apply_fn(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(rng.standard_normal((D, H)) / 2),
    "b1": jnp.asarray(0.1 * rng.standard_normal(H)),
    "w2": jnp.asarray(rng.standard_normal((H, C))),
    "b2": jnp.asarray(0.1 * rng.standard_normal(C)),
  }
  x = jnp.asarray(rng.standard_normal((N, D)))
  logits = np.asarray(apply_fn(params, x))
  # Half the candidates classified as their target, half not, so the gate
  # matters.
  pred = logits.argmax(-1)
  targets = np.where(np.arange(N) % 2 == 0, pred, (pred + 1) % C)
  lambdas = jnp.asarray(rng.uniform(0.2, 1.5, N))
  active = jnp.asarray(np.arange(N) != 3)
  return params, x, jnp.asarray(targets), lambdas, active


def reference_kkt(params, x, targets, lambdas, active, *, bs, bp, gated, dist):
  lam = jnp.where(active, lambdas, 0.0)

  def weighted(p):
    logp = jax.nn.log_softmax(apply_fn(p, x))
    ce = -jnp.take_along_axis(logp, targets[:, None], 1)[:, 0]
    return jnp.sum(lam * ce)

  theta, _ = ravel_pytree(params)
  g, _ = ravel_pytree(jax.grad(weighted)(params))
  r = theta + g
  if dist == "l1_mean":
    stat = jnp.mean(jnp.abs(r))
  elif dist == "l2_sq":
    stat = jnp.sum(r * r)
  else:
    stat = 1.0 - jnp.dot(theta, -g) / (
      jnp.linalg.norm(theta) * jnp.linalg.norm(g)
    )
  logits = apply_fn(params, x)
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.take_along_axis(logp, targets[:, None], 1)[:, 0]
  if gated:
    ce = jnp.where(jnp.argmax(logits, -1) == targets, 0.0, ce)
  primal = jnp.sum(jnp.where(active, ce, 0.0)) / jnp.sum(active)
  return bs * stat + bp * primal


# Every pair of knob values occurs (beta = 1 is the existing tests' case):
# (beta_stationarity, distance, gated).
GRID = [
  (0.35, "l1_mean", True),
  (2.5, "l1_mean", False),
  (0.35, "l2_sq", False),
  (2.5, "l2_sq", True),
  (0.35, "cosine", True),
  (2.5, "cosine", False),
]

# Both methods in one pass, and the fast one streamed in chunks of 4 (the
# last chunk padded): a separate code path.
VARIANTS = [("fast", None), ("reverse", None), ("fast", 4)]


def test_params_gradient_of_every_method_matches_reference_over_grid(x64):
  params, x, targets, lambdas, active = problem()

  def all_values_and_grads():
    out = []
    for bs, dist, gated in GRID:
      kw = dict(bs=bs, bp=0.7, gated=gated, dist=dist)
      ref = jax.value_and_grad(reference_kkt, argnums=(0, 1, 3))(
        params, x, targets, lambdas, active, **kw
      )
      got = []
      for method, chunk in VARIANTS:

        def total(
          p, xx, lam, method=method, chunk=chunk, bs=bs, dist=dist, gated=gated
        ):
          return kkt.deepkkt_loss(
            apply_fn,
            p,
            xx,
            targets,
            lam,
            active=active,
            beta_stationarity=bs,
            beta_primal=0.7,
            gated=gated,
            distance=dist,
            method=method,
            chunk_size=chunk,
          )[0]

        grads = jax.value_and_grad(total, argnums=(0, 1, 2))
        got.append(grads(params, x, lambdas))
      out.append((ref, got))
    return out

  for (bs, dist, gated), (ref, got) in zip(
    GRID, jax.jit(all_values_and_grads)(), strict=True
  ):
    for (method, chunk), value_and_grads in zip(VARIANTS, got, strict=True):
      err = (
        f"method={method} chunk_size={chunk} beta_stationarity={bs} "
        f"distance={dist} gated={gated}"
      )
      jax.tree.map(
        lambda a, b, err=err: np.testing.assert_allclose(
          a, b, rtol=1e-8, atol=1e-11, err_msg=err
        ),
        value_and_grads,
        ref,
      )


@pytest.mark.parametrize("dist", kkt.DISTANCES)
def test_reference_params_gradient_against_finite_differences(x64, dist):
  # The reference is differentiated by JAX; a directional central
  # difference checks that it is the derivative of the value it computes.
  params, x, targets, lambdas, active = problem(1)
  kw = dict(bs=1.7, bp=0.7, gated=True, dist=dist)
  f = jax.jit(lambda p: reference_kkt(p, x, targets, lambdas, active, **kw))
  rng = np.random.default_rng(2)
  direction = jax.tree.map(
    lambda a: jnp.asarray(rng.standard_normal(a.shape)), params
  )
  eps = 1e-6
  shifted = lambda s: jax.tree.map(
    lambda a, d: a + s * eps * d, params, direction
  )
  fd = (f(shifted(1.0)) - f(shifted(-1.0))) / (2 * eps)
  grad = jax.jit(
    jax.grad(
      lambda p: kkt.deepkkt_loss(
        apply_fn,
        p,
        x,
        targets,
        lambdas,
        active=active,
        beta_stationarity=1.7,
        beta_primal=0.7,
        distance=dist,
      )[0]
    )
  )(params)
  analytic = sum(
    jnp.vdot(a, d)
    for a, d in zip(
      jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True
    )
  )
  np.testing.assert_allclose(analytic, fd, rtol=1e-5)


@pytest.mark.parametrize("method", kkt.METHODS)
def test_synthesis_objective_params_gradient_over_eta(x64, method):
  # loss_fn = L_kkt(X) + eta * L_kkt(A(X)); A is a fixed, deterministic
  # map here so the reference can apply it too.
  params, x, targets, lambdas, active = problem(3)
  augment = lambda key, z: 0.8 * z[:, ::-1] + 0.1
  lambda_param = jnp.log(jnp.expm1(lambdas))  # softplus^-1
  # A covering set: every value of every knob, both gate settings with
  # eta > 0.
  cases = [
    (0.0, 0.5, "l2_sq", True),
    (2.0, 3.0, "cosine", False),
    (2.0, 0.5, "l1_mean", True),
    (1.5, 3.0, "l2_sq", False),
  ]

  def run():
    out = []
    for eta, bs, dist, gated in cases:
      synth = synthesize.make_synthesizer(
        apply_fn,
        eta=eta,
        beta_stationarity=bs,
        beta_primal=0.6,
        gated=gated,
        distance=dist,
        augment_fn=augment,
        method=method,
      )
      got = jax.value_and_grad(
        lambda p, synth=synth: synth.loss_fn(
          p, x, lambda_param, active, targets, jax.random.key(0)
        )[0]
      )(params)
      kw = dict(bs=bs, bp=0.6, gated=gated, dist=dist)
      ref = jax.value_and_grad(
        lambda p, kw=kw, eta=eta: (
          reference_kkt(p, x, targets, lambdas, active, **kw)
          + eta
          * reference_kkt(p, augment(None, x), targets, lambdas, active, **kw)
        )
      )(params)
      out.append((got, ref))
    return out

  for case, (got, ref) in zip(cases, jax.jit(run)(), strict=True):
    jax.tree.map(
      lambda a, b, case=case: np.testing.assert_allclose(
        a,
        b,
        rtol=1e-8,
        atol=1e-11,
        err_msg=f"eta, beta, distance, gated={case}",
      ),
      got,
      ref,
    )
