"""`fit_lambdas`: the lambda fit as a loop over named phases.

The phases, in order: validate the arguments and keep this process's rows
(`_local_problem`), build the operator, precondition (`_inverse_weights`),
the distances (`_distances`), the contribution reward and its cap
(`_reward`, `_constant_lambda`), the jitted objective (`_objective_fns`),
the first or resumed state (`_start_state`), FISTA iterations
(`dsv_jax.select.fista`) and the gathered result (`_fit_info`).
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsv_jax import checks, kkt, parallel
from dsv_jax.select import fista, progress
from dsv_jax.select.fista import SolverState, sq_norm, vdot
from dsv_jax.select.invariance import (
  Represented,
  Wrt,
  masker,
  resolve_wrt,
)
from dsv_jax.select.layout import gather_rows, gather_state, make_layout
from dsv_jax.select.operator import (
  Operator,
  Strategy,
  make_operator,
)
from dsv_jax.select.ranking import (
  DEFAULT_SCORE,
  SCORES,
  Score,
  scores,
  top_per_class,
)
from dsv_jax.types import ApplyFn, Params, PyTree

if TYPE_CHECKING:
  from dsv_jax.checkpoints import RunCheckpointer

Init = Literal["uniform", "zero"]
DISTANCES = kkt.DISTANCES
INITS: tuple[Init, ...] = get_args(Init)

# The validated recipe (svm_sanity; measured numbers in docs/method.md's
# choices table): squared-L2 stationarity with the complementary-slackness
# term, from the best constant lambda, ranked by contribution. The
# library's defaults ARE this recipe; the packaged configs read them here.
DEFAULT_DISTANCE: kkt.Distance = "l2_sq"
DEFAULT_SLACKNESS = 0.3
DEFAULT_INIT: Init = "uniform"
DEFAULT_MAX_ITERS = 1000

# ||p_i - y_i|| below this counts as zero (the sample's gradient is zero).
_MIN_WEIGHT = 1e-30


class FitInfo(NamedTuple):
  """Diagnostics of `fit_lambdas`.

  Attributes:
    residual: ``||theta* + G lambda|| / ||theta*||`` at the returned lambda,
      over the represented parameters (see ``represented``).
    residual_all: the same over all of theta* (excluded leaves included).
    distance: the exact stationarity distance ``D(theta*, -G lambda)``
      over the represented parameters.
    objective: the solver's objective F (see `dsv_jax.select`).
    iterations: total solver iterations (including resumed ones).
    time_s: wall time of this call (compilation included).
    converged: the stopping rule fired before ``max_iters`` (in this call,
      or in the fit whose converged state it resumed).
    capped: samples that push away from theta* (``<theta*, -g_i> <= 0``;
      only with ``slackness > 0``): no contribution reward, and lambda at
      most the best constant lambda (a soft margin).
    contribution: ``sum_i lambda_i ||p_i - y_i||``.
    weights: ``||p_i - y_i||`` per sample, ``float32[N]``.
    scores: the ranking score of every sample, the contribution
      ``lambda_i ||p_i - y_i||`` (`scores`), ``float32[N]``; 0 for the
      samples that are not `rankable`.
    rankable: ``bool[N]``, the samples that may be ranked as support
      vectors: classified as their target (primal feasibility), with a
      non-zero gradient, and rewarded by the contribution term
      (``<theta*, -g_i> > 0``; for a linear model the same as correctly
      classified). A misclassified sample may still carry lambda (up to
      the cap when it pushes away from theta*) -- it is part of the
      representation, as a soft-margin SVM's margin violators are -- but it
      is not a DSV.
    represented: the `Represented` parameters the fit ran on.
    state: the final `SolverState` (for checkpoints and resuming).
    history: one metrics dict per iteration of this call.
  """

  residual: float
  residual_all: float
  distance: float
  objective: float
  iterations: int
  time_s: float
  converged: bool
  capped: int
  contribution: float
  weights: np.ndarray
  scores: np.ndarray
  rankable: np.ndarray
  represented: Represented
  state: SolverState
  history: list[dict[str, float]]


# ----------------------------------------------------------------------------
# Matrix-free products with G, streamed over chunks and sharded over a mesh.


def _check_args(
  distance, init, slackness, max_iters, tol, chunk_size, l1_smoothing
):
  checks.check_choice("distance", distance, DISTANCES)
  checks.check_choice("init", init, INITS)
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


def _local_problem(
  apply_fn, params, x, targets, wrt, num_samples, chunk_size, mesh
):
  """``(x, targets)`` of this process's rows (validated), N, their
  `Layout` and the `Represented` parameters (see `fit_lambdas`)."""
  x = checks.host_float32_images(x)
  targets = np.asarray(targets)
  given = num_samples is not None
  n = num_samples if given else (x.shape[0] if x.ndim else 0)
  if n < 1 or not len(x):
    raise ValueError("x holds no samples.")
  layout = make_layout(n, chunk_size, mesh, jax.process_index())
  if given and len(x) != len(layout.rows):
    raise ValueError(
      f"x holds {len(x)} samples, but this process has {len(layout.rows)} "
      f"rows of num_samples = {n} (select.process_rows)."
    )
  checks.check_kkt_inputs(
    apply_fn, params, jnp.asarray(x[:1]), jnp.asarray(targets[:1])
  )
  checks.check_targets_shape(jnp.asarray(targets), len(x))
  num_classes = jax.eval_shape(apply_fn, params, x[:1]).shape[-1]
  checks.check_target_values(jnp.asarray(targets), num_classes)
  checks.check_finite("x", x)
  checks.check_finite("params", params)
  if targets.ndim == 2:
    targets = targets.astype(np.float32)
  several = jax.process_count() > 1
  if given and several and isinstance(wrt, str) and wrt == "auto":
    raise ValueError(
      "wrt='auto' probes the whole set, but each process holds its own rows "
      "(num_samples): pass the mask of select.represented_leaves."
    )
  represented = resolve_wrt(wrt, apply_fn, params, x, targets)
  if several and not given:
    x, targets = x[layout.rows], targets[layout.rows]
  return x, targets, n, layout, represented


def _inverse_weights(weights: np.ndarray) -> np.ndarray:
  """``1 / ||p_i - y_i||``, 0 where it underflows (zero gradient).

  The solver works on the contributions mu_i = lambda_i ||p_i - y_i||:
  g_i = J_i^T (p_i - y_i) scales with ||p_i - y_i||, which spans dozens
  of orders of magnitude between boundary and confident samples, so in
  lambda the problem is hopelessly ill-conditioned (and float32 steps
  stall); in mu the columns of G diag(1/w) have comparable norms, and the
  contribution term is linear with equal weights. Samples whose
  ||p_i - y_i|| underflows have a zero gradient and keep mu_i = 0.
  """
  inv_w = 1 / np.maximum(weights, _MIN_WEIGHT)
  return np.where(weights > _MIN_WEIGHT, inv_w, 0).astype(np.float32)


def _distances(distance, params, num_represented, l1_smoothing):
  """``(exact D, smoothed D for the gradient)`` over the represented
  parameters (``params`` with the excluded leaves zero)."""
  # l1_mean is a mean over the represented scalars only.
  l1_fix = kkt.num_scalars(params) / num_represented

  def d_exact(p, g):
    d = kkt.distance_fn(distance)(p, g)
    return d * l1_fix if distance == "l1_mean" else d

  mean_abs = float(
    sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params)) / num_represented
  )
  return d_exact, fista.smooth_distance(distance, l1_smoothing * mean_abs)


class _Reward(NamedTuple):
  supporting: np.ndarray  # bool [rows]: rewarded by the contribution term
  capped: int  # samples pushing away from theta* (over every process)
  lin: np.ndarray  # float32 [rows]: the term's weight on mu


def _reward(op, params, weights, live, slackness, theta_sq) -> _Reward:
  """The complementary-slackness term's weights (see the package doc)."""
  if slackness <= 0:
    return _Reward(live, 0, np.zeros(len(weights), np.float32))
  # The contribution reward goes only to samples that push towards
  # theta*, <theta*, -g_i> > 0 (for a linear model: the correctly
  # classified ones). Samples pushing away (misclassified ones of a deep
  # net) may still carry lambda, up to a cap (`_constant_lambda`): with an
  # unbounded lambda on them, some non-zero lambda >= 0 could have
  # G lambda = 0 and F would be unbounded below; with the cap it is
  # bounded, since <theta*, -G lambda> grows with the rewarded samples'
  # lambda.
  push = -op.rmatvec(params)
  supporting = live & (push > 0)
  num_supporting, capped, w_sum, push_sum = parallel.process_sum(
    np.count_nonzero(supporting),
    np.count_nonzero(live & ~supporting),
    weights[supporting].sum(),
    push[supporting].sum(),
  )
  if not num_supporting:
    raise ValueError(
      "no sample has <theta*, -grad L_i> > 0: theta* is not in the cone of "
      "the negative per-sample gradients, so the contribution term is "
      "ill-defined; use slackness=0."
    )
  w_ref = theta_sq * float(w_sum)
  w_ref /= float(push_sum)
  lin = np.where(supporting, slackness / w_ref, 0).astype(np.float32)
  return _Reward(supporting, int(capped), lin)


