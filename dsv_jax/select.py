"""Selection: fit lambda >= 0 over a whole training set, then rank.

METHOD.md section 4 ("Selection"): with the training images fixed, fit
multipliers ``lambda >= 0`` so that the frozen weights satisfy stationarity,
``theta* ~= -G lambda`` with ``G`` the P x N matrix of per-sample gradients
``g_i = grad_theta L_i``, and rank the samples per class.

The fit is matrix-free. ``G`` is never formed: every solver iteration takes
one weighted backward pass (``G @ lambda``, the product of
`kkt.weighted_loss_grad`) and one forward-mode pass (``G^T @ u``, that of
`kkt.per_sample_grad_dots`), both streamed over the data in chunks by a
host-side loop over jitted per-chunk functions (on XLA:CPU a convolution
inside ``lax.scan`` runs 7-15x slower, see benchmarks/README.md) and sharded
``P("data")`` over a device mesh with the parameters replicated; the
``G @ lambda`` sum over chunks is accumulated as a replicated pytree.
Memory is O(P + chunk activations) for any N. Both products go through the
logits with ``softmax - onehot`` formed without cancellation (see
`_make_operator`): confident samples have ``1 - p_y`` far below float32's
resolution of 1.

Solver: FISTA (accelerated projected gradient) with backtracking on the
step size and gradient-based adaptive restart. ``G`` is linear, so ``G y``
at the extrapolated point is ``(1 + b) G x_k - b G x_{k-1}`` from cached
products and costs no pass. ``l1_mean`` is non-smooth; its gradient comes
from a Huber smoothing of width ``l1_smoothing * mean|theta*|`` (the
reported distance is always the exact one). ``cosine`` is scale-invariant.

What makes a support vector (METHOD.md section 3): the representation
``theta* = -G lambda`` is not unique (a weight-decay-trained net is
represented exactly by a uniform lambda), so a fit alone does not single
out support vectors. We add a complementary-slackness term: among the
representations, prefer those with the largest total contribution
``sum_i lambda_i ||p_i - y_i||`` (``p_i`` the softmax output, ``y_i`` the
one-hot target). For a linear (or positively homogeneous) two-class model
``<theta*, -g_i> = ||p_i - y_i|| * margin_i`` up to a constant, so
``||theta*||^2 = sum_i lambda_i ||p_i - y_i|| margin_i
>= min_margin * sum_i lambda_i ||p_i - y_i||``, with equality exactly when
lambda lives on the minimum-margin samples: maximising the contribution
among exact representations selects the support vectors (complementary
slackness without knowing the margin's scale). The objective is

  F(lambda) = D(theta*, -G lambda) / D(theta*, 0)
              - slackness * sum_i lambda_i ||p_i - y_i|| / W_ref,

``W_ref = ||theta*||^2 * sum_i ||p_i - y_i|| / sum_i <theta*, -g_i>`` (sums
over the samples that may carry lambda, see below; the contribution of an
exact representation at their average margin), so
``slackness`` is dimensionless and roughly the relative residual traded
for contribution. With ``slackness > 0`` only samples with
``<theta*, -g_i> > 0`` may carry lambda (for a linear model: the correctly
classified ones): this keeps F bounded below (see `fit_lambdas`). Samples
are ranked by their contribution ``lambda_i ||p_i - y_i||``.
benchmarks/svm_sanity.py measures this choice against the alternatives on
linearly separable data with hard-margin SVM support vectors as ground
truth (see benchmarks/README.md).

Weights followed by a normalisation layer (e.g. the ConvNet's conv kernels
under instance norm) are scale-invariant: every per-sample gradient is
orthogonal to them, so no lambda represents them and the residual is at
least their share of ``||theta*||``. Fit such models with those weights
closed over in ``apply_fn`` (see `dsv_jax.kkt`), or use models without them.
"""

import math
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsv_jax import kkt, parallel
from dsv_jax.types import ApplyFn, Params, PyTree

DISTANCES = kkt.DISTANCES
INITS = ("uniform", "zero")
SCORES = ("contribution", "lambda")

# Backtracking multiplies the Lipschitz estimate by this on a failed step.
_BACKTRACK = 2.0
# ... and by this at the start of every iteration.
_SHRINK = 0.95
# ||p_i - y_i|| below this counts as zero (the sample's gradient is zero).
_MIN_WEIGHT = 1e-30


