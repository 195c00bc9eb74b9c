"""FISTA over the contributions: the solver state and one iteration.

Accelerated projected gradient with backtracking on the step size and
gradient-based adaptive restart, over ``mu >= 0`` (``mu_i = lambda_i
||p_i - y_i||``, see `dsv_jax.select.fit`). ``G`` is linear, so ``G y``
at the extrapolated point is ``(1 + b) G x_k - b G x_{k-1}`` from cached
products and costs no pass. `init_state`, `step` and `converged` are
functions of a `SolverState` and the fixed `Problem`; the loop that runs
them (resume, logging) is `dsv_jax.select.fit_lambdas`.
"""

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsv_jax import kkt
from dsv_jax.types import Params, PyTree

# Backtracking multiplies the Lipschitz estimate by this on a failed step.
_BACKTRACK = 2.0
# ... and by this at the start of every iteration.
_SHRINK = 0.95
# ||p_i - y_i|| below this counts as zero (the sample's gradient is zero).


class SolverState(NamedTuple):
  """FISTA state; a pytree that checkpoints as-is (resume is exact).

  Attributes:
    step: iterations done (int32 scalar).
    contributions: current iterate ``mu_k = lambda_k * ||p - y||`` (the
      solver's variable, see `fit_lambdas`), ``float32[N]`` (in the state
      `fit_lambdas` passes its callback with several processes: this
      process's `process_rows` only, see `gather_state`).
    contributions_prev: previous iterate ``mu_{k-1}``.
    g: ``G @ lambda_k``, a pytree like params.
    g_prev: ``G @ lambda_{k-1}``.
    momentum: FISTA's ``t_k`` (1 after a restart).
    lipschitz: current step-size estimate L (step 1/L).
    objective: ``F(x_k)``.
    max_step: the largest ``||mu_{j+1} - mu_j||`` so far (the stopping
      rule's scale).
    converged: bool scalar, the stopping rule fired: `fit_lambdas` resumed
      from this state does no further iteration. False by default, e.g.
      for a state restored from a checkpoint written before the field
      existed (`dsv_jax.checkpoints.RunCheckpointer.restore` keeps this
      default when the checkpoint lacks it).
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
  # A numpy array, not a jax one: a module-level jax array would initialise
  # the backend at import, and Orbax restores into a numpy array but not
  # into a numpy scalar. Never mutated.
  converged: jax.Array = np.array(False)


def huber_l1_mean(params: Params, g: Params, width: float) -> jax.Array:
  """Huber-smoothed ``l1_mean``: quadratic within ``width`` of 0."""

  def leaf(p, q):
    r = jnp.abs(p + q)
    return jnp.sum(jnp.where(r < width, 0.5 * r * r / width, r - 0.5 * width))

  total = sum(jax.tree.leaves(jax.tree.map(leaf, params, g)))
  return total / kkt.num_scalars(params)


def smooth_distance(distance: str, width: float) -> Callable:
  if distance == "l1_mean":
    return lambda p, g: huber_l1_mean(p, g, width)
  return kkt.distance_fn(distance)


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jax.tree.leaves(jax.tree.map(jnp.vdot, a, b)))


def sq_norm(tree: PyTree) -> jax.Array:
  return sum(jnp.vdot(a, a) for a in jax.tree.leaves(tree))


class Problem(NamedTuple):
  """The fixed pieces of the objective F an iteration reads.

  Built once per fit by `dsv_jax.select.fit_lambdas`. Per-sample vectors
  are this process's rows; ``process_sum`` reduces host scalars over the
  processes (a host-side gather, not a device collective).
  """

  matvec: Callable[[np.ndarray], Params]  # mu -> G lambda (every leaf)
  rmatvec: Callable[[Params], np.ndarray]  # u -> d<u, G lambda>/dmu
  # g -> (F's distance part at G lambda = g, its gradient u in g).
  value_and_dual: Callable[[Params], tuple[jax.Array, Params]]
  # (g_new, g_old, u_old) -> <u(g_new) - u_old, g_new - g_old>.
  curvature: Callable[[Params, Params, Params], jax.Array]
  combine: Callable  # (a, b, beta) -> (1 + beta) a - beta b
  # g -> (residual, exact distance, residual over every leaf).
  diagnostics: Callable[[Params], tuple[jax.Array, ...]]
  restrict: Callable[[PyTree], PyTree]  # excluded leaves set to zero
  lin: np.ndarray  # float32 [rows]: the contribution term's weight on mu
  upper: np.ndarray  # float32 [rows]: the cap on mu (inf: none)
  inv_w: np.ndarray  # float32 [rows]: 1 / ||p_i - y_i|| (0: zero gradient)
  theta_sq: float  # ||theta*||^2 over the represented leaves
  process_sum: Callable[..., tuple]


def objective(problem: Problem, g: Params, lin_mu) -> float:
  """``F`` at ``G lambda = g`` with contribution term ``lin_mu``."""
  return float(problem.value_and_dual(g)[0]) - float(lin_mu)


def init_state(problem: Problem, mu0: np.ndarray, g0: Params) -> SolverState:
  """The state at ``mu0`` (``G lambda_0 = g0``), with a first step size."""
  # Initial step size: the curvature of F's distance part along the
  # projected negative gradient (a lower bound on L; backtracking raises
  # it where needed).
  lin, upper = problem.lin, problem.upper
  _, u0 = problem.value_and_dual(g0)
  grad0 = problem.rmatvec(u0) - lin
  movable = ((mu0 > 0) | (grad0 < 0)) & ((mu0 < upper) | (grad0 > 0))
  direction = np.where(movable, -grad0, 0)
  direction = direction.astype(np.float32)
  dn = float(*problem.process_sum(direction @ direction))
  lip = 1.0
  if dn > 0:
    # A step scaled to move G lambda by about ||theta*||: the difference
    # of the two duals is then well above float32 round-off.
    gd = problem.matvec(direction)
    gd_sq = float(sq_norm(problem.restrict(gd)))
    s = math.sqrt(problem.theta_sq / max(gd_sq, 1e-30))
    g1 = jax.tree.map(lambda a, b: a + s * b, g0, gd)
    _, u1 = problem.value_and_dual(g1)
    (curv,) = problem.process_sum(
      (problem.rmatvec(u1) - grad0 - lin) @ direction
    )
    curv = float(curv) / (s * dn)
    lip = curv if curv > 0 else 1.0
  return SolverState(
    step=jnp.int32(0),
    contributions=jnp.asarray(mu0),
    contributions_prev=jnp.asarray(mu0),
    g=g0,
    g_prev=g0,
    momentum=jnp.float32(1.0),
    lipschitz=jnp.float32(lip),
    objective=jnp.float32(
      objective(problem, g0, *problem.process_sum(lin @ mu0))
    ),
    max_step=jnp.float32(0.0),
    converged=jnp.asarray(False),
  )


def _backtrack(problem, y, grad, gy, u, lip):
  """The projected step from ``y`` with the smallest accepted ``L``:
  ``(mu_new, G lambda_new, L, number of backtracks)``."""
  backtracks = 0
  while True:
    mu_new = np.clip(y - grad / lip, 0, problem.upper).astype(np.float32)
    g_new = problem.matvec(mu_new)
    d = mu_new - y
    # Backtracking on the local curvature <grad F(x+) - grad F(y), x+ - y>
    # <= L ||x+ - y||^2, computed from P-sized products. The textbook test
    # on F values fails spuriously once the decrease per step is below
    # float32 round-off of F, and then drives L to infinity.
    curv = float(problem.curvature(g_new, gy, u))
    dd, moved = problem.process_sum(d @ d, np.count_nonzero(d))
    if curv <= lip * float(dd) * (1 + 1e-4) or not moved:
      return mu_new, g_new, lip, backtracks
    lip *= _BACKTRACK
    backtracks += 1


def step(
  problem: Problem, state: SolverState
) -> tuple[SolverState, dict[str, float]]:
  """One FISTA iteration: the next state and its metrics row.

  The returned state's ``converged`` is False; `converged` decides it.
  """
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
  gy = problem.combine(state.g, state.g_prev, jnp.float32(beta))
  _, u = problem.value_and_dual(gy)
  grad = problem.rmatvec(u) - problem.lin
  mu_new, g_new, lip, backtracks = _backtrack(problem, y, grad, gy, u, lip)
  delta = mu_new - mu
  # Every scalar of the iteration in one reduction over the processes.
  lin_mu, against, step_sq, contribution, lambda_sum, nonzero = (
    problem.process_sum(
      problem.lin @ mu_new,
      (y - mu_new) @ delta,
      delta @ delta,
      mu_new.sum(),
      (mu_new * problem.inv_w).sum(),
      np.count_nonzero(mu_new),
    )
  )
  f_new = objective(problem, g_new, lin_mu)
  # Gradient-based adaptive restart (O'Donoghue & Candes, 2015): drop the
  # momentum when the step points against the previous direction.
  restart = float(against) > 0
  done = int(state.step) + 1
  residual, dist, residual_all = map(float, problem.diagnostics(g_new))
  # Scale-free stopping rule: this step against the largest one so far
  # (lambda's scale, and so a step's, is arbitrary: 1/(N wd) and more).
  step_norm = float(np.sqrt(step_sq))
  max_step = max(float(state.max_step), step_norm)
  row = {
    "step": done,
    "residual": residual,
    "residual_all": residual_all,
    "distance": dist,
    "objective": f_new,
    "contribution": float(contribution),
    "lambda_sum": float(lambda_sum),
    "nonzero": int(nonzero),
    "change": step_norm / max(max_step, 1e-30),
    "lipschitz": lip,
    "backtracks": backtracks,
    "restart": int(restart),
    "s_per_iter": time.perf_counter() - t_iter,
  }
  new = SolverState(
    step=jnp.int32(done),
    contributions=jnp.asarray(mu_new),
    contributions_prev=jnp.asarray(mu),
    g=g_new,
    g_prev=state.g,
    momentum=jnp.float32(1.0 if restart else t_next),
    lipschitz=jnp.float32(lip),
    objective=jnp.float32(f_new),
    max_step=jnp.float32(max_step),
  )
  return new, row


def converged(row: dict[str, float], *, tol: float, slackness: float) -> bool:
  """The stopping rule on a `step` row: the step is below ``tol`` times
  the largest so far or, without the contribution term, the relative
  residual is below ``tol``."""
  return row["change"] <= tol or (slackness == 0 and row["residual"] <= tol)