def _constant_lambda(matvec, params, restrict, weights, live):
  """``(mu, G lambda)`` of the best constant lambda, ``min_c ||theta* +
  c G 1||^2`` over every sample whose gradient is not zero: the init, and
  the cap of the samples pushing away -- a soft margin, as a soft-margin
  SVM's C. At a stationary point of the training objective it is
  1 / (N wd), exact."""
  # lambda = 1 / max_i w_i: with lambda = 1, G 1 of a very confident
  # classifier (every ||p_i - y_i|| ~ 1e-20) would underflow.
  w_live = np.where(live, weights, 0).astype(np.float64)
  (w_max,) = parallel.process_max(w_live.max())
  w_live = (w_live / max(w_max, _MIN_WEIGHT)).astype(np.float32)
  g1 = matvec(w_live)
  g1_sq = float(sq_norm(restrict(g1)))
  c = max(-float(vdot(params, g1)) / max(g1_sq, 1e-30), 0)
  return (c * w_live).astype(np.float32), jax.tree.map(lambda a: c * a, g1)


def _objective_fns(params, params_all, restrict, d_exact, d_smooth, d0):
  """The jitted P-sized pieces of F: ``(value_and_dual, curvature,
  combine, diagnostics)`` (see `fista.Problem`)."""
  theta_sq = float(sq_norm(params))
  theta_all_sq = float(sq_norm(params_all))

  # theta* is an argument of every jitted function, never a closed-over
  # constant: constants would be baked into each program (slow compiles,
  # no compile-cache hits across classifiers, and an error for arrays
  # spanning several hosts).
  @jax.jit
  def value_and_dual_at(p, g):
    # F's distance part at G lambda = g (full; restricted here), and
    # u = dF/dg for G^T u (zero on the excluded leaves).
    val, u = jax.value_and_grad(lambda gg: d_smooth(p, restrict(gg)))(g)
    return val / d0, jax.tree.map(lambda a: a / d0, u)

  @jax.jit
  def diagnostics_at(p, p_all, g):
    r = jax.tree.map(jnp.add, p, restrict(g))
    r_all = jax.tree.map(jnp.add, p_all, g)
    return (
      jnp.sqrt(sq_norm(r) / theta_sq),
      d_exact(p, restrict(g)),
      jnp.sqrt(sq_norm(r_all) / theta_all_sq),
    )

  @jax.jit
  def curvature_at(p, g_new, g_old, u_old):
    u_new = value_and_dual_at(p, g_new)[1]
    du = jax.tree.map(jnp.subtract, u_new, u_old)
    return vdot(du, jax.tree.map(jnp.subtract, g_new, g_old))

  def value_and_dual(g):
    return value_and_dual_at(params, g)

  def diagnostics(g):
    return diagnostics_at(params, params_all, g)

  def curvature(g_new, g_old, u_old):
    return curvature_at(params, g_new, g_old, u_old)

  combine = jax.jit(
    lambda a, b, beta: jax.tree.map(
      lambda p, q: (1 + beta) * p - beta * q, a, b
    )
  )
  return value_and_dual, curvature, combine, diagnostics