class SolverState(NamedTuple):
  """FISTA state; a pytree that checkpoints as-is (resume is exact).

  Attributes:
    step: iterations done (int32 scalar).
    contributions: current iterate ``mu_k = lambda_k * ||p - y||`` (the
      solver's variable, see `fit_lambdas`), ``float32[N]``.
    contributions_prev: previous iterate ``mu_{k-1}``.
    g: ``G @ lambda_k``, a pytree like params.
    g_prev: ``G @ lambda_{k-1}``.
    momentum: FISTA's ``t_k`` (1 after a restart).
    lipschitz: current step-size estimate L (step 1/L).
    objective: ``F(x_k)``.
    max_step: the largest ``||mu_{j+1} - mu_j||`` so far (the stopping
      rule's scale).
  """

  step: jax.Array
  contributions: jax.Array
  contributions_prev: jax.Array
  g: PyTree
  g_prev: PyTree
  momentum: jax.Array
  lipschitz: jax.Array
  objective: jax.Array
  max_step: jax.Array


class FitInfo(NamedTuple):
  """Diagnostics of `fit_lambdas`.

  Attributes:
    residual: ``||theta* + G lambda|| / ||theta*||`` at the returned lambda.
    distance: the exact stationarity distance ``D(theta*, -G lambda)``.
    objective: the solver's objective F (see the module docstring).
    iterations: total solver iterations (including resumed ones).
    time_s: wall time of this call (compilation included).
    converged: the stopping rule fired before ``max_iters``.
    excluded: samples kept at lambda = 0 because they push away from
      theta* (``<theta*, -g_i> <= 0``; only with ``slackness > 0``).
    contribution: ``sum_i lambda_i ||p_i - y_i||``.
    weights: ``||p_i - y_i||`` per sample, ``float32[N]``.
    state: the final `SolverState` (for checkpoints and resuming).
    history: one metrics dict per iteration of this call.
  """

  residual: float
  distance: float
  objective: float
  iterations: int
  time_s: float
  converged: bool
  excluded: int
  contribution: float
  weights: np.ndarray
  state: SolverState
  history: list[dict[str, float]]


# ----------------------------------------------------------------------------
# Matrix-free products with G, streamed over chunks and sharded over a mesh.


