"""Selection: fit lambda >= 0 over a whole training set, then rank.

Selection: with the training images fixed, fit
multipliers ``lambda >= 0`` so that the frozen weights satisfy stationarity,
``theta* ~= -G lambda`` with ``G`` the P x N matrix of per-sample gradients
``g_i = grad_theta L_i``, and rank the samples per class.

The fit is matrix-free. ``G`` is never formed: every solver iteration takes
one weighted backward pass (``G @ lambda``, the product of
`kkt.weighted_loss_grad`) and one forward-mode pass (``G^T @ u``, that of
`kkt.per_sample_grad_dots`), both streamed over the data in chunks by a
host-side loop over jitted per-chunk functions (on XLA:CPU a convolution
inside ``lax.scan`` runs 7-15x slower, see benchmarks/README.md) and sharded
``P("data")`` over a device mesh with the parameters replicated; each
device sums ``G @ lambda`` over its rows of every chunk, and the partial
sums are all-reduced once per product (P floats). With several processes
each holds only its own rows (`process_rows`) and their per-sample
vectors: an iteration communicates that all-reduce and a few scalars,
never an N-vector. Memory is O(P + chunk activations) for any N. Both
products go through the logits with ``softmax - onehot`` formed without
cancellation (see `_make_operator`): confident samples have ``1 - p_y`` far
below float32's resolution of 1.

Solver: FISTA (accelerated projected gradient) with backtracking on the
step size and gradient-based adaptive restart. ``G`` is linear, so ``G y``
at the extrapolated point is ``(1 + b) G x_k - b G x_{k-1}`` from cached
products and costs no pass. ``l1_mean`` is non-smooth; its gradient comes
from a Huber smoothing of width ``l1_smoothing * mean|theta*|`` (the
reported distance is always the exact one). ``cosine`` is scale-invariant.

What makes a support vector: the representation
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
over the rewarded samples, see below; the contribution of an exact
representation at their average margin), so ``slackness`` is
dimensionless and roughly the relative residual traded for contribution.
With ``slackness > 0`` the reward (the sum) runs over the samples with
``<theta*, -g_i> > 0`` only (for a linear model: the correctly classified
ones); the others may carry lambda up to the best constant lambda (a soft
margin, like a soft-margin SVM's C; at a stationary point of the training
objective it is 1 / (N wd)). This keeps F bounded below (see
`fit_lambdas`) and lets an underfit classifier's misclassified samples
take their part of theta*. Samples are ranked by their contribution
``lambda_i ||p_i - y_i||``.
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
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv_jax import checks, kkt, parallel
from dsv_jax.types import ApplyFn, Params, PyTree

Init = Literal["uniform", "zero"]
Score = Literal["contribution", "lambda"]
Wrt = Literal["auto", "all"]
DISTANCES = kkt.DISTANCES
INITS: tuple[Init, ...] = get_args(Init)
SCORES: tuple[Score, ...] = get_args(Score)
WRT: tuple[Wrt, ...] = get_args(Wrt)

# The validated recipe (benchmarks/README.md, svm_sanity): squared-L2
# stationarity with the complementary-slackness term at weight 0.3, from
# the best constant lambda, 1000 iterations at most, ranked by
# contribution. Measured with nothing but these defaults, mean recall of
# the hard-margin SVM's support vectors: 0.99 on the 12 original separable
# sets and 0.95 on 15 new ones (other generators, shapes and seeds); weight
# 0.1 reached 0.85 / 0.78 in 200 iterations, 0.96 / 0.91 in 1000. The
# library's defaults ARE this recipe; the packaged configs read them here.
DEFAULT_DISTANCE: kkt.Distance = "l2_sq"
DEFAULT_SLACKNESS = 0.3
DEFAULT_INIT: Init = "uniform"
DEFAULT_SCORE: Score = "contribution"
DEFAULT_MAX_ITERS = 1000
# Leaves (or sibling groups) whose scaling leaves every probed loss
# unchanged, |sum_i <theta_S, g_i,S>| <= tol * sum_i ||theta_S|| ||g_i,S||
# (aggregated over probes), cannot be represented by any lambda.
DEFAULT_INVARIANCE_TOL = 1e-3
DEFAULT_NUM_PROBE = 64

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


class Represented(NamedTuple):
  """Which parameters a lambda fit can represent (`represented_leaves`).

  Attributes:
    mask: a pytree like ``params`` of Python bools, True for the leaves
      that take part in the fit.
    excluded: ``/``-joined paths of the excluded leaves.
    groups: paths of the invariant groups found: a leaf, or a subtree
      (e.g. a normalisation layer's scale and bias together) whose joint
      scaling leaves every probed per-sample loss unchanged, or whose
      per-sample gradients are all zero.
    excluded_share: share of ``||theta*||^2`` held by the excluded leaves.
    ratios: ``{group path: |sum_i <theta_S, g_i,S>| / sum_i ||theta_S||
      ||g_i,S||}`` (aggregated over probes) of every excluded group; the
      invariance measured, for the record.
  """

  mask: PyTree
  excluded: tuple[str, ...]
  groups: tuple[str, ...]
  excluded_share: float
  ratios: dict[str, float]


class FitInfo(NamedTuple):
  """Diagnostics of `fit_lambdas`.

  Attributes:
    residual: ``||theta* + G lambda|| / ||theta*||`` at the returned lambda,
      over the represented parameters (see ``represented``).
    residual_all: the same over all of theta* (excluded leaves included).
    distance: the exact stationarity distance ``D(theta*, -G lambda)``
      over the represented parameters.
    objective: the solver's objective F (see the module docstring).
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


class _Operator(NamedTuple):
  """Chunked products with G over fixed data (see `_make_operator`).

  Per-sample vectors are this process's rows only (`process_rows`; all
  of them with one process): nothing N-sized crosses processes.
  """

  matvec: Callable[[np.ndarray], Params]  # lambda [rows] -> G lambda
  rmatvec: Callable[[Params], np.ndarray]  # u -> G^T u [rows]
  # (||p_i - y_i||, classified as its target) [rows] each.
  weights: Callable[[], tuple[np.ndarray, np.ndarray]]
  # {program name: (compiled HLO text, calls per product)} of the programs
  # one matvec and one rmatvec run (for communication counts).
  programs: Callable[[], dict[str, tuple[str, int]]]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class _Layout(NamedTuple):
  """Which rows of the set a process holds, and where they go.

  The set is cut into chunks of ``chunk`` consecutive rows, each split
  over the ``data`` devices (``shard`` rows each; the last chunk padded):
  a process holds the rows of its devices, chunk by chunk -- a split that
  depends on the device count, never on the process count.
  """

  chunk: int
  shard: int
  devices: tuple[jax.Device, ...]  # the process's devices, in mesh order
  rows: np.ndarray  # int [M]: global index of each local row
  # int [num_chunks, len(devices), shard]: the local row each device's
  # slot takes (padding: the last real local row before it).
  index: np.ndarray
  real: np.ndarray  # bool, like index: the slot holds a real row


def _layout(n: int, chunk_size: int, mesh: Mesh, process: int) -> _Layout:
  shards = parallel.num_shards(mesh)
  chunk = _round_up(parallel.balanced_chunk(n, chunk_size), shards)
  shard = chunk // shards
  devices = list(mesh.devices.reshape(-1))
  mine = [i for i, d in enumerate(devices) if d.process_index == process]
  starts = np.arange(-(-n // chunk))[:, None] * chunk
  grid = (starts + np.array(mine)[None] * shard)[..., None] + np.arange(shard)
  real = grid < n
  rows = grid[real]
  if not rows.size:
    raise ValueError(
      f"x has {n} samples: too few for {shards} devices, process {process} "
      "gets none."
    )
  local = np.cumsum(real.reshape(len(grid), -1).sum(1)) - 1
  index = np.broadcast_to(local[:, None, None], grid.shape).copy()
  index[real] = np.arange(rows.size)
  return _Layout(
    chunk,
    shard,
    tuple(devices[i] for i in mine),
    rows,
    np.maximum(index, 0),
    real,
  )


def process_rows(n: int, *, chunk_size: int, mesh: Mesh) -> np.ndarray:
  """Indices of the samples this process holds in `fit_lambdas`.

  The rows its devices take in every chunk of ``chunk_size`` (as rounded
  by `fit_lambdas`), in the order the solver keeps them: pass
  ``x[rows]``, ``targets[rows]`` and ``num_samples=n`` to `fit_lambdas`
  to stream only them. Depends on the devices of ``mesh``, not on the
  number of processes; with one process, ``arange(n)``.
  """
  return _layout(n, chunk_size, mesh, jax.process_index()).rows


def gather_rows(
  local: np.ndarray, n: int, *, chunk_size: int, mesh: Mesh
) -> np.ndarray:
  """The ``[n, ...]`` vector of every process's `process_rows` values.

  A collective (every process calls it); with one process ``local``.
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  layouts = [
    _layout(n, chunk_size, mesh, p) for p in range(jax.process_count())
  ]
  size = max(len(lay.rows) for lay in layouts)
  padded = np.zeros((size, *local.shape[1:]), local.dtype)
  padded[: len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(padded))
  out = np.zeros((n, *local.shape[1:]), local.dtype)
  for lay, values in zip(layouts, every, strict=True):
    out[lay.rows] = values[: len(lay.rows)]
  return out


def gather_state(
  state: "SolverState", n: int, *, chunk_size: int, mesh: Mesh
) -> "SolverState":
  """The state with every sample's values (e.g. to checkpoint), from the
  per-process state `fit_lambdas` passes its callback. A collective."""
  if jax.process_count() == 1:
    return state
  kw = dict(chunk_size=chunk_size, mesh=mesh)
  return state._replace(
    contributions=gather_rows(np.asarray(state.contributions), n, **kw),
    contributions_prev=gather_rows(
      np.asarray(state.contributions_prev), n, **kw
    ),
  )


Strategy = Literal["auto", "host", "device"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


def resolve_strategy(strategy: Strategy) -> str:
  """``"auto"``: ``"host"`` on CPU, ``"device"`` on GPU/TPU."""
  checks.check_choice("strategy", strategy, STRATEGIES)
  if strategy != "auto":
    return strategy
  return "host" if jax.default_backend() == "cpu" else "device"


def _make_operator(
  apply_fn: ApplyFn,
  params: Params,
  x: np.ndarray,
  targets: np.ndarray,
  *,
  layout: _Layout,
  mesh: Mesh,
  strategy: str,
) -> _Operator:
  """Products with G, chunk by chunk, each chunk split over ``mesh``.

  ``x`` and ``targets`` are the rows of ``layout`` (this process's).
  ``strategy="host"`` streams each chunk from host memory on every pass
  (one jitted program per chunk): the whole set is never on the device,
  and on XLA:CPU a Python loop over chunks measured 7-15x faster than a
  `lax.scan`. ``"device"`` uploads the set once, split over the devices,
  and runs every pass as one program over its chunks (`lax.map` /
  `lax.scan`), so an accelerator never waits on the host between chunks.

  ``G lambda`` is summed per device over the chunks and all-reduced once
  per product (P floats, whatever N); ``G^T u`` and the weights stay on
  the devices that computed them, read back by their own process.
  """
  chunk, shard, devices = layout.chunk, layout.shard, layout.devices
  rep = parallel.replicated_sharding(mesh)
  batch = parallel.batch_sharding(mesh)
  data = PartitionSpec(parallel.DATA_AXIS)

  # G lambda = J^T [lambda_i r_i] (one backward pass of the logits) and
  # G^T u = [<r_i, J_i u>] (one jvp), with r_i = softmax(z_i) - y_i, the
  # gradient of the cross-entropy at the logits. Equal to
  # kkt.weighted_loss_grad / kkt.per_sample_grad_dots, but r_i is formed
  # without cancellation: the cross-entropy VJP computes
  # lambda_i p_iy - lambda_i, which loses everything once p_iy rounds to 1
  # in float32, exactly for the confident samples whose lambda is huge.
  def varying(p):
    # Inside shard_map: the gradient with respect to a replicated (invariant)
    # input would be psummed over the devices; a varying copy keeps it
    # this device's partial sum.
    return jax.lax.pcast(p, parallel.DATA_AXIS, to="varying")

  def grad_of(p, xc, tc, lc):
    logits, vjp = jax.vjp(lambda q: apply_fn(q, xc), p)
    r = jax.lax.stop_gradient(prob_residual(logits, tc))
    return vjp(lc[:, None] * r)[0]

  def dots_of(p, xc, tc, u):
    logits, tangent = jax.jvp(lambda q: apply_fn(q, xc), (p,), (u,))
    return jnp.sum(prob_residual(logits, tc) * tangent, -1)

  def norms_of(p, xc, tc):
    logits = apply_fn(p, xc)
    r = prob_residual(logits, tc)
    labels = tc if tc.ndim == 1 else jnp.argmax(tc, -1)
    return jnp.sqrt(jnp.sum(r * r, -1)), jnp.argmax(logits, -1) == labels

  params = parallel.put(params, rep)
  shards = parallel.num_shards(mesh)
  # Per-device partial sums of G lambda, [shards, *leaf], split over data.
  zeros = jax.jit(
    lambda p: jax.tree.map(lambda a: jnp.zeros((shards, *a.shape), a.dtype), p),
    out_shardings=batch,
  )
  # The one all-reduce of a product: P floats.
  total = jax.jit(
    lambda acc: jax.tree.map(lambda a: jnp.sum(a, 0), acc), out_shardings=rep
  )

  def locals_of(values, slots):
    # [devices, ...] pieces of ``values`` (local rows) for index ``slots``.
    return [values[slots[k]] for k in range(len(devices))]

  def lambda_pieces(lambdas, slots, real):
    # Padded slots carry lambda 0: they add nothing to G lambda.
    lam = np.where(real, np.asarray(lambdas, np.float32)[slots], 0)
    return [lam[k].astype(np.float32) for k in range(len(devices))]

  if strategy == "device":
    return _device_operator(
      grad_of,
      varying,
      dots_of,
      norms_of,
      params,
      x,
      targets,
      layout,
      mesh,
      zeros,
      total,
      locals_of,
      lambda_pieces,
    )

  def chunk_data(c):
    # The last chunk is padded by repeating a real row (the model never
    # sees an arbitrary input); padded rows get lambda 0 and are dropped.
    slots = layout.index[c].reshape(len(devices), shard)
    xc = parallel.from_device_pieces(
      (chunk, *x.shape[1:]), batch, locals_of(x, slots), devices
    )
    tc = parallel.from_device_pieces(
      (chunk, *targets.shape[1:]), batch, locals_of(targets, slots), devices
    )
    return xc, tc

  def local_rows(out, c):
    # This process's real rows of a [chunk] output split over data.
    pieces = np.stack(parallel.local_pieces(out, devices))
    return pieces[layout.real[c]]

  def add_local(acc, p, xc, tc, lc):
    g = grad_of(varying(p), xc, tc, lc)
    return jax.tree.map(lambda a, b: a + b[None], acc, g)

  # shard_map: each device adds its own rows' gradient to its partial sum,
  # no collective per chunk.
  @jax.jit
  def add_grad(acc, p, xc, tc, lc):
    return jax.shard_map(
      add_local,
      mesh=mesh,
      in_specs=(data, PartitionSpec(), data, data, data),
      out_specs=data,
    )(acc, p, xc, tc, lc)

  dots = jax.jit(dots_of, out_shardings=batch)
  residual_norms = jax.jit(norms_of, out_shardings=(batch, batch))
  num_chunks = len(layout.index)

  def matvec(lambdas):
    acc = zeros(params)
    for c in range(num_chunks):
      xc, tc = chunk_data(c)
      slots = layout.index[c]
      lc = parallel.from_device_pieces(
        (chunk,), batch, lambda_pieces(lambdas, slots, layout.real[c]), devices
      )
      acc = add_grad(acc, params, xc, tc, lc)
      # Without this, asynchronous dispatch lets the host loop run ahead
      # and copy every chunk to the device before the first is consumed:
      # one more copy of the whole data set at peak (measured +170 MiB at
      # N = 60k on Fashion-MNIST).
      jax.block_until_ready(acc)
    return total(acc)

  def rmatvec(u):
    u = parallel.put(u, rep)
    out = []
    for c in range(num_chunks):
      xc, tc = chunk_data(c)
      out.append(local_rows(dots(params, xc, tc, u), c))
    return np.concatenate(out)

  def weights():
    norms, correct = [], []
    for c in range(num_chunks):
      w, ok = residual_norms(params, *chunk_data(c))
      norms.append(local_rows(w, c))
      correct.append(local_rows(ok, c))
    return np.concatenate(norms), np.concatenate(correct)

  def programs():
    xc, tc = chunk_data(0)
    lc = jax.ShapeDtypeStruct((chunk,), jnp.float32, sharding=batch)
    acc = zeros(params)
    return {
      "zeros": (zeros.lower(params).compile().as_text(), 1),
      "add_grad": (
        add_grad.lower(acc, params, xc, tc, lc).compile().as_text(),
        num_chunks,
      ),
      "total": (total.lower(acc).compile().as_text(), 1),
      "dots": (
        dots.lower(params, xc, tc, params).compile().as_text(),
        num_chunks,
      ),
    }

  return _Operator(matvec, rmatvec, weights, programs)


def _device_operator(
  grad_of,
  varying,
  dots_of,
  norms_of,
  params,
  x,
  targets,
  layout,
  mesh,
  zeros,
  total,
  locals_of,
  lambda_pieces,
) -> _Operator:
  """`_make_operator`'s ``"device"`` strategy: the set lives on device as
  ``[num_chunks, chunk, ...]``, the chunk axis split over ``data`` (each
  process uploads its own rows)."""
  chunk, devices = layout.chunk, layout.devices
  num_chunks = len(layout.index)
  spec = PartitionSpec(None, parallel.DATA_AXIS)
  split = NamedSharding(mesh, spec)
  # [devices, num_chunks, shard]: each device's slots over the chunks.
  slots = layout.index.transpose(1, 0, 2)
  real = layout.real.transpose(1, 0, 2)
  xs = parallel.from_device_pieces(
    (num_chunks, chunk, *x.shape[1:]), split, locals_of(x, slots), devices
  )
  ts = parallel.from_device_pieces(
    (num_chunks, chunk, *targets.shape[1:]),
    split,
    locals_of(targets, slots),
    devices,
  )

  def local_sum(p, xs, ts, lam):
    def body(acc, args):
      return jax.tree.map(jnp.add, acc, grad_of(p, *args)), None

    p = varying(p)
    acc = jax.tree.map(jnp.zeros_like, p)
    acc = jax.lax.scan(body, acc, (xs, ts, lam))[0]
    return jax.tree.map(lambda a: a[None], acc)

  @jax.jit
  def matvec_all(p, xs, ts, lam):
    return jax.shard_map(
      local_sum,
      mesh=mesh,
      in_specs=(PartitionSpec(), spec, spec, spec),
      out_specs=PartitionSpec(parallel.DATA_AXIS),
    )(p, xs, ts, lam)

  @jax.jit
  def rmatvec_all(p, xs, ts, u):
    return jax.lax.map(lambda args: dots_of(p, *args, u), (xs, ts))

  @jax.jit
  def weights_all(p, xs, ts):
    return jax.lax.map(lambda args: norms_of(p, *args), (xs, ts))

  def local_rows(out):
    # [devices, num_chunks, shard] -> real rows, chunk by chunk (the local
    # order of `_Layout.rows`).
    pieces = np.stack(parallel.local_pieces(out, devices)).transpose(1, 0, 2)
    return pieces[layout.real]

  def lam_of(lambdas):
    return parallel.from_device_pieces(
      (num_chunks, chunk), split, lambda_pieces(lambdas, slots, real), devices
    )

  def matvec(lambdas):
    return total(matvec_all(params, xs, ts, lam_of(lambdas)))

  def rmatvec(u):
    return local_rows(rmatvec_all(params, xs, ts, u))

  def weights():
    w, ok = weights_all(params, xs, ts)
    return local_rows(w), local_rows(ok)

  def programs():
    lam = jax.ShapeDtypeStruct((num_chunks, chunk), jnp.float32, sharding=split)
    acc = zeros(params)
    return {
      "matvec_all": (
        matvec_all.lower(params, xs, ts, lam).compile().as_text(),
        1,
      ),
      "total": (total.lower(acc).compile().as_text(), 1),
      "rmatvec_all": (
        rmatvec_all.lower(params, xs, ts, params).compile().as_text(),
        1,
      ),
    }

  return _Operator(matvec, rmatvec, weights, programs)


# ----------------------------------------------------------------------------
# The objective on P-sized pytrees (jitted once per fit).


def _huber_l1_mean(params: Params, g: Params, width: float) -> jax.Array:
  """Huber-smoothed ``l1_mean``: quadratic within ``width`` of 0."""

  def leaf(p, q):
    r = jnp.abs(p + q)
    return jnp.sum(jnp.where(r < width, 0.5 * r * r / width, r - 0.5 * width))

  total = sum(jax.tree.leaves(jax.tree.map(leaf, params, g)))
  return total / kkt.num_scalars(params)


def _smooth_distance(distance: str, width: float) -> Callable:
  if distance == "l1_mean":
    return lambda p, g: _huber_l1_mean(p, g, width)
  return kkt.distance_fn(distance)


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jax.tree.leaves(jax.tree.map(jnp.vdot, a, b)))


def _sq_norm(tree: PyTree) -> jax.Array:
  return sum(jnp.vdot(a, a) for a in jax.tree.leaves(tree))


def prob_residual(logits: jax.Array, targets: jax.Array) -> jax.Array:
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
# Which parameters can be represented at all.


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


@partial(jax.jit, static_argnums=0)
def _leaf_dots_and_norms(apply_fn, params, x, targets):
  """Per-sample, per-leaf ``<theta_l, g_i,l>`` and ``||g_i,l||``, ``[M, L]``.

  One sample at a time (memory O(P)); ``g_i = J_i^T (p_i - y_i)`` with the
  residual formed without cancellation, as in `_make_operator`, and scaled
  to unit norm: both outputs scale with it, their ratio does not, and a
  confident sample's ``||g_i||^2`` would underflow float32.
  """
  leaves = jax.tree.leaves(params)

  def one(args):
    xi, ti = args
    logits, vjp = jax.vjp(lambda p: apply_fn(p, xi[None]), params)
    r = jax.lax.stop_gradient(prob_residual(logits, ti[None]))
    r = r / jnp.maximum(jnp.max(jnp.abs(r)), jnp.finfo(r.dtype).tiny)
    g = jax.tree.leaves(vjp(r)[0])
    dots = jnp.stack([jnp.vdot(a, b) for a, b in zip(leaves, g, strict=True)])
    norms = jnp.stack([jnp.sqrt(jnp.vdot(b, b)) for b in g])
    return dots, norms

  return jax.lax.map(one, (x, targets), batch_size=8)


@partial(jax.jit, static_argnums=0)
def _residual_norms_chunk(apply_fn, params, x, targets):
  r = prob_residual(apply_fn(params, x), targets)
  return jnp.sqrt(jnp.sum(r * r, -1))


def _residual_norms(apply_fn, params, x, targets, chunk=1024) -> np.ndarray:
  """``||p_i - y_i||`` of every sample (one chunked forward pass)."""
  out = []
  for start in range(0, len(x), chunk):
    xc, tc = x[start : start + chunk], targets[start : start + chunk]
    pad = chunk - len(xc) if len(x) > chunk else 0
    if pad:  # One compiled shape for every chunk.
      xc = np.concatenate([xc, np.repeat(xc[-1:], pad, 0)])
      tc = np.concatenate([tc, np.repeat(tc[-1:], pad, 0)])
    norms = _residual_norms_chunk(apply_fn, params, xc, tc)
    out.append(np.asarray(norms)[: chunk - pad])
  return np.concatenate(out)


@kkt.full_precision
def represented_leaves(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  *,
  num_probe: int = DEFAULT_NUM_PROBE,
  tol: float = DEFAULT_INVARIANCE_TOL,
) -> Represented:
  """Finds the parameters no lambda can represent, from a few probe samples.

  A weight followed by a normalisation layer is scale-invariant: the loss
  does not change when it is scaled, so ``<theta_S, g_i,S> = 0`` for every
  sample and every per-sample gradient is orthogonal to ``theta_S``. No
  combination ``-sum_i lambda_i g_i`` can then reproduce ``theta_S``: the
  residual of any fit is at least its share of ``||theta*||``, and a fit
  over all parameters ranks samples by how they fit the rest only through
  that floor. The same holds for a group of leaves scaled together (an
  instance norm's scale and bias, when the next block is normalised too)
  and for leaves whose gradient is zero (a conv bias removed by the next
  instance norm's mean subtraction).

  Every leaf and every subtree of ``params`` is tested on ``num_probe``
  samples spread over ``x``: a group S is invariant when
  ``||[sum_{l in S} <theta_l, g_i,l>]_i|| <= tol *
  ||[sum_{l in S} ||theta_l|| ||g_i,l||]_i||`` (norms over the probes), i.e.
  the per-sample gradients are orthogonal to ``theta_S`` up to float32
  round-off (measured 1e-6 to 1e-4 on instance-norm ConvNets, against
  1e-2 and more for other leaves). Invariant groups are excluded.

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``, evaluation mode.
    params: the trained parameter pytree theta*.
    x: ``[N, ...]`` floating samples (e.g. the training set, normalised).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    num_probe: samples probed (evenly spaced over ``x``).
    tol: the invariance threshold above.

  Returns:
    A `Represented`.
  """
  if num_probe < 1:
    raise ValueError(f"num_probe must be >= 1, got {num_probe}.")
  if not 0 < tol < 1:
    raise ValueError(f"tol must lie in (0, 1), got {tol}.")
  x, targets = checks.host_float32_images(x), np.asarray(targets)
  # Probes are spread over the samples whose gradient is not exactly zero
  # (a float32 softmax saturates on very confident samples: they carry no
  # information about invariance).
  live = np.flatnonzero(_residual_norms(apply_fn, params, x, targets) > 0)
  if not len(live):
    raise ValueError(
      "every sample has a zero loss gradient in float32 (the classifier is "
      "saturated): nothing can be represented."
    )
  pick = np.linspace(0, len(live) - 1, min(num_probe, len(live))).round()
  idx = live[np.unique(pick).astype(int)]
  dots, norms = _leaf_dots_and_norms(
    apply_fn, params, jnp.asarray(x[idx]), jnp.asarray(targets[idx])
  )
  dots, norms = np.asarray(dots, np.float64), np.asarray(norms, np.float64)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path for path, _ in flat]
  sq = np.array([float(np.vdot(v, v)) for _, v in flat], np.float64)
  scale = norms * np.sqrt(sq)[None]
  # A gradient this small next to the largest leaf's is zero (round-off).
  zero_grad = norms.max(0) <= 1e-6 * max(norms.max(), 1e-30)
  groups: dict[tuple, list[int]] = {}
  for i, path in enumerate(paths):
    for depth in range(1, len(path) + 1):
      groups.setdefault(tuple(path[:depth]), []).append(i)
  excluded = np.zeros(len(paths), bool)
  found, ratios = [], {}
  # Outermost first: a group inside an excluded one is already covered.
  for prefix, members in sorted(groups.items(), key=lambda kv: len(kv[0])):
    if excluded[members].all():
      continue
    if zero_grad[members].all():
      ratio = 0.0
    else:
      a = np.linalg.norm(scale[:, members].sum(1))
      if a == 0:  # theta_S = 0: nothing to represent, target zero.
        continue
      ratio = float(np.linalg.norm(dots[:, members].sum(1)) / a)
      if ratio > tol:
        continue
    excluded[members] = True
    name = _path_str(prefix)
    found.append(name)
    ratios[name] = ratio
  if excluded.all():
    raise ValueError(
      "every parameter is scale-invariant or has a zero gradient on the "
      "probed samples: no lambda can represent any of theta*."
    )
  mask = jax.tree.unflatten(treedef, [not e for e in excluded])
  total = float(sq.sum())
  return Represented(
    mask=mask,
    excluded=tuple(
      _path_str(p) for p, e in zip(paths, excluded, strict=True) if e
    ),
    groups=tuple(found),
    excluded_share=float(sq[excluded].sum() / total) if total else 0.0,
    ratios=ratios,
  )


def resolve_wrt(
  wrt: Wrt | PyTree,
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
) -> Represented:
  """The `Represented` parameters of ``wrt`` (see `fit_lambdas`).

  ``"auto"`` runs `represented_leaves` on ``x``; ``"all"`` keeps every
  leaf; a pytree of bools like ``params`` is taken as given.
  """
  if isinstance(wrt, str):
    checks.check_choice("wrt", wrt, WRT)
    if wrt == "auto":
      return represented_leaves(apply_fn, params, x, targets)
    wrt = jax.tree.map(lambda _: True, params)
  try:
    mask = jax.tree.map(lambda m, _: bool(m), wrt, params)
  except ValueError as e:
    raise ValueError(
      "wrt must be 'auto', 'all' or a pytree of bools with the structure "
      f"of params ({e})."
    ) from None
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = [not f for f in jax.tree.leaves(mask)]
  if all(out):
    raise ValueError("wrt excludes every parameter: nothing to fit.")
  sq = np.array([float(np.vdot(v, v)) for _, v in flat])
  names = tuple(_path_str(p) for (p, _), e in zip(flat, out, strict=True) if e)
  return Represented(
    mask=mask,
    excluded=names,
    groups=names,
    excluded_share=float(sq[out].sum() / max(sq.sum(), 1e-30)),
    ratios={},
  )


def _masker(mask: PyTree) -> Callable[[PyTree], PyTree]:
  """``tree -> tree`` with the excluded leaves set to zero."""
  flags = jax.tree.leaves(mask)

  def apply(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
      treedef,
      [
        a if f else jnp.zeros_like(a)
        for a, f in zip(leaves, flags, strict=True)
      ],
    )

  return apply


# ----------------------------------------------------------------------------
# Validation.


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
  `_Layout` and the `Represented` parameters (see `fit_lambdas`)."""
  x = checks.host_float32_images(x)
  targets = np.asarray(targets)
  given = num_samples is not None
  n = num_samples if given else (x.shape[0] if x.ndim else 0)
  if n < 1 or not len(x):
    raise ValueError("x holds no samples.")
  layout = _layout(n, chunk_size, mesh, jax.process_index())
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


# ----------------------------------------------------------------------------
# The solver.


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
  callback: Callable[[SolverState, dict[str, float]], None] | None = None,
  strategy: Strategy = "auto",
  num_samples: int | None = None,
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

  The defaults are the validated recipe (`DEFAULT_DISTANCE`,
  `DEFAULT_SLACKNESS`, `DEFAULT_INIT`). Rank samples by
  `FitInfo.scores` (the contribution), not by the returned lambdas: a
  confident sample's gradient is tiny, so its lambda can be huge without
  it mattering (ranking lambda recovers no SVM support vector, see
  benchmarks/README.md). `select_dsvs` does the fit and the ranking in one
  call.

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
    callback: called after every iteration with the state and its metrics.
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

  Several processes: each keeps its own rows' per-sample vectors; the
  only traffic per iteration is the all-reduce of ``G lambda`` (P floats)
  and a few scalars (benchmarks/README.md). The callback's state holds
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
  mesh = parallel.make_mesh() if mesh is None else mesh
  x, targets, n, layout, represented = _local_problem(
    apply_fn, params, x, targets, wrt, num_samples, chunk_size, mesh
  )
  restrict = _masker(represented.mask)
  op = _make_operator(
    apply_fn,
    params,
    x,
    targets,
    layout=layout,
    mesh=mesh,
    strategy=resolve_strategy(strategy),
  )
  psum = parallel.process_sum
  params_all = parallel.put(params, parallel.replicated_sharding(mesh))
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
  # l1_mean is a mean over the represented scalars only.
  l1_fix = kkt.num_scalars(params) / num_represented

  def d_exact(p, g):
    d = kkt.distance_fn(distance)(p, g)
    return d * l1_fix if distance == "l1_mean" else d

  theta_sq = float(_sq_norm(params))
  theta_all_sq = float(_sq_norm(params_all))
  if theta_sq == 0:
    raise ValueError("params are all zero: nothing to represent.")
  mean_abs = float(
    sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params)) / num_represented
  )
  d_smooth = _smooth_distance(distance, l1_smoothing * mean_abs)
  d0 = float(d_smooth(params, zeros))
  live = inv_w > 0
  capped = 0
  supporting = live
  if slackness > 0:
    # The contribution reward goes only to samples that push towards
    # theta*, <theta*, -g_i> > 0 (for a linear model: the correctly
    # classified ones). Samples pushing away (misclassified ones of a deep
    # net) may still carry lambda, up to a cap (below): with an unbounded
    # lambda on them, some non-zero lambda >= 0 could have G lambda = 0
    # and F would be unbounded below; with the cap it is bounded, since
    # <theta*, -G lambda> grows with the rewarded samples' lambda.
    push = -op.rmatvec(params)
    supporting = live & (push > 0)
    num_supporting, capped, w_sum, push_sum = psum(
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
    capped = int(capped)
    w_ref = theta_sq * float(w_sum)
    w_ref /= float(push_sum)
    lin = np.where(supporting, slackness / w_ref, 0).astype(np.float32)
  else:
    lin = np.zeros(len(x), np.float32)
  # The best constant lambda, min_c ||theta* + c G 1||^2 over every sample
  # whose gradient is not zero: the init, and the cap of the samples
  # pushing away -- a soft margin, as a soft-margin SVM's C. At a
  # stationary point of the training objective it is 1 / (N wd), exact.
  upper = np.full(len(x), np.inf, np.float32)
  const_mu = g_const = None
  if (state is None and init == "uniform") or capped:
    # lambda = 1 / max_i w_i: with lambda = 1, G 1 of a very confident
    # classifier (every ||p_i - y_i|| ~ 1e-20) would underflow.
    w_live = np.where(live, weights, 0).astype(np.float64)
    (w_max,) = parallel.process_max(w_live.max())
    w_live = (w_live / max(w_max, _MIN_WEIGHT)).astype(np.float32)
    g1 = matvec(w_live)
    g1_sq = float(_sq_norm(restrict(g1)))
    c = max(-float(_vdot(params, g1)) / max(g1_sq, 1e-30), 0)
    const_mu = (c * w_live).astype(np.float32)
    g_const = jax.tree.map(lambda a: c * a, g1)
    if capped:
      upper = np.where(supporting | ~live, np.inf, const_mu)
      upper = upper.astype(np.float32)

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
      jnp.sqrt(_sq_norm(r) / theta_sq),
      d_exact(p, restrict(g)),
      jnp.sqrt(_sq_norm(r_all) / theta_all_sq),
    )

  @jax.jit
  def curvature_at(p, g_new, g_old, u_old):
    u_new = value_and_dual_at(p, g_new)[1]
    du = jax.tree.map(jnp.subtract, u_new, u_old)
    return _vdot(du, jax.tree.map(jnp.subtract, g_new, g_old))

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

  def objective(g, lin_mu):
    return float(value_and_dual(g)[0]) - float(lin_mu)

  if state is None:
    if init == "zero":
      mu0 = np.zeros(len(x), np.float32)
      g0 = zeros
    else:
      mu0, g0 = const_mu, g_const
    # Initial step size: the curvature of F's distance part along the
    # projected negative gradient (a lower bound on L; backtracking raises
    # it where needed).
    _, u0 = value_and_dual(g0)
    grad0 = rmatvec(u0) - lin
    movable = ((mu0 > 0) | (grad0 < 0)) & ((mu0 < upper) | (grad0 > 0))
    direction = np.where(movable, -grad0, 0)
    direction = direction.astype(np.float32)
    dn = float(*psum(direction @ direction))
    lip = 1.0
    if dn > 0:
      # A step scaled to move G lambda by about ||theta*||: the difference
      # of the two duals is then well above float32 round-off.
      gd = matvec(direction)
      s = math.sqrt(theta_sq / max(float(_sq_norm(restrict(gd))), 1e-30))
      _, u1 = value_and_dual(jax.tree.map(lambda a, b: a + s * b, g0, gd))
      (curv,) = psum((rmatvec(u1) - grad0 - lin) @ direction)
      curv = float(curv) / (s * dn)
      lip = curv if curv > 0 else 1.0
    state = SolverState(
      step=jnp.int32(0),
      contributions=jnp.asarray(mu0),
      contributions_prev=jnp.asarray(mu0),
      g=g0,
      g_prev=g0,
      momentum=jnp.float32(1.0),
      lipschitz=jnp.float32(lip),
      objective=jnp.float32(objective(g0, *psum(lin @ mu0))),
      max_step=jnp.float32(0.0),
      converged=jnp.asarray(False),
    )
  elif state.contributions.shape != (n,):
    raise ValueError(
      f"the resume state has {state.contributions.shape[0]} samples but x "
      f"has {n}: it belongs to another problem."
    )
  else:
    # A restored state lives on one device; the products are replicated,
    # and this process keeps its own rows.
    rep = parallel.replicated_sharding(mesh)
    state = state._replace(
      contributions=jnp.asarray(np.asarray(state.contributions)[layout.rows]),
      contributions_prev=jnp.asarray(
        np.asarray(state.contributions_prev)[layout.rows]
      ),
      g=parallel.put(state.g, rep),
      g_prev=parallel.put(state.g_prev, rep),
    )

  history = []
  # A state that already converged (e.g. a checkpoint of a finished fit)
  # stays converged: no iteration, the same lambdas.
  converged = bool(state.converged)
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
      mu_new = np.clip(y - grad / lip, 0, upper).astype(np.float32)
      g_new = matvec(mu_new)
      d = mu_new - y
      # Backtracking on the local curvature <grad F(x+) - grad F(y), x+ - y>
      # <= L ||x+ - y||^2, computed from P-sized products. The textbook test
      # on F values fails spuriously once the decrease per step is below
      # float32 round-off of F, and then drives L to infinity.
      curv = float(curvature(g_new, gy, u))
      dd, moved = psum(d @ d, np.count_nonzero(d))
      if curv <= lip * float(dd) * (1 + 1e-4) or not moved:
        break
      lip *= _BACKTRACK
      backtracks += 1
    delta = mu_new - mu
    # Every scalar of the iteration in one reduction over the processes.
    lin_mu, against, step_sq, contribution, lambda_sum, nonzero = psum(
      lin @ mu_new,
      (y - mu_new) @ delta,
      delta @ delta,
      mu_new.sum(),
      (mu_new * inv_w).sum(),
      np.count_nonzero(mu_new),
    )
    f_new = objective(g_new, lin_mu)
    # Gradient-based adaptive restart (O'Donoghue & Candes, 2015): drop the
    # momentum when the step points against the previous direction.
    restart = float(against) > 0
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
    residual, dist, residual_all = map(float, diagnostics(g_new))
    # Scale-free stopping rule: this step against the largest one so far
    # (lambda's scale, and so a step's, is arbitrary: 1/(N wd) and more).
    step_norm = float(np.sqrt(step_sq))
    max_step = max(float(state.max_step), step_norm)
    change = step_norm / max(max_step, 1e-30)
    row = {
      "step": step,
      "residual": residual,
      "residual_all": residual_all,
      "distance": dist,
      "objective": f_new,
      "contribution": float(contribution),
      "lambda_sum": float(lambda_sum),
      "nonzero": int(nonzero),
      "change": change,
      "lipschitz": lip,
      "backtracks": backtracks,
      "restart": int(restart),
      "s_per_iter": time.perf_counter() - t_iter,
    }
    converged = change <= tol or (slackness == 0 and residual <= tol)
    state = state._replace(
      max_step=jnp.float32(max_step), converged=jnp.asarray(converged)
    )
    history.append(row)
    if callback is not None:
      callback(state, row)

  mu = np.asarray(state.contributions, np.float32)
  (contribution,) = psum(mu.sum())
  # The one O(N) gather of the fit: every sample's results, on every
  # process.
  kw = dict(chunk_size=chunk_size, mesh=mesh)
  lambdas = gather_rows((mu * inv_w).astype(np.float32), n, **kw)
  weights = gather_rows(weights, n, **kw)
  rankable = gather_rows(supporting & correct, n, **kw)
  state = gather_state(state, n, **kw)
  residual, dist, residual_all = map(float, diagnostics(state.g))
  info = FitInfo(
    residual=residual,
    residual_all=residual_all,
    distance=dist,
    objective=float(state.objective),
    iterations=int(state.step),
    time_s=time.perf_counter() - t_start,
    converged=converged,
    capped=capped,
    contribution=float(contribution),
    weights=weights,
    scores=scores(lambdas, weights, rankable=rankable),
    rankable=np.asarray(rankable, bool),
    represented=represented,
    state=state,
    history=history,
  )
  return lambdas, info


@kkt.full_precision
def stationarity_residuals(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  lambdas: jax.typing.ArrayLike,
  *,
  mask: PyTree | None = None,
  chunk_size: int = 1024,
  mesh: Mesh | None = None,
  strategy: Strategy = "auto",
) -> tuple[float, float]:
  """Relative residuals ``||theta* + G lambda|| / ||theta*||`` of a lambda.

  One streamed backward pass. The anchor every fit should be read
  against: at a stationary point of the training objective mean CE +
  ``(wd / 2) ||theta||^2`` (coupled weight decay ``wd``) the uniform
  ``lambda_i = 1 / (N wd)`` gives exactly 0, so its
  residual measures how far the classifier is from that point.

  Args:
    apply_fn, params, x, targets: as in `fit_lambdas`.
    lambdas: ``float[N]``, ``>= 0`` (dual feasibility; a negative entry
      raises a ``ValueError``).
    mask: a pytree of bools like ``params`` (`Represented.mask`): the
      parameters of the first residual; None: all.
    chunk_size: samples per pass.
    mesh: a ``data`` mesh; all devices if None.
    strategy: as in `fit_lambdas`.

  Returns:
    ``(residual over the masked parameters, residual over all)``.
  """
  x, targets = checks.host_float32_images(x), np.asarray(targets)
  lambdas = np.asarray(lambdas, np.float32)
  if lambdas.shape != (len(x),):
    raise ValueError(
      f"lambdas must have shape [N] = ({len(x)},), got {lambdas.shape}."
    )
  checks.check_nonnegative_lambdas(lambdas)
  mesh = parallel.make_mesh() if mesh is None else mesh
  layout = _layout(len(x), chunk_size, mesh, jax.process_index())
  if jax.process_count() > 1:  # Each process streams its own rows.
    x, targets = x[layout.rows], targets[layout.rows]
    lambdas = lambdas[layout.rows]
  op = _make_operator(
    apply_fn,
    params,
    x,
    targets,
    layout=layout,
    mesh=mesh,
    strategy=resolve_strategy(strategy),
  )
  g = op.matvec(lambdas)
  restrict = _masker(mask if mask is not None else params)

  def rel(p, gg):
    r = jax.tree.map(jnp.add, p, gg)
    return float(jnp.sqrt(_sq_norm(r) / _sq_norm(p)))

  params = parallel.put(params, parallel.replicated_sharding(mesh))
  if mask is None:
    both = rel(params, g)
    return both, both
  return rel(restrict(params), restrict(g)), rel(params, g)


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
  counts = np.bincount(labels, minlength=num_classes)
  short = np.flatnonzero(counts < k)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"labels must lie in [0, {num_classes}), got values in "
      f"[{labels.min()}, {labels.max()}]."
    )
  if short.size:
    c = int(short[0])
    raise ValueError(
      f"class {c} has {counts[c]} samples, fewer than the k = {k} to select."
    )
  lambdas, fit = fit_lambdas(apply_fn, params, x, labels, **fit_kwargs)
  s = scores(lambdas, fit.weights, score=score, rankable=fit.rankable)
  top = top_per_class(s, labels, num_classes, k)
  return Selection(top, labels[top], s[top], lambdas, fit)


# ----------------------------------------------------------------------------
# Ranking and statistics.


def scores(
  lambdas: np.ndarray,
  weights: np.ndarray,
  *,
  score: Score = DEFAULT_SCORE,
  rankable: np.ndarray | None = None,
) -> np.ndarray:
  """Per-sample ranking scores.

  Args:
    lambdas: ``float[N]`` fitted multipliers.
    weights: ``||p_i - y_i||`` per sample (`FitInfo.weights`).
    score: ``"contribution"`` (``lambda_i ||p_i - y_i||``) or ``"lambda"``.
    rankable: optional ``bool[N]`` (`FitInfo.rankable`); the others score 0.

  Returns:
    ``float32[N]``; higher ranks first.
  """
  checks.check_choice("score", score, SCORES)
  lambdas = np.asarray(lambdas, np.float32)
  out = (
    lambdas * np.asarray(weights, np.float32)
    if score == "contribution"
    else lambdas
  )
  if rankable is not None:
    out = np.where(np.asarray(rankable, bool), out, 0).astype(np.float32)
  return out


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
  "DEFAULT_DISTANCE",
  "DEFAULT_INIT",
  "DEFAULT_MAX_ITERS",
  "DEFAULT_SCORE",
  "DEFAULT_SLACKNESS",
  "DISTANCES",
  "FitInfo",
  "INITS",
  "Init",
  "Represented",
  "SCORES",
  "Score",
  "Selection",
  "STRATEGIES",
  "SolverState",
  "Strategy",
  "WRT",
  "Wrt",
  "fit_lambdas",
  "gather_rows",
  "gather_state",
  "per_class_sums",
  "precision_recall_at_k",
  "prob_residual",
  "process_rows",
  "random_per_class",
  "rank_per_class",
  "represented_leaves",
  "resolve_strategy",
  "resolve_wrt",
  "scores",
  "select_dsvs",
  "stationarity_residuals",
  "top_per_class",
]