class _Built(NamedTuple):
  problem: fista.Problem
  weights: np.ndarray  # ||p_i - y_i|| [rows]
  rankable: np.ndarray  # bool [rows]
  capped: int
  start: tuple[np.ndarray, Params] | None  # (mu, G lambda) of the constant


def _build_problem(
  op: Operator,
  params_all: Params,
  represented: Represented,
  *,
  distance: str,
  slackness: float,
  l1_smoothing: float,
  want_constant: bool,
) -> _Built:
  """The fixed `fista.Problem` of a fit, from the operator and theta*."""
  restrict = masker(represented.mask)
  # From here on theta* is its represented part: excluded leaves are zero
  # in theta* and in every G lambda the objective sees. The solver state
  # keeps the full G lambda (for `residual_all`).
  params = restrict(params_all)
  num_represented = sum(
    leaf.size
    for leaf, f in zip(
      jax.tree.leaves(params), jax.tree.leaves(represented.mask), strict=True
    )
    if f
  )
  weights, correct = op.weights()
  inv_w = _inverse_weights(weights)

  def matvec(mu):
    return op.matvec((mu * inv_w).astype(np.float32))

  def rmatvec(u):
    return op.rmatvec(u) * inv_w

  d_exact, d_smooth = _distances(
    distance, params, num_represented, l1_smoothing
  )
  theta_sq = float(sq_norm(params))
  if theta_sq == 0:
    raise ValueError("params are all zero: nothing to represent.")
  d0 = float(d_smooth(params, jax.tree.map(jnp.zeros_like, params)))
  live = inv_w > 0
  reward = _reward(op, params, weights, live, slackness, theta_sq)
  upper = np.full(len(weights), np.inf, np.float32)
  start = None
  if want_constant or reward.capped:
    start = _constant_lambda(matvec, params, restrict, weights, live)
    if reward.capped:
      upper = np.where(reward.supporting | ~live, np.inf, start[0])
      upper = upper.astype(np.float32)
  value_and_dual, curvature, combine, diagnostics = _objective_fns(
    params, params_all, restrict, d_exact, d_smooth, d0
  )
  problem = fista.Problem(
    matvec=matvec,
    rmatvec=rmatvec,
    value_and_dual=value_and_dual,
    curvature=curvature,
    combine=combine,
    diagnostics=diagnostics,
    restrict=restrict,
    lin=reward.lin,
    upper=upper,
    inv_w=inv_w,
    theta_sq=theta_sq,
    process_sum=parallel.process_sum,
  )
  return _Built(
    problem, weights, reward.supporting & correct, reward.capped, start
  )