class _Operator(NamedTuple):
  """Chunked products with G over fixed data (host loop, jitted chunks)."""

  matvec: Callable[[np.ndarray], Params]  # lambda [N] -> G lambda
  rmatvec: Callable[[Params], np.ndarray]  # u -> G^T u [N]
  weights: Callable[[], np.ndarray]  # ||p_i - y_i|| [N]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _make_operator(
  apply_fn: ApplyFn,
  params: Params,
  x: np.ndarray,
  targets: np.ndarray,
  *,
  chunk_size: int,
  mesh: Mesh,
) -> _Operator:
  n = x.shape[0]
  shards = parallel.num_shards(mesh)
  chunk = _round_up(min(chunk_size, n), shards)
  rep = parallel.replicated_sharding(mesh)
  batch = parallel.batch_sharding(mesh)

  def chunk_data(start):
    # The last chunk is padded by repeating its last row (the model never
    # sees an arbitrary input); padded rows get lambda 0 and are dropped.
    stop = min(start + chunk, n)
    xc, tc = x[start:stop], targets[start:stop]
    pad = chunk - (stop - start)
    if pad:
      xc = np.concatenate([xc, np.repeat(xc[-1:], pad, 0)])
      tc = np.concatenate([tc, np.repeat(tc[-1:], pad, 0)])
    return parallel.shard_batch((xc, tc), mesh), stop - start

  # G lambda = J^T [lambda_i r_i] (one backward pass of the logits) and
  # G^T u = [<r_i, J_i u>] (one jvp), with r_i = softmax(z_i) - y_i, the
  # gradient of the cross-entropy at the logits. Equal to
  # kkt.weighted_loss_grad / kkt.per_sample_grad_dots, but r_i is formed
  # without cancellation: the cross-entropy VJP computes
  # lambda_i p_iy - lambda_i, which loses everything once p_iy rounds to 1
  # in float32, exactly for the confident samples whose lambda is huge.
  @jax.jit
  def add_grad(acc, p, xc, tc, lc):
    logits, vjp = jax.vjp(lambda q: apply_fn(q, xc), p)
    r = jax.lax.stop_gradient(_prob_residual(logits, tc))
    (g,) = vjp(lc[:, None] * r)
    return jax.tree.map(jnp.add, acc, g)

  @partial(jax.jit, out_shardings=batch)
  def dots(p, xc, tc, u):
    logits, tangent = jax.jvp(lambda q: apply_fn(q, xc), (p,), (u,))
    return jnp.sum(_prob_residual(logits, tc) * tangent, -1)

  @partial(jax.jit, out_shardings=batch)
  def residual_norms(p, xc, tc):
    r = _prob_residual(apply_fn(p, xc), tc)
    return jnp.sqrt(jnp.sum(r * r, -1))

  params = jax.device_put(params, rep)
  starts = range(0, n, chunk)

  def matvec(lambdas):
    acc = jax.device_put(jax.tree.map(jnp.zeros_like, params), rep)
    for start in starts:
      (xc, tc), m = chunk_data(start)
      lc = np.zeros(chunk, np.float32)
      lc[:m] = lambdas[start : start + m]
      acc = add_grad(acc, params, xc, tc, jax.device_put(lc, batch))
      # Without this, asynchronous dispatch lets the host loop run ahead
      # and copy every chunk to the device before the first is consumed:
      # one more copy of the whole data set at peak (measured +170 MiB at
      # N = 60k on Fashion-MNIST).
      jax.block_until_ready(acc)
    return acc

  def rmatvec(u):
    u = jax.device_put(u, rep)
    out = []
    for start in starts:
      (xc, tc), m = chunk_data(start)
      out.append(np.asarray(dots(params, xc, tc, u))[:m])
    return np.concatenate(out)

  def weights():
    out = []
    for start in starts:
      (xc, tc), m = chunk_data(start)
      out.append(np.asarray(residual_norms(params, xc, tc))[:m])
    return np.concatenate(out)

  return _Operator(matvec, rmatvec, weights)


# ----------------------------------------------------------------------------
# The objective on P-sized pytrees (jitted once per fit).


def _huber_l1_mean(params: Params, g: Params, width: float) -> jax.Array:
  """Huber-smoothed ``l1_mean``: quadratic within ``width`` of 0."""

  def leaf(p, q):
    r = jnp.abs(p + q)
    return jnp.sum(jnp.where(r < width, 0.5 * r * r / width, r - 0.5 * width))

  total = sum(jax.tree.leaves(jax.tree.map(leaf, params, g)))
  return total / kkt._num_scalars(params)


def _smooth_distance(distance: str, width: float) -> Callable:
  if distance == "l1_mean":
    return lambda p, g: _huber_l1_mean(p, g, width)
  return kkt._DISTANCE_FNS[distance]


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jax.tree.leaves(jax.tree.map(jnp.vdot, a, b)))


def _sq_norm(tree: PyTree) -> jax.Array:
  return sum(jnp.vdot(a, a) for a in jax.tree.leaves(tree))


