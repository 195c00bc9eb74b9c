"""Tests for dsv_jax.kkt: known answers, fast paths against the explicit
per-sample reference, gradient checks, masks, jit, errors and doctests.

Everything numeric runs in float64 inside the `x64` fixture (a context
manager, so modules sharing the process are unaffected).
"""

import doctest
import gc

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dsv_jax import checks, kkt

N, D, C = 7, 5, 3  # samples, MLP input features, classes


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ----------------------------------------------------------------------------
# Tiny pure-JAX models (smooth activations so that check_grads is meaningful).


# Test data comes from numpy: eager jax.random calls would each compile a
# small XLA program, which dominates the run time of a suite this size.


def normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape))


def mlp_init(rng, d_in=D, hidden=6, c=C):
  return {
    "hidden": {
      "w": normal(rng, d_in, hidden) / np.sqrt(d_in),
      "b": 0.1 * normal(rng, hidden),
    },
    "head": {"w": normal(rng, hidden, c), "b": jnp.zeros(c)},
  }


def mlp_body(p, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ p["w"] + p["b"])


def mlp_apply(params, x):
  h = mlp_body(params["hidden"], x)
  return h @ params["head"]["w"] + params["head"]["b"]


def conv_init(rng, c_in=2, width=3, hw=6, c=C):
  return {
    "conv1": normal(rng, 3, 3, c_in, width) / 3.0,
    "conv2": normal(rng, 3, 3, width, width) / 4.0,
    "dense": normal(rng, (hw // 2) ** 2 * width, c) / 3.0,
  }


def conv_apply(params, x):
  def conv(h, w):
    return jax.lax.conv_general_dilated(
      h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  h = jax.nn.softplus(conv(x, params["conv1"]))
  h = jax.nn.softplus(conv(h, params["conv2"]))
  b, hh, ww, ch = h.shape  # 2x2 average pool
  h = h.reshape(b, hh // 2, 2, ww // 2, 2, ch).mean(axis=(2, 4))
  return h.reshape(b, -1) @ params["dense"]


MODELS = {
  "mlp": (mlp_init, mlp_apply, (N, D)),
  "conv": (conv_init, conv_apply, (N, 6, 6, 2)),
}


def make_problem(model="mlp", soft=False, seed=0):
  init, apply_fn, x_shape = MODELS[model]
  rng = np.random.default_rng(seed)
  params = init(rng)
  x = normal(rng, *x_shape)
  if soft:
    logits = 2.0 * rng.standard_normal((N, C))
    soft_targets = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    targets = jnp.asarray(soft_targets)
  else:
    targets = jnp.asarray(rng.integers(0, C, N))
  lambdas = jnp.asarray(rng.uniform(0.1, 1.0, N))
  return apply_fn, params, x, targets, lambdas


# ----------------------------------------------------------------------------
# Obvious references, built from explicit per-sample gradients.


def reference_weighted_grad(apply_fn, params, x, targets, lambdas):
  per_sample = kkt.per_sample_grads(apply_fn, params, x, targets)
  return jax.tree.map(lambda g: jnp.tensordot(lambdas, g, 1), per_sample)


def reference_distance(params, g, distance):
  theta, _ = ravel_pytree(params)
  gv, _ = ravel_pytree(g)
  r = theta + gv
  if distance == "l1_mean":
    return jnp.mean(jnp.abs(r))
  if distance == "l2_sq":
    return jnp.sum(r**2)
  cos = jnp.dot(theta, -gv) / (jnp.linalg.norm(theta) * jnp.linalg.norm(gv))
  return 1.0 - cos


def reference_stationarity(apply_fn, params, x, targets, lambdas, distance):
  g = reference_weighted_grad(apply_fn, params, x, targets, lambdas)
  return reference_distance(params, g, distance)


def assert_trees_close(a, b, rtol=1e-10, atol=1e-12):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol, atol), a, b)


# ----------------------------------------------------------------------------
# Known answer.


def _linear_apply(params, x):
  return x @ params["w"]


def _fixed_point_problem():
  """A bias-free linear softmax model at an exact stationary point."""
  rng = np.random.default_rng(1)
  x = normal(rng, 6, 4)
  targets = jnp.asarray(rng.integers(0, 3, 6))
  lambdas = jnp.linspace(0.05, 0.15, 6)
  # theta = -sum_i lambda_i grad L_i(theta): for small lambdas the map is a
  # contraction (its Lipschitz constant is about sum_i lambda_i |x_i|^2 / 2).
  step = lambda _, w: (
    -kkt.weighted_loss_grad(_linear_apply, {"w": w}, x, targets, lambdas)["w"]
  )
  w = jax.jit(lambda: jax.lax.fori_loop(0, 200, step, jnp.zeros((4, 3))))()
  return {"w": w}, x, targets, lambdas


@jax.jit
def _linear_losses(params, x, targets, lambdas):
  return {
    d: kkt.stationarity_loss(
      _linear_apply, params, x, targets, lambdas, distance=d
    )
    for d in kkt.DISTANCES
  }


def test_known_answer_zero_residual(x64):
  params, x, targets, lambdas = _fixed_point_problem()
  residual = jax.jit(kkt.stationarity_residual, static_argnums=0)(
    _linear_apply, params, x, targets, lambdas
  )
  assert float(jnp.max(jnp.abs(residual["w"]))) < 1e-12
  assert float(jnp.max(jnp.abs(params["w"]))) > 0.05  # not trivially zero
  for distance, loss in _linear_losses(params, x, targets, lambdas).items():
    assert float(loss) < 1e-8, distance


def test_known_answer_perturbation_makes_residual_positive(x64):
  params, x, targets, lambdas = _fixed_point_problem()
  for xp, lp in [
    (x.at[0, 0].add(0.1), lambdas),
    (x, lambdas.at[2].mul(1.5)),
  ]:
    for distance, loss in _linear_losses(params, xp, targets, lp).items():
      assert float(loss) > 1e-6, distance


# ----------------------------------------------------------------------------
# Fast paths against the explicit per-sample reference.


# (model, soft targets, chunk_size): every model and target kind, with and
# without chunking (3 does not divide N = 7: the padded last chunk).
CASES = [
  ("mlp", False, None),
  ("mlp", True, 3),
  ("conv", False, 3),
  ("conv", True, None),
]


@pytest.mark.parametrize("model,soft,chunk_size", CASES)
def test_matrix_free_products_match_per_sample(x64, model, soft, chunk_size):
  # G @ lambda (weighted_loss_grad, stationarity_residual) and G^T @ v
  # (per_sample_grad_dots) against the explicit per-sample gradients G.
  apply_fn, params, x, targets, lambdas = make_problem(model, soft)
  rng = np.random.default_rng(5)
  direction = jax.tree.map(lambda p: normal(rng, *p.shape), params)

  @jax.jit
  def run(params, x, targets, lambdas, direction):
    kw = dict(chunk_size=chunk_size)
    per_sample = kkt.per_sample_grads(apply_fn, params, x, targets)
    contract = lambda g, v: jnp.einsum("n...,...->n", g, v)
    return (
      kkt.weighted_loss_grad(apply_fn, params, x, targets, lambdas, **kw),
      kkt.stationarity_residual(apply_fn, params, x, targets, lambdas, **kw),
      kkt.per_sample_grad_dots(apply_fn, params, x, targets, direction, **kw),
      jax.tree.map(lambda g: jnp.tensordot(lambdas, g, 1), per_sample),
      sum(jax.tree.leaves(jax.tree.map(contract, per_sample, direction))),
    )

  grad, residual, dots, ref_grad, ref_dots = run(
    params, x, targets, lambdas, direction
  )
  assert_trees_close(grad, ref_grad)
  assert_trees_close(residual, jax.tree.map(jnp.add, params, ref_grad))
  assert dots.shape == (N,)
  np.testing.assert_allclose(dots, ref_dots, rtol=1e-10, atol=1e-12)


def test_per_sample_grads_shape_and_values(x64):
  apply_fn, params, x, targets, _ = make_problem("mlp")
  loss_3 = lambda p: kkt.cross_entropy(apply_fn(p, x[3:4]), targets[3:4])[0]
  per_sample, one = jax.jit(
    lambda p: (
      kkt.per_sample_grads(apply_fn, p, x, targets),
      jax.grad(loss_3)(p),
    )
  )(params)
  assert per_sample["head"]["w"].shape == (N, 6, C)
  assert_trees_close(jax.tree.map(lambda g: g[3], per_sample), one)


@pytest.mark.parametrize(
  "model,distance",
  [("mlp", d) for d in kkt.DISTANCES] + [("conv", "l1_mean")],
)
def test_stationarity_loss_and_grads_match_reference(x64, model, distance):
  apply_fn, params, x, targets, lambdas = make_problem(model)

  def loss(x, lambdas, method):
    return kkt.stationarity_loss(
      apply_fn, params, x, targets, lambdas, distance=distance, method=method
    )

  def ref(x, lambdas):
    return reference_stationarity(
      apply_fn, params, x, targets, lambdas, distance
    )

  @jax.jit
  def run(x, lambdas):
    value_and_grad = lambda f, *a: jax.value_and_grad(f, (0, 1))(x, lambdas, *a)
    return [value_and_grad(ref)] + [
      value_and_grad(loss, m) for m in kkt.METHODS
    ]

  (ref_value, ref_grads), *results = run(x, lambdas)
  for value, grads in results:
    np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    assert_trees_close(grads, ref_grads, rtol=1e-8, atol=1e-12)


def test_l1_mean_is_mean_over_all_scalars_not_of_leaf_means(x64):
  params = {"big": jnp.ones((10,)), "small": jnp.full((2,), 4.0)}
  apply_fn = lambda p, x: x @ jnp.zeros((1, 2))  # g = 0: loss = mean|theta|
  x, targets, lambdas = jnp.ones((1, 1)), jnp.array([0]), jnp.ones(1)
  loss = kkt.stationarity_loss(
    apply_fn, params, x, targets, lambdas, distance="l1_mean"
  )
  np.testing.assert_allclose(loss, (10 * 1.0 + 2 * 4.0) / 12)


def test_default_distance_is_the_documented_one(x64):
  # One default everywhere: kkt, the synthesizer and the configs.
  import inspect

  from dsv_jax import configs, synthesize

  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  default = kkt.stationarity_loss(apply_fn, params, x, targets, lambdas)
  cosine = reference_stationarity(
    apply_fn, params, x, targets, lambdas, kkt.DEFAULT_DISTANCE
  )
  np.testing.assert_allclose(default, cosine, rtol=1e-10)
  assert kkt.DEFAULT_DISTANCE == "cosine"
  sig = inspect.signature(synthesize.make_synthesizer)
  assert sig.parameters["distance"].default == kkt.DEFAULT_DISTANCE
  for name in configs.CONFIGS:
    assert configs.get_config(name).kkt.distance == kkt.DEFAULT_DISTANCE


# ----------------------------------------------------------------------------
# Gradient checks and the fast custom VJP against reverse-over-reverse.


@pytest.mark.parametrize("method", kkt.METHODS)
def test_check_grads_stationarity_loss(x64, method):
  apply_fn, params, x, targets, lambdas = make_problem("mlp", seed=3)

  def loss(x, lambdas):
    return kkt.stationarity_loss(
      apply_fn, params, x, targets, lambdas, distance="l2_sq", method=method
    )

  jax.test_util.check_grads(
    jax.jit(loss), (x, lambdas), order=1, modes=["rev"], atol=1e-6, rtol=1e-6
  )


@pytest.mark.parametrize(
  "model,distance,soft",
  [
    ("mlp", "l1_mean", False),
    ("mlp", "cosine", True),
    ("conv", "l2_sq", True),
    ("conv", "l1_mean", False),
  ],
)
def test_fast_equals_reverse_deepkkt_all_arguments(x64, model, distance, soft):
  apply_fn, params, x, targets, lambdas = make_problem(model, soft)
  active = jnp.arange(N) % 3 != 1

  def grads(method, chunk_size=None):
    def total(params, x, targets, lambdas):
      return kkt.deepkkt_loss(
        apply_fn,
        params,
        x,
        targets,
        lambdas,
        active=active,
        beta_primal=0.7,
        distance=distance,
        method=method,
        chunk_size=chunk_size,
      )[0]

    argnums = (0, 1, 2, 3) if soft else (0, 1, 3)
    return jax.value_and_grad(total, argnums=argnums)(
      params, x, targets, lambdas
    )

  reverse, fast, fast_chunked = jax.jit(
    lambda: (grads("reverse"), grads("fast"), grads("fast", chunk_size=3))
  )()
  assert_trees_close(fast, reverse, rtol=1e-9, atol=1e-12)
  assert_trees_close(fast_chunked, reverse, rtol=1e-9, atol=1e-12)


def test_fast_partial_parameter_perturbation(x64):
  # Only the head is differentiated; the hidden leaves are closed over and
  # take the custom VJP's "unperturbed" branch.
  apply_fn, params, x, targets, lambdas = make_problem("mlp")

  def loss(head_w, method):
    p = {**params, "head": {**params["head"], "w": head_w}}
    return kkt.stationarity_loss(
      apply_fn, p, x, targets, lambdas, method=method, distance="l2_sq"
    )

  grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
  w = params["head"]["w"]
  np.testing.assert_allclose(
    grad_fn(w, "fast"), grad_fn(w, "reverse"), rtol=1e-10
  )


def test_fast_method_lambdas_only(x64):
  # Selection differentiates lambdas alone: the fast path is one jvp.
  apply_fn, params, x, targets, lambdas = make_problem("conv")

  def loss(lambdas, distance, method):
    return kkt.stationarity_loss(
      apply_fn, params, x, targets, lambdas, distance=distance, method=method
    )

  grad_fn = jax.jit(jax.grad(loss), static_argnums=(1, 2))
  for distance in kkt.DISTANCES:
    np.testing.assert_allclose(
      grad_fn(lambdas, distance, "fast"),
      grad_fn(lambdas, distance, "reverse"),
      rtol=1e-10,
      atol=1e-14,
    )


def test_subset_stationarity_by_closing_over_frozen_part(x64):
  # Last-layer transfer: only the head is theta*; the body is frozen inside
  # apply_fn. The residual must equal the head block of the full residual.
  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  body = params["hidden"]
  head_apply = lambda head, x: mlp_apply({"hidden": body, "head": head}, x)
  head = params["head"]

  @jax.jit
  def run(x):
    head_residual = kkt.stationarity_residual(
      head_apply, head, x, targets, lambdas
    )
    full_residual = kkt.stationarity_residual(
      apply_fn, params, x, targets, lambdas
    )
    grads = [
      jax.grad(
        lambda x, m=m: kkt.stationarity_loss(
          head_apply, head, x, targets, lambdas, method=m, distance="l1_mean"
        )
      )(x)
      for m in kkt.METHODS
    ]
    ref = jax.grad(
      lambda x: reference_stationarity(
        head_apply, head, x, targets, lambdas, "l1_mean"
      )
    )(x)
    return head_residual, full_residual["head"], grads, ref

  head_residual, full_head_residual, grads, ref = run(x)
  assert_trees_close(head_residual, full_head_residual)
  for gx in grads:
    np.testing.assert_allclose(gx, ref, rtol=1e-9, atol=1e-12)


def _bilevel_problem():
  """A loss of values closed over by apply_fn (bilevel / meta-learning)."""
  apply_fn, params, x, targets, lambdas = make_problem("mlp", soft=True)
  body, head = params["hidden"], params["head"]
  scale = jnp.asarray(np.random.default_rng(5).uniform(0.5, 1.5, C))

  def loss(body, scale, x, lambdas, method, chunk_size=None):
    # Only the head is theta*; the body and a per-class logit scale are
    # closed over, and differentiated by the outer grad.
    head_apply = lambda h, xx: (
      scale * mlp_apply({"hidden": body, "head": h}, xx)
    )
    return kkt.deepkkt_loss(
      head_apply,
      head,
      x,
      targets,
      lambdas,
      distance="l1_mean",
      method=method,
      chunk_size=chunk_size,
    )[0]

  return loss, (body, scale, x, lambdas)


def test_fast_gradients_through_closed_over_values(x64):
  # Before the closures were hoisted, the fast method raised
  # UnexpectedTracerError here.
  loss, args = _bilevel_problem()
  grad_fn = jax.grad(loss, argnums=(0, 1, 2, 3))
  reverse = grad_fn(*args, "reverse")
  for chunk_size in (None, 3):
    fast = grad_fn(*args, "fast", chunk_size)
    assert_trees_close(fast, reverse, rtol=1e-9, atol=1e-12)
  jitted = jax.jit(grad_fn, static_argnums=(4, 5))(*args, "fast", 3)
  assert_trees_close(jitted, reverse, rtol=1e-9, atol=1e-12)


def test_check_grads_through_closed_over_values(x64):
  loss, (body, scale, x, lambdas) = _bilevel_problem()
  jax.test_util.check_grads(
    lambda body, scale: loss(body, scale, x, lambdas, "fast", 3),
    (body, scale),
    order=1,
    modes=["rev"],
  )


def test_forward_mode_needs_the_reverse_method(x64):
  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  loss = lambda x, method: kkt.stationarity_loss(
    apply_fn, params, x, targets, lambdas, method=method
  )
  with pytest.raises(TypeError, match="forward-mode autodiff"):
    jax.jvp(lambda x: loss(x, "fast"), (x,), (jnp.ones_like(x),))
  _, tangent = jax.jvp(lambda x: loss(x, "reverse"), (x,), (jnp.ones_like(x),))
  gx = jax.grad(loss)(x, "fast")
  np.testing.assert_allclose(tangent, jnp.sum(gx), rtol=1e-9)


def test_fast_method_keeps_no_closed_over_array_alive():
  # jax.closure_convert's cache would hold every closed-over array.
  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  shape = (123, 457)  # Recognisable among the live arrays.

  def live():
    return sum(a.shape == shape for a in jax.live_arrays())

  before = live()
  for i in range(3):
    big = jnp.full(shape, float(i))
    closure = lambda p, xx, big=big: apply_fn(p, xx) + big[0, :C]
    jax.grad(
      lambda x, f=closure: kkt.stationarity_loss(f, params, x, targets, lambdas)
    )(x)
    del big, closure
  gc.collect()
  assert live() == before


# ----------------------------------------------------------------------------
# Primal feasibility, masks, the total loss and its diagnostics.


def test_primal_loss_gated_and_ungated(x64):
  logits = jnp.array([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
  targets = jnp.array([0, 2, 1])  # first correct, two wrong
  ce = kkt.cross_entropy(logits, targets)
  np.testing.assert_allclose(
    kkt.primal_loss(logits, targets), (ce[1] + ce[2]) / 3
  )
  np.testing.assert_allclose(
    kkt.primal_loss(logits, targets, gated=False), jnp.mean(ce)
  )
  active = jnp.array([True, True, False])
  np.testing.assert_allclose(
    kkt.primal_loss(logits, targets, active=active), ce[1] / 2
  )
  none_active = jnp.zeros(3, bool)
  assert float(kkt.primal_loss(logits, targets, active=none_active)) == 0.0


def test_primal_loss_soft_targets_gate_on_argmax(x64):
  logits = jnp.array([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
  soft = jnp.array([[0.6, 0.4, 0.0], [0.4, 0.6, 0.0]])
  ce = kkt.cross_entropy(logits, soft)
  np.testing.assert_allclose(
    ce, -jnp.sum(soft * jax.nn.log_softmax(logits), axis=-1)
  )
  # Row 0's target argmax is class 0 = prediction: gated out.
  np.testing.assert_allclose(kkt.primal_loss(logits, soft), ce[1] / 2)
  np.testing.assert_allclose(
    kkt.primal_loss(logits, soft, gated=False), jnp.mean(ce)
  )


@pytest.mark.parametrize("soft,gated", [(False, True), (True, False)])
def test_deepkkt_loss_terms_and_aux(x64, soft, gated):
  apply_fn, params, x, targets, lambdas = make_problem("mlp", soft)

  @jax.jit
  def run(x, targets, lambdas):
    total, aux = kkt.deepkkt_loss(
      apply_fn, params, x, targets, lambdas, beta_primal=0.3, gated=gated
    )
    stat = kkt.stationarity_loss(apply_fn, params, x, targets, lambdas)
    logits = apply_fn(params, x)
    primal = kkt.primal_loss(logits, targets, gated=gated)
    return total, aux, stat, logits, primal

  total, aux, stat, logits, primal = run(x, targets, lambdas)
  np.testing.assert_allclose(total, stat + 0.3 * primal, rtol=1e-12)
  np.testing.assert_allclose(aux["stationarity"], stat, rtol=1e-12)
  np.testing.assert_allclose(aux["primal"], primal, rtol=1e-12)
  np.testing.assert_allclose(aux["total"], total, rtol=1e-12)
  assert int(aux["num_active"]) == N
  labels = targets if not soft else jnp.argmax(targets, -1)
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(
    aux["entropy"], -jnp.sum(probs * jnp.log(probs), -1), rtol=1e-10
  )
  for i in range(N):
    others = np.delete(np.asarray(logits[i]), int(labels[i]))
    np.testing.assert_allclose(
      aux["margin"][i], logits[i, labels[i]] - others.max(), rtol=1e-12
    )
  np.testing.assert_array_equal(
    aux["correct"], jnp.argmax(logits, -1) == labels
  )
  np.testing.assert_allclose(
    aux["loss"], kkt.cross_entropy(logits, targets), rtol=1e-12
  )


@pytest.mark.parametrize("method", kkt.METHODS)
def test_beta_stationarity_scales_the_term_and_its_gradients(x64, method):
  # The stationarity term enters the total with its weight: its value and
  # its x- and lambda-gradients scale with beta, the primal part does not
  # (a weight applied to a stop_gradient'ed copy changes neither).
  apply_fn, params, x, targets, lambdas = make_problem("mlp")

  def grads(beta, beta_primal):
    def total(x, lambdas):
      return kkt.deepkkt_loss(
        apply_fn,
        params,
        x,
        targets,
        lambdas,
        beta_stationarity=beta,
        beta_primal=beta_primal,
        method=method,
        gated=False,
      )[0]

    return jax.value_and_grad(total, argnums=(0, 1))(x, lambdas)

  (v1, (gx1, gl1)) = grads(1.0, 0.0)
  (v3, (gx3, gl3)) = grads(3.0, 0.0)
  (v0, (gx0, gl0)) = grads(0.0, 1.0)
  (vb, (gxb, glb)) = grads(0.5, 1.0)
  np.testing.assert_allclose(v3, 3 * v1, rtol=1e-12)
  np.testing.assert_allclose(gx3, 3 * gx1, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(gl3, 3 * gl1, rtol=1e-10, atol=1e-14)
  assert np.abs(gx1).max() > 1e-6 and np.abs(gl1).max() > 1e-6
  # beta 0 leaves only the primal term: no lambda gradient at all.
  np.testing.assert_allclose(gl0, 0.0, atol=1e-14)
  np.testing.assert_allclose(vb, v0 + 0.5 * v1, rtol=1e-12)
  np.testing.assert_allclose(gxb, gx0 + 0.5 * gx1, rtol=1e-9, atol=1e-14)
  np.testing.assert_allclose(glb, 0.5 * gl1, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradients_with_respect_to_the_betas(x64, chunk_size):
  # The fast method takes the weights as inputs of its custom VJP: their
  # gradients are the two terms, as reverse-over-reverse finds.
  apply_fn, params, x, targets, lambdas = make_problem("conv")

  def total(betas, method):
    return kkt.deepkkt_loss(
      apply_fn,
      params,
      x,
      targets,
      lambdas,
      beta_stationarity=betas[0],
      beta_primal=betas[1],
      gated=False,
      method=method,
      chunk_size=chunk_size,
    )

  betas = jnp.array([0.7, 1.3])
  for method in kkt.METHODS:
    grad, aux = jax.jit(jax.grad(total, has_aux=True), static_argnums=1)(
      betas, method
    )
    np.testing.assert_allclose(
      grad, [aux["stationarity"], aux["primal"]], rtol=1e-12
    )


def test_active_mask_equals_dropping_candidates(x64):
  # The mask is applied outside the stationarity term, identically for both
  # methods (which are compared with a mask above): test the default.
  method = "fast"
  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  active = jnp.array([True, False, True, True, False, True, True])
  keep = np.flatnonzero(active)

  def loss(x, lambdas, active=None):
    return kkt.deepkkt_loss(
      apply_fn, params, x, targets, lambdas, active=active, method=method
    )

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (total, aux), (gx, gl) = grad_fn(x, lambdas, active)
  sub_targets = targets[keep]
  (sub_total, sub_aux), (sub_gx, sub_gl) = jax.jit(
    jax.value_and_grad(
      lambda x, lam: kkt.deepkkt_loss(
        apply_fn, params, x, sub_targets, lam, method=method
      ),
      argnums=(0, 1),
      has_aux=True,
    )
  )(x[keep], lambdas[keep])
  np.testing.assert_allclose(total, sub_total, rtol=1e-12)
  assert int(aux["num_active"]) == 5 == int(sub_aux["num_active"])
  np.testing.assert_allclose(gx[keep], sub_gx, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(gl[keep], sub_gl, rtol=1e-10, atol=1e-14)
  inactive = np.flatnonzero(~active)
  assert float(jnp.max(jnp.abs(gx[inactive]))) == 0.0
  assert float(jnp.max(jnp.abs(gl[inactive]))) == 0.0


# ----------------------------------------------------------------------------
# jit: one trace for repeated calls with the same shapes.


@pytest.mark.parametrize("method", kkt.METHODS)
def test_jit_no_recompilation(x64, method):
  _, params, x, targets, lambdas = make_problem("mlp")
  traces = []

  def counting_apply(p, x):
    traces.append(None)
    return mlp_apply(p, x)

  @jax.jit
  def step(x, lambdas):
    grad_fn = jax.value_and_grad(kkt.deepkkt_loss, argnums=(2, 4), has_aux=True)
    return grad_fn(counting_apply, params, x, targets, lambdas, method=method)

  jax.block_until_ready(step(x, lambdas))
  traced = len(traces)
  assert traced > 0
  for i in range(3):
    out = step(x + i, lambdas * (i + 1))
  jax.block_until_ready(out)
  assert len(traces) == traced
  (_, aux), _ = out
  assert aux["entropy"].shape == (N,)


# ----------------------------------------------------------------------------
# The factory.


def test_make_deepkkt_loss_equals_deepkkt_loss_jitted_and_differentiated(x64):
  apply_fn, params, x, targets, lambdas = make_problem("conv", soft=True)
  active = jnp.arange(N) % 3 != 1
  config = dict(
    beta_stationarity=0.5,
    beta_primal=0.7,
    gated=False,
    distance="l1_mean",
    chunk_size=3,
  )
  loss = kkt.make_deepkkt_loss(apply_fn, **config)

  def reference(params, x, targets, lambdas, active=None):
    return kkt.deepkkt_loss(
      apply_fn, params, x, targets, lambdas, active=active, **config
    )

  argnums = (0, 1, 2, 3)
  for act in (None, active):
    expected = reference(params, x, targets, lambdas, act)
    assert_trees_close(loss(params, x, targets, lambdas, act), expected)
    # No static arguments: every argument of loss is an array (or None).
    jitted = jax.jit(loss)(params, x, targets, lambdas, act)
    assert_trees_close(jitted, expected)
    grads = jax.jit(jax.grad(loss, argnums, has_aux=True))(
      params, x, targets, lambdas, act
    )
    expected_grads = jax.grad(reference, argnums, has_aux=True)(
      params, x, targets, lambdas, act
    )
    assert_trees_close(grads, expected_grads, rtol=1e-9)
  with pytest.raises(ValueError, match="distance must be one of"):
    kkt.make_deepkkt_loss(apply_fn, distance="l3")
  with pytest.raises(ValueError, match="method must be one of"):
    kkt.make_deepkkt_loss(apply_fn, method="fwd")
  with pytest.raises(ValueError, match="chunk_size"):
    kkt.make_deepkkt_loss(apply_fn, chunk_size=0)


# ----------------------------------------------------------------------------
# Errors.


def test_shape_errors(x64):
  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  with pytest.raises(ValueError, match="targets has 6 rows"):
    kkt.stationarity_loss(apply_fn, params, x, targets[:6], lambdas)
  with pytest.raises(ValueError, match="lambdas must have shape"):
    kkt.deepkkt_loss(apply_fn, params, x, targets, lambdas[:5])
  with pytest.raises(ValueError, match="lambdas must have shape"):
    kkt.weighted_loss_grad(apply_fn, params, x, targets, lambdas[:, None])
  with pytest.raises(ValueError, match="active must be bool"):
    kkt.deepkkt_loss(apply_fn, params, x, targets, lambdas, active=lambdas)
  with pytest.raises(ValueError, match="int labels"):
    kkt.per_sample_grads(apply_fn, params, x, targets[:, None, None])
  with pytest.raises(ValueError, match="must be integer labels"):
    kkt.per_sample_grads(apply_fn, params, x, lambdas)
  soft4 = jnp.full((N, 4), 0.25)
  with pytest.raises(ValueError, match="soft targets have 4 classes"):
    kkt.stationarity_loss(apply_fn, params, x, soft4, lambdas)
  with pytest.raises(ValueError, match="distance must be one of"):
    kkt.stationarity_loss(apply_fn, params, x, targets, lambdas, distance="l3")
  with pytest.raises(ValueError, match="method must be one of"):
    kkt.deepkkt_loss(apply_fn, params, x, targets, lambdas, method="fwd")
  with pytest.raises(ValueError, match="chunk_size"):
    kkt.weighted_loss_grad(apply_fn, params, x, targets, lambdas, chunk_size=0)
  with pytest.raises(ValueError, match="direction must be"):
    kkt.per_sample_grad_dots(apply_fn, params, x, targets, {"w": 1.0})


def test_apply_fn_output_errors_at_trace_time(x64):
  _, params, x, targets, lambdas = make_problem("mlp")
  flat = lambda p, x: mlp_apply(p, x)[:, 0]
  extra = lambda p, x: mlp_apply(p, x)[..., None]
  tupled = lambda p, x: (mlp_apply(p, x), None)
  for bad in (flat, extra):
    with pytest.raises(ValueError, match=r"logits of shape \[N, C\]"):
      kkt.stationarity_loss(bad, params, x, targets, lambdas)
    with pytest.raises(ValueError, match=r"logits of shape \[N, C\]"):
      jax.jit(
        lambda x, bad=bad: kkt.deepkkt_loss(bad, params, x, targets, lambdas)
      )(x)
  with pytest.raises(ValueError, match="one logits array"):
    kkt.weighted_loss_grad(tupled, params, x, targets, lambdas)
  with pytest.raises(ValueError, match=r"logits of shape \[N, C\]"):
    kkt.primal_loss(jnp.zeros((N,)), targets)


def test_value_errors_for_concrete_targets_only(x64):
  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  out_of_range = targets.at[2].set(C)
  with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
    kkt.deepkkt_loss(apply_fn, params, x, out_of_range, lambdas)
  with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
    kkt.primal_loss(apply_fn(params, x), targets.at[0].set(-1))
  bad_soft = jnp.full((N, C), 0.3)
  with pytest.raises(ValueError, match="summing to 1"):
    kkt.stationarity_loss(apply_fn, params, x, bad_soft, lambdas)
  negative = jnp.tile(jnp.array([[1.5, -0.5, 0.0]]), (N, 1))
  with pytest.raises(ValueError, match="non-negative"):
    kkt.weighted_loss_grad(apply_fn, params, x, negative, lambdas)
  # Under jit the values are unknown: no check, no error, a finite result.
  loss = jax.jit(
    lambda t: kkt.stationarity_loss(apply_fn, params, x, t, lambdas)
  )(bad_soft)
  assert np.isfinite(float(loss))


def test_non_finite_values_propagate_as_documented(x64):
  # The DeepKKT functions run inside jit and grad: they check no values
  # for finiteness (`checks` module docstring) and, like any JAX function,
  # return NaN; `checks.check_finite` is the check for direct callers.
  apply_fn, params, x, targets, lambdas = make_problem("mlp")
  nan_x = x.at[0, 0].set(jnp.nan)
  nan_lambdas = lambdas.at[1].set(jnp.nan)
  loss, _ = kkt.deepkkt_loss(apply_fn, params, nan_x, targets, lambdas)
  assert np.isnan(float(loss))
  assert np.isnan(
    float(kkt.stationarity_loss(apply_fn, params, x, targets, nan_lambdas))
  )
  with pytest.raises(ValueError, match="lambdas contains NaN"):
    checks.check_finite("lambdas", nan_lambdas)
  checks.check_finite("lambdas", lambdas)


# ----------------------------------------------------------------------------
# Docstring examples.


@pytest.mark.parametrize("module", [kkt, checks], ids=lambda m: m.__name__)
def test_doctests(module):
  result = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  )
  assert result.attempted > 0
  assert result.failed == 0