def _start_state(built, state, init, n, layout, mesh, zeros) -> SolverState:
  """The first state (``init``) or the resumed one, this process's rows."""
  if state is None:
    if init == "zero":
      mu0, g0 = np.zeros(len(built.weights), np.float32), zeros
    else:
      mu0, g0 = built.start
    return fista.init_state(built.problem, mu0, g0)
  if state.contributions.shape != (n,):
    raise ValueError(
      f"the resume state has {state.contributions.shape[0]} samples but x "
      f"has {n}: it belongs to another problem."
    )
  # A restored state lives on one device; the products are replicated,
  # and this process keeps its own rows.
  rep = parallel.replicated_sharding(mesh)
  return state._replace(
    contributions=jnp.asarray(np.asarray(state.contributions)[layout.rows]),
    contributions_prev=jnp.asarray(
      np.asarray(state.contributions_prev)[layout.rows]
    ),
    g=parallel.put(state.g, rep),
    g_prev=parallel.put(state.g_prev, rep),
  )


@kkt.full_precision
def fit_lambdas(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  *,
  distance: kkt.Distance = DEFAULT_DISTANCE,
  slackness: float = DEFAULT_SLACKNESS,
  init: Init = DEFAULT_INIT,
  wrt: Wrt | PyTree = "auto",
  max_iters: int = DEFAULT_MAX_ITERS,
  tol: float = 1e-4,
  chunk_size: int = 1024,
  l1_smoothing: float = 0.05,
  mesh: Mesh | None = None,
  state: SolverState | None = None,
  on_metrics: Callable[[dict[str, float]], None] | None = None,
  log_every: int = 1,
  on_state: Callable[[SolverState], None] | None = None,
  checkpointer: "RunCheckpointer | None" = None,
  ckpt_every: int = 0,
  ckpt_meta: dict[str, Any] | None = None,
  strategy: Strategy = "auto",
  num_samples: int | None = None,
  callback: Callable[[SolverState, dict[str, float]], None] | None = None,
) -> tuple[np.ndarray, FitInfo]:
  """Fits ``lambda >= 0`` with ``theta* ~= -sum_i lambda_i grad L_i``.

  Minimises the objective F of `dsv_jax.select` by FISTA with
  backtracking and adaptive restart, never forming G, over the
  contributions ``mu_i = lambda_i ||p_i - y_i||`` (a diagonal
  preconditioning); ``tol`` says when it stops. The defaults are the
  validated recipe. Rank samples by `FitInfo.scores` (the contribution),
  not by the lambdas: a confident sample's tiny gradient lets its lambda
  be huge without mattering (see benchmarks/README.md); `select_dsvs` fits
  and ranks in one call.

  Only the represented parameters take part (``wrt``, see
  `represented_leaves`): stationarity, the residual and the distance are
  measured on them; `FitInfo.residual_all` is the residual over all of
  theta*.

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``, evaluation mode.
    params: the trained parameter pytree theta*.
    x: ``[N, ...]`` floating training samples (normalised images; host
      memory, streamed in chunks).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    distance: stationarity distance, one of ``DISTANCES``.
    slackness: weight of the complementary-slackness (contribution) term;
      0 for the plain stationarity fit.
    init: ``"uniform"`` (the best constant lambda under squared L2) or
      ``"zero"``.
    wrt: the parameters to represent: ``"auto"`` (every leaf but the
      invariant ones `represented_leaves` finds), ``"all"``, or a pytree
      of bools with the structure of ``params``.
    max_iters: iteration budget, counting resumed iterations.
    tol: stopping tolerance: on the step ``||mu_{k+1} - mu_k||`` relative to
      the largest step so far (``mu`` the contributions), and with
      ``slackness == 0`` also on the relative residual.
    chunk_size: samples per pass (rounded up to a multiple of the mesh).
    l1_smoothing: Huber width of ``l1_mean``'s gradient, relative to
      ``mean|theta*|``.
    mesh: a ``data`` mesh (`parallel.make_mesh`); all devices if None.
    state: a `SolverState` to resume from (e.g. a restored checkpoint); a
      converged one (``state.converged``) is returned as it is, with no
      further iteration, whatever ``tol`` and ``max_iters`` (to go on with
      a smaller ``tol``: ``state._replace(converged=np.array(False))``).
      None: the newest step of ``checkpointer``, if any, else a new fit.
    on_metrics, log_every: ``on_metrics(row)`` gets an iteration's metrics
      (host floats and its ``"step"``) every ``log_every`` iterations and
      at ``max_iters``, as every loop of the library reports.
    on_state: gets the solver state after every iteration (this
      process's rows, see below).
    checkpointer, ckpt_every, ckpt_meta: resume from the newest step of a
      `checkpoints.RunCheckpointer`, and save the whole state to it every
      ``ckpt_every`` iterations (0: only at the end), with ``ckpt_meta``.
    strategy: how the passes over the samples run: ``"host"`` streams
      chunks from host memory (the set never resides on the device; the
      fastest on CPU), ``"device"`` keeps the set on the devices and runs
      each pass as one program (for GPU/TPU), ``"auto"`` (default) picks
      host on CPU and device elsewhere. Both give the same lambdas.
    num_samples: None: ``x`` and ``targets`` are the whole set (each
      process keeps its `process_rows` of them). Else N, and they are this
      process's rows of it, ``x[process_rows(N, ...)]``: with several
      processes, each then loads and streams only its own share (``wrt``
      must then be given as a mask: "auto" would probe each process's own
      rows).
    callback: deprecated ``callback(state, row)``; use the hooks above.

  Several processes: each keeps its own rows' per-sample vectors; the
  only traffic per iteration is the all-reduce of ``G lambda`` (P floats)
  and a few scalars (benchmarks/README.md). The ``on_state`` state holds
  this process's rows (`gather_state` makes the whole one); the returned
  lambdas, `FitInfo` vectors and state are gathered once, at the end.

  Returns:
    ``(lambdas float32[N] >= 0, FitInfo)``.

  Raises:
    ValueError: bad arguments, integer or NaN/inf x, NaN/inf params,
      targets out of range, a resume state of another problem size, or
      (with slackness) no sample with ``<theta*, -g_i> > 0``.
  """
  t_start = time.perf_counter()
  _check_args(
    distance, init, slackness, max_iters, tol, chunk_size, l1_smoothing
  )
  report = progress.reporter(
    on_metrics, log_every, on_state, callback, max_iters
  )
  mesh = parallel.make_mesh() if mesh is None else mesh
  x, targets, n, layout, represented = _local_problem(
    apply_fn, params, x, targets, wrt, num_samples, chunk_size, mesh
  )
  if state is None and checkpointer is not None:
    state = progress.restore(checkpointer, params, n, max_iters)
  save = progress.saver(
    checkpointer, ckpt_every, ckpt_meta, n=n, chunk_size=chunk_size, mesh=mesh
  )
  op = make_operator(apply_fn, params, x, targets, layout, mesh, strategy)
  params_all = parallel.put(params, parallel.replicated_sharding(mesh))
  built = _build_problem(
    op,
    params_all,
    represented,
    distance=distance,
    slackness=slackness,
    l1_smoothing=l1_smoothing,
    want_constant=state is None and init == "uniform",
  )
  zeros = jax.tree.map(jnp.zeros_like, built.problem.restrict(params_all))
  state = _start_state(built, state, init, n, layout, mesh, zeros)

  state, done, history = _iterate(
    built.problem, state, max_iters, tol, slackness, save, report
  )
  lambdas, info = _fit_info(
    built, state, done, n, chunk_size, mesh, represented, history, t_start
  )
  save(info.iterations, info.state, final=True)
  return lambdas, info