def _prob_residual(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``softmax(z_i) - y_i``, the cross-entropy's gradient at the logits.

  For int labels the target entry is minus the sum of the other
  probabilities: exact even where ``p_iy`` rounds to 1.
  """
  p = jax.nn.softmax(logits)
  if targets.ndim == 2:
    return p - targets
  is_target = jax.nn.one_hot(targets, logits.shape[-1], dtype=bool)
  others = jnp.where(is_target, 0.0, p)
  return jnp.where(is_target, -jnp.sum(others, -1, keepdims=True), others)


# ----------------------------------------------------------------------------
# Validation.


def _check_finite(name: str, tree: PyTree) -> None:
  for leaf in jax.tree.leaves(tree):
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise ValueError(f"{name} contains NaN or inf values.")


def _check_args(
  distance, init, slackness, max_iters, tol, chunk_size, l1_smoothing
):
  kkt._check_choice("distance", distance, DISTANCES)
  kkt._check_choice("init", init, INITS)
  if slackness < 0:
    raise ValueError(f"slackness must be >= 0, got {slackness}.")
  if distance == "cosine" and slackness > 0:
    raise ValueError(
      "distance='cosine' is invariant to the scale of lambda, so the "
      "contribution term (slackness > 0) is unbounded; use slackness=0 or "
      "another distance."
    )
  if distance == "cosine" and init == "zero":
    raise ValueError(
      "distance='cosine' is undefined at lambda = 0; use init='uniform'."
    )
  if max_iters < 0:
    raise ValueError(f"max_iters must be >= 0, got {max_iters}.")
  if tol < 0:
    raise ValueError(f"tol must be >= 0, got {tol}.")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if l1_smoothing <= 0:
    raise ValueError(f"l1_smoothing must be > 0, got {l1_smoothing}.")


# ----------------------------------------------------------------------------
# The solver.


def fit_lambdas(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  *,
  distance: str = "l1_mean",
  slackness: float = 0.0,
  init: str = "uniform",
  max_iters: int = 200,
  tol: float = 1e-4,
  chunk_size: int = 1024,
  l1_smoothing: float = 0.05,
  mesh: Mesh | None = None,
  state: SolverState | None = None,
  callback: Callable[[SolverState, dict[str, float]], None] | None = None,
) -> tuple[np.ndarray, FitInfo]:
  """Fits ``lambda >= 0`` with ``theta* ~= -sum_i lambda_i grad L_i``.

  Minimises ``F(lambda) = D(theta*, -G lambda) / D(theta*, 0) - slackness *
  sum_i lambda_i ||p_i - y_i|| / W_ref`` over ``lambda >= 0`` (see the
  module docstring) by FISTA with backtracking and adaptive restart, never
  forming G. The variables are the contributions ``mu_i = lambda_i
  ||p_i - y_i||`` (a diagonal preconditioning). Stops when a step is below
  ``tol`` times the largest step so far (or, with ``slackness == 0``, when
  the relative residual is below ``tol``), or after ``max_iters``
  iterations in total.

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``, evaluation mode.
    params: the trained parameter pytree theta*.
    x: ``[N, ...]`` training samples (host memory; streamed in chunks).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    distance: stationarity distance, one of ``DISTANCES``.
    slackness: weight of the complementary-slackness (contribution) term;
      0 for the plain stationarity fit.
    init: ``"uniform"`` (the best constant lambda under squared L2) or
      ``"zero"``.
    max_iters: iteration budget, counting resumed iterations.
    tol: stopping tolerance: on the step ``||mu_{k+1} - mu_k||`` relative to
      the largest step so far (``mu`` the contributions), and with
      ``slackness == 0`` also on the relative residual.
    chunk_size: samples per pass (rounded up to a multiple of the mesh).
    l1_smoothing: Huber width of ``l1_mean``'s gradient, relative to
      ``mean|theta*|``.
    mesh: a ``data`` mesh (`parallel.make_mesh`); all devices if None.
    state: a `SolverState` to resume from (e.g. a restored checkpoint).
    callback: called after every iteration with the state and its metrics.

  Returns:
    ``(lambdas float32[N] >= 0, FitInfo)``.

  Raises:
    ValueError: bad arguments, NaN/inf in x or params, targets out of
      range, a resume state of another problem size, or (with slackness)
      no sample with ``<theta*, -g_i> > 0``.
  """
  t_start = time.perf_counter()
  x = np.asarray(x, np.float32)
  targets = np.asarray(targets)
  _check_args(
    distance, init, slackness, max_iters, tol, chunk_size, l1_smoothing
  )
  n = x.shape[0] if x.ndim else 0
  if n == 0:
    raise ValueError("x holds no samples.")
  kkt._validate(apply_fn, params, jnp.asarray(x[:1]), jnp.asarray(targets[:1]))
  kkt._check_targets_shape(jnp.asarray(targets), n)
  num_classes = jax.eval_shape(apply_fn, params, x[:1]).shape[-1]
  kkt._check_target_values(jnp.asarray(targets), num_classes)
  _check_finite("x", x)
  _check_finite("params", params)
  if targets.ndim == 2:
    targets = targets.astype(np.float32)
  mesh = parallel.make_mesh() if mesh is None else mesh
  op = _make_operator(
    apply_fn, params, x, targets, chunk_size=chunk_size, mesh=mesh
  )
  params = jax.device_put(params, parallel.replicated_sharding(mesh))

  weights = op.weights()
  # The solver works on the contributions mu_i = lambda_i ||p_i - y_i||:
  # g_i = J_i^T (p_i - y_i) scales with ||p_i - y_i||, which spans dozens
  # of orders of magnitude between boundary and confident samples, so in
  # lambda the problem is hopelessly ill-conditioned (and float32 steps
  # stall); in mu the columns of G diag(1/w) have comparable norms, and the
  # contribution term is linear with equal weights. Samples whose
  # ||p_i - y_i|| underflows have a zero gradient and keep mu_i = 0.
  inv_w = 1 / np.maximum(weights, _MIN_WEIGHT)
  inv_w = np.where(weights > _MIN_WEIGHT, inv_w, 0).astype(np.float32)

  def matvec(mu):
    return op.matvec((mu * inv_w).astype(np.float32))

  def rmatvec(u):
    return op.rmatvec(u) * inv_w

  zeros = jax.tree.map(jnp.zeros_like, params)
  d_exact = kkt._DISTANCE_FNS[distance]
  theta_sq = float(_sq_norm(params))
  if theta_sq == 0:
    raise ValueError("params are all zero: nothing to represent.")
  mean_abs = float(
    sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
    / kkt._num_scalars(params)
  )
  d_smooth = _smooth_distance(distance, l1_smoothing * mean_abs)
  d0 = float(d_smooth(params, zeros))
  excluded = 0
  if slackness > 0:
    # Support is restricted to samples that push towards theta*,
    # <theta*, -g_i> > 0 (for a linear model: the correctly classified
    # ones). Then every lambda >= 0 has <theta*, -G lambda> > 0, so
    # G lambda = 0 forces lambda = 0 and the contribution term is bounded;
    # with pushing-away samples (misclassified ones of a deep net) some
    # non-zero lambda >= 0 can have G lambda = 0 and F is unbounded below.
    push = -op.rmatvec(params)
    supporting = push > 0
    if not supporting.any():
      raise ValueError(
        "no sample has <theta*, -grad L_i> > 0: theta* is not in the cone of "
        "the negative per-sample gradients, so the contribution term is "
        "ill-defined; use slackness=0."
      )
    excluded = int(np.count_nonzero(inv_w[~supporting]))
    inv_w = np.where(supporting, inv_w, 0).astype(np.float32)
    w_ref = theta_sq * float(weights[supporting].sum())
    w_ref /= float(push[supporting].sum())
    lin = np.where(inv_w > 0, slackness / w_ref, 0).astype(np.float32)
  else:
    lin = np.zeros(n, np.float32)

  @jax.jit
  def value_and_dual(g):
    # F's distance part at G lambda = g, and u = dF/dg for G^T u.
    val, u = jax.value_and_grad(d_smooth, argnums=1)(params, g)
    return val / d0, jax.tree.map(lambda a: a / d0, u)

  @jax.jit
  def diagnostics(g):
    r = jax.tree.map(jnp.add, params, g)
    return jnp.sqrt(_sq_norm(r) / theta_sq), d_exact(params, g)

  @jax.jit
  def curvature(g_new, g_old, u_old):
    u_new = value_and_dual(g_new)[1]
    du = jax.tree.map(jnp.subtract, u_new, u_old)
    return _vdot(du, jax.tree.map(jnp.subtract, g_new, g_old))

  combine = jax.jit(
    lambda a, b, beta: jax.tree.map(
      lambda p, q: (1 + beta) * p - beta * q, a, b
    )
  )

  def objective(g, mu):
    return float(value_and_dual(g)[0]) - float(lin @ mu)

  if state is None:
    if init == "zero":
      mu0 = np.zeros(n, np.float32)
      g0 = zeros
    else:
      # Best constant lambda under squared L2, min_c ||theta + c G 1||^2,
      # over the samples that may carry lambda (mu = w: lambda = 1 there).
      free_w = np.where(inv_w > 0, weights, 0).astype(np.float32)
      g1 = matvec(free_w)
      c = max(-float(_vdot(params, g1)) / max(float(_sq_norm(g1)), 1e-30), 0)
      mu0 = c * free_w
      g0 = jax.tree.map(lambda a: c * a, g1)
    # Initial step size: the curvature of F's distance part along the
    # projected negative gradient (a lower bound on L; backtracking raises
    # it where needed).
    _, u0 = value_and_dual(g0)
    grad0 = rmatvec(u0) - lin
    direction = np.where((mu0 > 0) | (grad0 < 0), -grad0, 0)
    direction = direction.astype(np.float32)
    dn = float(direction @ direction)
    lip = 1.0
    if dn > 0:
      # A step scaled to move G lambda by about ||theta*||: the difference
      # of the two duals is then well above float32 round-off.
      gd = matvec(direction)
      s = math.sqrt(theta_sq / max(float(_sq_norm(gd)), 1e-30))
      _, u1 = value_and_dual(jax.tree.map(lambda a, b: a + s * b, g0, gd))
      curv = float((rmatvec(u1) - grad0 - lin) @ direction) / (s * dn)
      lip = curv if curv > 0 else 1.0
    state = SolverState(
      step=jnp.int32(0),
      contributions=jnp.asarray(mu0),
      contributions_prev=jnp.asarray(mu0),
      g=g0,
      g_prev=g0,
      momentum=jnp.float32(1.0),
      lipschitz=jnp.float32(lip),
      objective=jnp.float32(objective(g0, mu0)),
      max_step=jnp.float32(0.0),
    )
  elif state.contributions.shape != (n,):
    raise ValueError(
      f"the resume state has {state.contributions.shape[0]} samples but x "
      f"has {n}: it belongs to another problem."
    )
  else:
    # A restored state lives on one device; the products are replicated.
    rep = parallel.replicated_sharding(mesh)
    state = state._replace(
      g=jax.device_put(state.g, rep), g_prev=jax.device_put(state.g_prev, rep)
    )

  history = []
  converged = False
  step = int(state.step)
  while step < max_iters and not converged:
    t_iter = time.perf_counter()
    mu = np.asarray(state.contributions)
    mu_prev = np.asarray(state.contributions_prev)
    t = float(state.momentum)
    # Let the estimate shrink a little every iteration, so one large local
    # curvature does not slow down the rest of the run.
    lip = float(state.lipschitz) * _SHRINK
    t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
    beta = (t - 1) / t_next
    y = mu + beta * (mu - mu_prev)
    gy = combine(state.g, state.g_prev, jnp.float32(beta))
    _, u = value_and_dual(gy)
    grad = rmatvec(u) - lin
    backtracks = 0
    while True:
      mu_new = np.maximum(y - grad / lip, 0).astype(np.float32)
      g_new = matvec(mu_new)
      d = mu_new - y
      # Backtracking on the local curvature <grad F(x+) - grad F(y), x+ - y>
      # <= L ||x+ - y||^2, computed from P-sized products. The textbook test
      # on F values fails spuriously once the decrease per step is below
      # float32 round-off of F, and then drives L to infinity.
      curv = float(curvature(g_new, gy, u))
      if curv <= lip * float(d @ d) * (1 + 1e-4) or not np.any(d):
        break
      lip *= _BACKTRACK
      backtracks += 1
    f_new = objective(g_new, mu_new)
    # Gradient-based adaptive restart (O'Donoghue & Candes, 2015): drop the
    # momentum when the step points against the previous direction.
    restart = float((y - mu_new) @ (mu_new - mu)) > 0
    state = SolverState(
      step=jnp.int32(step + 1),
      contributions=jnp.asarray(mu_new),
      contributions_prev=jnp.asarray(mu),
      g=g_new,
      g_prev=state.g,
      momentum=jnp.float32(1.0 if restart else t_next),
      lipschitz=jnp.float32(lip),
      objective=jnp.float32(f_new),
      max_step=state.max_step,
    )
    step += 1
    residual, dist = map(float, diagnostics(g_new))
    # Scale-free stopping rule: this step against the largest one so far
    # (lambda's scale, and so a step's, is arbitrary: 1/(N wd) and more).
    step_norm = float(np.linalg.norm(mu_new - mu))
    max_step = max(float(state.max_step), step_norm)
    change = step_norm / max(max_step, 1e-30)
    row = {
      "step": step,
      "residual": residual,
      "distance": dist,
      "objective": f_new,
      "contribution": float(mu_new.sum()),
      "lambda_sum": float((mu_new * inv_w).sum()),
      "nonzero": int(np.count_nonzero(mu_new)),
      "change": change,
      "lipschitz": lip,
      "backtracks": backtracks,
      "restart": int(restart),
      "s_per_iter": time.perf_counter() - t_iter,
    }
    state = state._replace(max_step=jnp.float32(max_step))
    history.append(row)
    converged = change <= tol or (slackness == 0 and residual <= tol)
    if callback is not None:
      callback(state, row)

  mu = np.asarray(state.contributions, np.float32)
  lambdas = (mu * inv_w).astype(np.float32)
  residual, dist = map(float, diagnostics(state.g))
  info = FitInfo(
    residual=residual,
    distance=dist,
    objective=float(state.objective),
    iterations=int(state.step),
    time_s=time.perf_counter() - t_start,
    converged=converged,
    excluded=excluded,
    contribution=float(mu.sum()),
    weights=weights,
    state=state,
    history=history,
  )
  return lambdas, info


# ----------------------------------------------------------------------------
# Ranking and statistics.


def scores(
  lambdas: np.ndarray, weights: np.ndarray, *, score: str = "contribution"
) -> np.ndarray:
  """Per-sample ranking scores.

  Args:
    lambdas: ``float[N]`` fitted multipliers.
    weights: ``||p_i - y_i||`` per sample (`FitInfo.weights`).
    score: ``"contribution"`` (``lambda_i ||p_i - y_i||``) or ``"lambda"``.

  Returns:
    ``float32[N]``; higher ranks first.
  """
  kkt._check_choice("score", score, SCORES)
  lambdas = np.asarray(lambdas, np.float32)
  return (
    lambdas * np.asarray(weights, np.float32)
    if score == "contribution"
    else lambdas
  )


def rank_per_class(
  scores: np.ndarray, labels: np.ndarray, num_classes: int
) -> list[np.ndarray]:
  """Indices of each class's samples, highest score first (ties: index)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    out.append(idx[np.argsort(-scores[idx], kind="stable")])
  return out


def top_per_class(
  scores: np.ndarray, labels: np.ndarray, num_classes: int, k: int
) -> np.ndarray:
  """The ``k`` highest-scoring indices of every class, class by class.

  Raises:
    ValueError: ``k < 1``, a class without samples, or a class with fewer
      than ``k`` samples.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  ranking = rank_per_class(scores, labels, num_classes)
  for c, idx in enumerate(ranking):
    if len(idx) == 0:
      raise ValueError(f"class {c} has no samples: nothing to select.")
    if len(idx) < k:
      raise ValueError(
        f"class {c} has {len(idx)} samples, fewer than the {k} to select."
      )
  return np.concatenate([idx[:k] for idx in ranking])


def random_per_class(
  key: jax.Array, labels: np.ndarray, num_classes: int, k: int
) -> np.ndarray:
  """``k`` random indices of every class (the comparison set)."""
  labels = np.asarray(labels)
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < k:
      raise ValueError(
        f"class {c} has {len(idx)} samples, fewer than the {k} to draw."
      )
    perm = np.asarray(
      jax.random.permutation(jax.random.fold_in(key, c), len(idx))
    )
    out.append(idx[perm[:k]])
  return np.concatenate(out)


def precision_recall_at_k(
  scores: np.ndarray, truth: np.ndarray, k: int | None = None
) -> tuple[float, float]:
  """Precision and recall of the top-``k`` scores against a true index set.

  ``k`` defaults to the size of the true set (then precision == recall).
  """
  truth = set(np.asarray(truth).tolist())
  k = len(truth) if k is None else k
  top = set(np.argsort(-np.asarray(scores), kind="stable")[:k].tolist())
  hits = len(top & truth)
  return hits / max(k, 1), hits / max(len(truth), 1)


def per_class_sums(
  values: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray:
  """``sum_{i in class c} values_i`` for every class c."""
  return np.bincount(
    np.asarray(labels),
    weights=np.asarray(values, np.float64),
    minlength=num_classes,
  )


__all__ = [
  "DISTANCES",
  "FitInfo",
  "INITS",
  "SCORES",
  "SolverState",
  "fit_lambdas",
  "per_class_sums",
  "precision_recall_at_k",
  "random_per_class",
  "rank_per_class",
  "scores",
  "top_per_class",
]