def _iterate(problem, state, max_iters, tol, slackness, save, report):
  """FISTA iterations to ``max_iters`` or convergence: ``(state, converged,
  metrics rows)``."""
  history = []
  # A state that already converged (e.g. a checkpoint of a finished fit)
  # stays converged: no iteration, the same lambdas.
  done = bool(state.converged)
  while int(state.step) < max_iters and not done:
    state, row = fista.step(problem, state)
    done = fista.converged(row, tol=tol, slackness=slackness)
    state = state._replace(converged=jnp.asarray(done))
    history.append(row)
    # Saved first: a hook that stops the fit loses no iteration.
    save(row["step"], state, final=False)
    report(state, row)
  return state, done, history


def _fit_info(
  built, state, done, n, chunk_size, mesh, represented, history, t_start
) -> tuple[np.ndarray, FitInfo]:
  """The lambdas and `FitInfo` of every sample, on every process."""
  mu = np.asarray(state.contributions, np.float32)
  (contribution,) = parallel.process_sum(mu.sum())
  # The one O(N) gather of the fit: every sample's results, on every
  # process.
  kw = dict(chunk_size=chunk_size, mesh=mesh)
  lambdas = gather_rows((mu * built.problem.inv_w).astype(np.float32), n, **kw)
  weights = gather_rows(built.weights, n, **kw)
  rankable = gather_rows(built.rankable, n, **kw)
  state = gather_state(state, n, **kw)
  residual, dist, residual_all = map(float, built.problem.diagnostics(state.g))
  info = FitInfo(
    residual=residual,
    residual_all=residual_all,
    distance=dist,
    objective=float(state.objective),
    iterations=int(state.step),
    time_s=time.perf_counter() - t_start,
    converged=done,
    capped=built.capped,
    contribution=float(contribution),
    weights=weights,
    scores=scores(lambdas, weights, rankable=rankable),
    rankable=np.asarray(rankable, bool),
    represented=represented,
    state=state,
    history=history,
  )
  return lambdas, info


class Selection(NamedTuple):
  """The top-k samples per class of a fit (`select_dsvs`).

  Attributes:
    indices: int ``[C * k]`` indices into ``x``, class by class, the
      highest score first within each class.
    labels: int ``[C * k]`` their labels.
    scores: float ``[C * k]`` their ranking scores.
    lambdas: float ``[N]`` the fitted multipliers of every sample.
    fit: the `FitInfo` (residuals, scores of every sample, ...).
  """

  indices: np.ndarray
  labels: np.ndarray
  scores: np.ndarray
  lambdas: np.ndarray
  fit: FitInfo


def select_dsvs(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  k: int,
  score: Score = DEFAULT_SCORE,
  **fit_kwargs,
) -> Selection:
  """Selects the top-``k`` Deep Support Vectors of every class from ``x``.

  The one call from a classifier and its training set to DSVs: fits
  lambda with `fit_lambdas` (the validated recipe unless ``fit_kwargs``
  override it) and ranks every class's samples by ``score`` (the
  contribution ``lambda_i ||p_i - y_i||``; see `fit_lambdas` for why not
  lambda).

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``, evaluation mode.
    params: the trained parameter pytree theta*.
    x: ``[N, ...]`` floating training samples (normalised images).
    labels: int ``[N]`` their labels.
    k: samples per class to return.
    score: one of ``SCORES``.
    **fit_kwargs: keyword arguments of `fit_lambdas`.

  Returns:
    A `Selection`.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from dsv_jax import select
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> x = np.array([[3.0], [1.0], [-1.0], [-3.0]], np.float32)
    >>> y = np.array([1, 1, 0, 0], np.int32)
    >>> params = {"w": jnp.array([[-2.0, 2.0]])}
    >>> sel = select.select_dsvs(apply_fn, params, x, y, k=1, max_iters=50)
    >>> print(sel.indices)  # the two samples nearest the boundary
    [2 1]
  """
  x = checks.host_float32_images(x)
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels must be int [N], got {labels.dtype}{list(labels.shape)}."
    )
  checks.check_choice("score", score, SCORES)
  num_classes = jax.eval_shape(apply_fn, params, x[:1]).shape[-1]
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"labels must lie in [0, {num_classes}), got values in "
      f"[{labels.min()}, {labels.max()}]."
    )
  checks.check_class_sizes(
    np.bincount(labels, minlength=num_classes), k, "to select"
  )
  lambdas, fit = fit_lambdas(apply_fn, params, x, labels, **fit_kwargs)
  s = scores(lambdas, fit.weights, score=score, rankable=fit.rankable)
  top = top_per_class(s, labels, num_classes, k)
  return Selection(top, labels[top], s[top], lambdas, fit)


# ----------------------------------------------------------------------------
# Ranking and statistics.
