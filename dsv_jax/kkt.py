"""DeepKKT objectives of Deep Support Vectors (Lee et al., NeurIPS 2024).

Every function here works for any classifier given as a pure
``apply_fn(params, x[N, ...]) -> logits[N, C]`` (eval mode). ``params`` is the
frozen trained theta*; only the candidates ``x`` and the multipliers
``lambdas`` are meant to be optimised. ``x`` is floating point, in the
space the model was trained in (images normalised as
``DatasetInfo.normalize`` does; integer pixels raise a ``ValueError``).
``targets`` are int labels ``[N]`` or soft targets ``float[N, C]`` (rows
sum to 1). The multipliers are ``lambdas >= 0`` (dual feasibility):
concrete ones with a negative entry raise a ``ValueError``; traced ones
(inside ``jit``, ``grad``, ``vmap``) cannot be checked and are not. The
per-sample loss ``L_i`` is softmax cross-entropy.

The DeepKKT conditions (Eq. 6) become losses:

* stationarity (Eq. 5, Eq. 8): ``D(theta*, -sum_i lambda_i grad_theta L_i)``,
  with ``sum_i lambda_i grad_theta L_i = grad_theta sum_i lambda_i L_i``
  computed by ONE backward pass of the lambda-weighted summed loss;
* primal feasibility (Eq. 7): cross-entropy gated to the candidates that are
  not yet classified as their target;
* dual feasibility: a boolean ``active`` mask (a disqualified candidate
  contributes nothing; shapes never change).

Derivatives of the stationarity loss with respect to ``x`` and ``lambdas``
are derivatives of a gradient. ``method="fast"`` (the default)
differentiates the whole DeepKKT loss with a ``jax.custom_vjp`` whose
forward rule does the work (forward-over-reverse). It linearises
``(theta, c) -> grad [sum_i lambda_i L_i + <c, logits>]`` (the gradient
with respect to ``x`` and whatever else is differentiated) once: the
primal, one forward and one weighted backward pass, gives ``g``, the
logits, and so ``u = dD/dg`` and the primal term's ``dL_primal/dlogits``.
The tangent along ``theta``-direction ``beta_stat u`` and ``c``-direction
``beta_primal dL_primal/dlogits`` is then the gradient of the total
(``d/de grad F(theta + e u) = grad <u, grad_theta F>``), and the tangent
of the per-sample losses, ``beta_stat <u, grad_theta L_i>``, its
lambda-gradient. The backward rule only scales them. It is exact and
measured faster than the plain reverse-over-reverse formulation, which
``method="reverse"`` keeps. See ``benchmarks/README.md``.

Both methods differentiate with respect to everything ``apply_fn`` closes
over, too (bilevel and meta-learning uses: an outer ``jax.grad`` over a
value inside ``apply_fn``): the fast method hoists closed-over values into
explicit inputs of its custom VJP (as ``jax.closure_convert`` would). Forward
mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) works with
``method="reverse"`` only: on the fast method JAX raises ``TypeError:
can't apply forward-mode autodiff (jvp) to a custom_vjp function``.

With ``chunk_size`` every function here streams over chunks of candidates
(``lax.scan``), memory O(P + chunk activations). Candidates sharded
``P("data")`` over a mesh (`dsv_jax.parallel`) stay sharded inside every
chunk when N and ``chunk_size`` are both multiples of the number of
devices: each device computes its share of every chunk and the sum over
candidates is an all-reduce (other sizes compile, with all-gathers).

Matmuls and convolutions run at float32 precision (`MATMUL_PRECISION`)
whatever ``jax_default_matmul_precision`` says: the TPU (bfloat16 passes)
and Ampere+ GPU (TF32) defaults are too coarse for a residual that is a
difference of nearly equal sums.

Two equivalent interfaces: the functions below take ``apply_fn`` and the
configuration on every call (``deepkkt_loss(apply_fn, params, x, targets,
lambdas, distance=...)``); ``make_deepkkt_loss(apply_fn, distance=...)``
binds them once, optax-style, and returns ``loss(params, x, targets,
lambdas, active=None)``, which ``jax.jit`` takes as it is.

Stationarity over a subset of the parameters (the paper's last-layer transfer
experiment): close over the frozen part in ``apply_fn`` and pass only the
trainable part as ``params``::

  head_apply = lambda head, x: full_apply({"body": body, "head": head}, x)
  kkt.stationarity_loss(head_apply, head, x, targets, lambdas)
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from dsv_jax import checks
from dsv_jax.types import ApplyFn, Params, PyTree

Distance = Literal["l1_mean", "l2_sq", "cosine"]
Method = Literal["fast", "reverse"]
DISTANCES: tuple[Distance, ...] = get_args(Distance)
# The default stationarity distance of every DeepKKT objective here and of
# synthesis (`dsv_jax.synthesize`, the packaged configs). Cosine is
# scale-free: its value lies in [0, 2] whatever the size and scale of
# theta*, so its balance against the primal cross-entropy does not depend
# on the model, and the multipliers cannot shrink the term away. Measured
# (README, synthesis; 10 DSVs per class from noise, agreement of an
# independently trained classifier): on the healthy digits ConvNet cosine
# 0.99, the paper's l1_mean 0.98, l2_sq 0.44 (its scale, ||theta*||^2,
# swamps the primal term); on a near-uniform one cosine 0.85, l1_mean 0.72.
# Selection uses l2_sq (`dsv_jax.select.DEFAULT_DISTANCE`): its
# complementary-slackness term needs a distance that is not scale-free.
DEFAULT_DISTANCE: Distance = "cosine"
METHODS: tuple[Method, ...] = get_args(Method)


# ----------------------------------------------------------------------------
# Matmul precision.

# Every function here runs its matmuls and convolutions in float32 whatever
# the ambient `jax_default_matmul_precision`: by default TPUs multiply
# float32 in bfloat16 passes and Ampere+ GPUs in TF32 (about 3 significant
# digits), while the stationarity residual theta* + sum_i lambda_i g_i is a
# difference of nearly equal sums, and selection's cancellation-free
# residual, curvature backtracking and extrapolation by linearity all rely
# on float32 products. Layers given an explicit ``precision`` keep theirs.
MATMUL_PRECISION = "highest"


def full_precision(fn: Callable) -> Callable:
  """``fn`` traced with default matmul precision `MATMUL_PRECISION`.

  JAX fixes a matmul's precision when the operation is traced, so this
  holds for ``fn`` under ``jax.jit`` and for every derivative of it.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision(MATMUL_PRECISION):
      return fn(*args, **kwargs)

  return wrapped


# ----------------------------------------------------------------------------
# Chunking over the sample axis (memory O(P + chunk activations)).


class _ChunkPlan(NamedTuple):
  """How N samples go into equal chunks that stay within every shard.

  The samples are viewed as ``stripes`` contiguous runs of ``n // stripes``
  and every chunk takes ``per_stripe`` consecutive samples from each run:
  chunk k of stripe s holds samples ``s * (n // stripes) + k * per_stripe +
  [0, per_stripe)``. With ``P("data")`` sharding each device holds whole
  runs as long as ``stripes`` is a multiple of the device count, so every
  chunk is split over every device, the sharded axis stays the chunk's
  row axis, and the sum over a chunk is a local sum plus an all-reduce.
  Contiguous chunks (``stripes == 1``) would put the sharded axis on the
  scanned one: every device would then compute every chunk, on all-gathered
  candidates.
  """

  n: int
  stripes: int
  per_stripe: int
  num_chunks: int

  @property
  def chunk(self) -> int:
    return self.stripes * self.per_stripe


def _chunk_plan(n: int, chunk_size: int | None) -> _ChunkPlan | None:
  """The chunks of a scan over ``n`` samples, or None for a single pass.

  ``stripes = gcd(n, chunk_size)``: a multiple of the device count whenever
  ``n`` and ``chunk_size`` both are (``parallel.pad_to_multiple`` gives
  ``n``). Every chunk holds exactly ``chunk_size`` samples; each stripe's
  last one is padded.
  """
  if chunk_size is None or chunk_size >= n:
    return None
  stripes = math.gcd(n, chunk_size)
  per_stripe = chunk_size // stripes
  num_chunks = -(-(n // stripes) // per_stripe)
  return _ChunkPlan(n, stripes, per_stripe, num_chunks)


def _to_chunks(a: jax.Array, plan: _ChunkPlan, *, zero: bool) -> jax.Array:
  """[N, ...] -> [num_chunks, chunk, ...], padding every stripe's end.

  Data rows are padded by repeating the stripe's last sample (``zero=False``)
  so that the model never sees an out-of-distribution row (which could
  produce inf/NaN and poison a zero-weighted sum); weights are padded with
  zeros. Padding and transposes act on the axes that are not sharded.
  """
  rest = a.shape[1:]
  a = a.reshape(plan.stripes, plan.n // plan.stripes, *rest)
  pad = plan.num_chunks * plan.per_stripe - a.shape[1]
  if pad:
    # Not jnp.pad(mode="edge"): on a mesh its transpose (reverse-mode
    # gradient) compiled to a collective-permute between devices.
    last = jnp.zeros_like(a[:, -1:]) if zero else a[:, -1:]
    a = jnp.concatenate([a, jnp.repeat(last, pad, axis=1)], axis=1)
  a = a.reshape(plan.stripes, plan.num_chunks, plan.per_stripe, *rest)
  return jnp.swapaxes(a, 0, 1).reshape(plan.num_chunks, plan.chunk, *rest)


def _from_chunks(a: jax.Array, plan: _ChunkPlan) -> jax.Array:
  """The inverse of `_to_chunks`: [num_chunks, chunk, ...] -> [N, ...]."""
  rest = a.shape[2:]
  a = a.reshape(plan.num_chunks, plan.stripes, plan.per_stripe, *rest)
  a = jnp.swapaxes(a, 0, 1).reshape(plan.stripes, -1, *rest)
  return a[:, : plan.n // plan.stripes].reshape(plan.n, *rest)


def _tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


# ----------------------------------------------------------------------------
# Per-sample loss and the lambda-weighted gradient.


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-sample softmax cross-entropy ``L_i`` used by every DeepKKT term.

  Args:
    logits: ``[N, C]`` model outputs.
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.

  Returns:
    ``[N]`` losses ``-sum_c t_ic log softmax(logits_i)_c``.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 5 (``L``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> logits = jnp.zeros((2, 4))
    >>> print(kkt.cross_entropy(logits, jnp.array([0, 3])))
    [1.3862944 1.3862944]
  """
  # The operations of optax's softmax_cross_entropy(_with_integer_labels),
  # written out: importing optax imports absl.logging and absl.flags, which
  # this module's import must not.
  if targets.ndim == 1:
    label_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - label_logits[:, 0]
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def _weighted_grad_and_logits(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.Array,
  targets: jax.Array,
  lambdas: jax.Array,
  chunk_size: int | None,
) -> tuple[Params, jax.Array]:
  """``grad_theta sum_i lambda_i L_i`` and the logits of the same forward."""

  def one_pass(xc, tc, lc):
    def weighted_loss(p):
      logits = apply_fn(p, xc)
      return jnp.sum(lc * cross_entropy(logits, tc)), logits

    return jax.grad(weighted_loss, has_aux=True)(params)

  plan = _chunk_plan(x.shape[0], chunk_size)
  if plan is None:
    return one_pass(x, targets, lambdas)
  xs = (
    _to_chunks(x, plan, zero=False),
    _to_chunks(targets, plan, zero=False),
    _to_chunks(lambdas, plan, zero=True),
  )

  def body(acc, xs_c):
    g, logits = one_pass(*xs_c)
    return _tree_add(acc, g), logits

  zeros = jax.tree.map(jnp.zeros_like, params)
  g, logits = jax.lax.scan(body, zeros, xs)
  return g, _from_chunks(logits, plan)


@full_precision
def weighted_loss_grad(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  lambdas: jax.typing.ArrayLike,
  *,
  chunk_size: int | None = None,
) -> Params:
  """``sum_i lambda_i grad_theta L(apply_fn(params, x_i), targets_i)``.

  Computed as ONE backward pass of the lambda-weighted summed loss
  ``grad_theta sum_i lambda_i L_i``; no per-sample gradient is formed. With
  ``chunk_size`` the sum streams over chunks of samples (``lax.scan``), so
  memory is O(P + chunk_size activations) for any N (on a mesh, see the
  module docstring for the sizes that keep chunks sharded). Chunk only
  where memory requires it: on XLA:CPU a convolution inside the scanned
  loop body ran 7-15x slower than one unchunked pass (see
  ``benchmarks/README.md``).
  Differentiable (by reverse-over-reverse autodiff) with respect to every
  argument.

  Multipliers must be non-negative (dual feasibility). A negative
  ``lambda_i`` is defined -- it flips sample i's gradient in the sum -- but
  it is not a KKT multiplier, so concrete ``lambdas`` with a negative entry
  raise a ``ValueError``. Traced ones (inside ``jit``, ``grad`` or ``vmap``)
  are not checked: their values are unknown when the check runs. Synthesis
  keeps them feasible by softplus or by the active mask
  (`dsv_jax.synthesize`).

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
    params: the parameter pytree theta.
    x: ``[N, ...]`` floating samples (normalised images).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    lambdas: ``float[N]`` multipliers, ``>= 0``.
    chunk_size: samples per backward pass; None for a single pass.

  Returns:
    A pytree like ``params``.

  Raises:
    ValueError: integer ``x``, concrete negative ``lambdas``, or shapes that
      do not fit each other or the model.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 5 (right-hand side,
    up to sign).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x = jnp.ones((4, 3))
    >>> targets = jnp.array([0, 1, 0, 1])
    >>> g = kkt.weighted_loss_grad(apply_fn, params, x, targets, jnp.ones(4))
    >>> print(g["w"])  # the two classes pull in opposite directions
    [[0. 0.]
     [0. 0.]
     [0. 0.]]
  """
  x, targets, lambdas = map(jnp.asarray, (x, targets, lambdas))
  checks.check_chunk_size(chunk_size)
  checks.check_kkt_inputs(apply_fn, params, x, targets, lambdas)
  return _weighted_grad_and_logits(
    apply_fn, params, x, targets, lambdas, chunk_size
  )[0]


@full_precision
def stationarity_residual(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  lambdas: jax.typing.ArrayLike,
  *,
  chunk_size: int | None = None,
) -> Params:
  """Residual of the stationarity condition, ``theta + sum_i lambda_i g_i``.

  Zero exactly when ``theta = -sum_i lambda_i grad_theta L_i(theta)``.
  Inputs are checked as in `weighted_loss_grad` (``lambdas >= 0`` where
  concrete).

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
    params: the trained parameter pytree theta*.
    x: ``[N, ...]`` floating candidates (normalised images).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    lambdas: ``float[N]`` multipliers, ``>= 0``.
    chunk_size: samples per backward pass; None for a single pass.

  Returns:
    A pytree like ``params``.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 5 and Eq. 6
    (stationarity).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x, targets = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> r = kkt.stationarity_residual(
    ...     apply_fn, params, x, targets, jnp.ones(4))
    >>> print(r["w"])
    [[1. 1.]
     [1. 1.]
     [1. 1.]]
  """
  g = weighted_loss_grad(
    apply_fn, params, x, targets, lambdas, chunk_size=chunk_size
  )
  return _tree_add(params, g)


# ----------------------------------------------------------------------------
# Distances D(theta*, -g) between the weights and the reconstruction.


def num_scalars(tree: PyTree) -> int:
  """P, the number of scalars in a pytree (``l1_mean`` averages over it)."""
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _l1_mean(params: Params, g: Params) -> jax.Array:
  # Mean over all P scalars of the flattened vector, not a mean of per-leaf
  # means (the two differ as soon as leaves differ in size).
  sums = jax.tree.map(lambda p, q: jnp.sum(jnp.abs(p + q)), params, g)
  return sum(jax.tree.leaves(sums)) / num_scalars(params)


def _l2_sq(params: Params, g: Params) -> jax.Array:
  sums = jax.tree.map(lambda p, q: jnp.sum(jnp.square(p + q)), params, g)
  return sum(jax.tree.leaves(sums))


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jax.tree.leaves(jax.tree.map(jnp.vdot, a, b)))


def _cosine(params: Params, g: Params) -> jax.Array:
  # 1 - cos(theta*, -g): scale-free, 0 when -g is parallel to theta*. The
  # floor keeps the value and the gradient finite at g = 0.
  tiny = jnp.finfo(jnp.result_type(*jax.tree.leaves(params))).tiny
  norms = jnp.sqrt(jnp.maximum(_vdot(params, params) * _vdot(g, g), tiny))
  return 1.0 + _vdot(params, g) / norms


_DISTANCE_FNS: dict[str, Callable[[Params, Params], jax.Array]] = {
  "l1_mean": _l1_mean,
  "l2_sq": _l2_sq,
  "cosine": _cosine,
}


def distance_fn(distance: Distance) -> Callable[[Params, Params], jax.Array]:
  """The stationarity distance ``(theta*, g) -> D(theta*, -g)`` by name.

  ``g`` is the reconstruction ``sum_i lambda_i grad_theta L_i`` (a pytree
  like ``theta*``); see `stationarity_loss` for the formulas.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> theta = {"w": jnp.array([1.0, -2.0])}
    >>> print(kkt.distance_fn("l2_sq")(theta, {"w": jnp.array([0.0, 1.0])}))
    2.0
  """
  checks.check_choice("distance", distance, DISTANCES)
  return _DISTANCE_FNS[distance]


# ----------------------------------------------------------------------------
# The stationarity loss and its fast derivative (custom VJP).


class _Static(NamedTuple):
  """Non-differentiable configuration of the custom-VJP DeepKKT loss.

  ``apply_fn`` is ``(params, x, consts) -> logits``: the model with every
  value it closes over that may carry a derivative hoisted into ``consts``
  (`_hoist_closure`), so that the custom VJP sees them as inputs.
  ``gated`` configures the primal term; None leaves it out (the
  stationarity loss alone).
  """

  apply_fn: Callable[[Params, jax.Array, list[jax.Array]], jax.Array]
  treedef: Any
  distance: str
  chunk_size: int | None
  gated: bool | None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Perturbed:
  """Which inputs are being differentiated (a leafless residual)."""

  params: tuple[bool, ...]
  consts: tuple[bool, ...]
  x: bool
  targets: bool
  lambdas: bool
  betas: bool


def _flagged(flags: tuple[bool, ...]) -> list[int]:
  return [i for i, f in enumerate(flags) if f]


def _primal_term(static, logits, targets, active):
  if static.gated is None:
    return jnp.zeros((), logits.dtype)
  return _primal_loss(logits, targets, gated=static.gated, active=active)


def _static_weighted_grad(static, params, consts, x, targets, lambdas):
  """`_weighted_grad_and_logits` of the converted model, in chunks."""
  return _weighted_grad_and_logits(
    lambda p, xc: static.apply_fn(p, xc, consts),
    params,
    x,
    targets,
    lambdas,
    static.chunk_size,
  )


def _kkt_reverse(
  static: _Static,
  param_leaves: list[jax.Array],
  consts: list[jax.Array],
  x: jax.Array,
  targets: jax.Array,
  lambdas: jax.Array,
  active: jax.Array | None,
  betas: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """``(total, (stationarity, primal, logits))``; autodiff through it is
  reverse-over-reverse. ``total = betas[0] * stationarity + betas[1] *
  primal``; ``lambdas`` are the effective (masked) multipliers."""
  params = jax.tree.unflatten(static.treedef, param_leaves)
  g, logits = _static_weighted_grad(static, params, consts, x, targets, lambdas)
  stationarity = _DISTANCE_FNS[static.distance](params, g)
  primal = _primal_term(static, logits, targets, active)
  total = betas[0] * stationarity + betas[1] * primal
  return total, (stationarity, primal, logits)


_kkt_fast = jax.custom_vjp(_kkt_reverse, nondiff_argnums=(0,))


def _gradient_map(static, perturbed, consts, x, targets, lambdas, with_theta):
  """``K(theta_leaves, c)`` for the forward-over-reverse derivative.

  ``K`` returns ``(grad_theta, grads, (per_sample, logits))``: the gradients
  of ``sum_i lambda_i L_i + <c, logits>`` with respect to theta (None
  unless ``with_theta``) and to the perturbed constants, x and targets, in
  that order (``grads``, a list), with the per-sample losses and logits.
  ``c`` None leaves its term out.
  """
  const_idx = _flagged(perturbed.consts)
  diff = [consts[i] for i in const_idx]
  diff += [x] if perturbed.x else []
  diff += [targets] if perturbed.targets else []

  def f(theta_leaves, diff_values, c):
    cs = list(consts)
    for i, value in zip(const_idx, diff_values[: len(const_idx)], strict=True):
      cs[i] = value
    rest = iter(diff_values[len(const_idx) :])
    xx = next(rest) if perturbed.x else x
    tt = next(rest) if perturbed.targets else targets
    params = jax.tree.unflatten(static.treedef, theta_leaves)
    logits = static.apply_fn(params, xx, cs)
    per_sample = cross_entropy(logits, tt)
    value = jnp.sum(lambdas * per_sample)
    if c is not None:
      value = value + jnp.sum(c * logits)
    return value, (per_sample, logits)

  def K(theta_leaves, c):
    if with_theta:
      (g_theta, grads), aux = jax.grad(f, (0, 1), has_aux=True)(
        theta_leaves, diff, c
      )
    elif diff:
      g_theta = None
      grads, aux = jax.grad(f, 1, has_aux=True)(theta_leaves, diff, c)
    else:  # Only lambdas: a forward pass (its jvp), no reverse pass.
      g_theta, grads = None, []
      aux = f(theta_leaves, diff, c)[1]
    return g_theta, grads, aux

  return K


def _kkt_fast_fwd(
  static, param_leaves, consts, x, targets, lambdas, active, betas
):
  perturbed = _Perturbed(
    params=tuple(leaf.perturbed for leaf in param_leaves),
    consts=tuple(c.perturbed for c in consts),
    x=x.perturbed,
    targets=targets.perturbed,
    lambdas=lambdas.perturbed,
    betas=betas.perturbed,
  )
  param_leaves = [leaf.value for leaf in param_leaves]
  consts = [c.value for c in consts]
  x, targets, lambdas = x.value, targets.value, lambdas.value
  active = None if active is None else active.value
  betas = betas.value
  params = jax.tree.unflatten(static.treedef, param_leaves)
  with_c = static.gated is not None
  plan = _chunk_plan(x.shape[0], static.chunk_size)
  if plan is None:
    # One linearisation of K serves both passes: its primal gives g (and
    # the logits), its tangent along (u, dprimal/dlogits), chosen from that
    # primal, gives every cotangent; the forward and the weighted backward
    # pass run once.
    K = _gradient_map(
      static, perturbed, consts, x, targets, lambdas, with_theta=True
    )
    if with_c:
      logits_shape = jax.eval_shape(static.apply_fn, params, x, consts)
      c0 = jnp.zeros(logits_shape.shape, logits_shape.dtype)
      (g_leaves, _, (_, logits)), lin = jax.linearize(K, param_leaves, c0)
    else:
      (g_leaves, _, (_, logits)), lin = jax.linearize(
        lambda th: K(th, None), param_leaves
      )
    g = jax.tree.unflatten(static.treedef, g_leaves)
  else:
    g, logits = _static_weighted_grad(
      static, params, consts, x, targets, lambdas
    )
  stationarity, distance_vjp = jax.vjp(
    _DISTANCE_FNS[static.distance], params, g
  )
  # u_theta = dD/dtheta* (direct), u = dD/dg: the stationarity term's
  # direction; its gradient is <u, d g> along the perturbation.
  u_theta, u = distance_vjp(jnp.ones_like(stationarity))
  dir_theta = [betas[0] * a for a in jax.tree.leaves(u)]
  primal, primal_vjp = jax.vjp(
    lambda z, t: _primal_term(static, z, t, active), logits, targets
  )
  dir_c, d_primal_targets = primal_vjp(jnp.ones_like(primal))
  dir_c = betas[1] * dir_c
  total = betas[0] * stationarity + betas[1] * primal

  # The gradient of the total along a perturbation of the inputs (at fixed
  # lambda) is the tangent of K's gradients along theta-direction
  # beta_stat * u and logits-direction beta_primal * dprimal/dlogits
  # (forward-over-reverse: d/de grad F(theta + e u) = grad <u, grad_theta
  # F>); the lambda-gradient is the tangent of the per-sample losses,
  # beta_stat * <u, grad_theta L_i>.
  with_theta = any(perturbed.params)
  if plan is None:
    tangents = lin(dir_theta, dir_c) if with_c else lin(dir_theta)
    t_theta, t_grads, (t_per_sample, _) = tangents
  else:
    xs = (
      _to_chunks(x, plan, zero=False),
      _to_chunks(targets, plan, zero=False),
      _to_chunks(lambdas, plan, zero=True),
      _to_chunks(dir_c, plan, zero=True) if with_c else None,
    )
    num_shared = sum(perturbed.consts)

    def body(acc, xs_c):
      xc, tc, lc, cc = xs_c
      K = _gradient_map(static, perturbed, consts, xc, tc, lc, with_theta)
      c0 = None if cc is None else jnp.zeros_like(cc)
      _, (t_theta, t_grads, (t_ps, _)) = jax.jvp(
        K, (param_leaves, c0), (dir_theta, cc)
      )
      shared = ([] if t_theta is None else t_theta) + t_grads[:num_shared]
      acc = [a + s for a, s in zip(acc, shared, strict=True)]
      return acc, (t_grads[num_shared:], t_ps)

    init = [jnp.zeros_like(a) for a in param_leaves] if with_theta else []
    init += [jnp.zeros_like(consts[i]) for i in _flagged(perturbed.consts)]
    acc, (data, t_per_sample) = jax.lax.scan(body, init, xs)
    t_theta = acc[: len(param_leaves)] if with_theta else None
    t_grads = acc[len(t_theta or []) :] + [_from_chunks(d, plan) for d in data]
    t_per_sample = _from_chunks(t_per_sample, plan)

  # The cotangents of a unit cotangent on the total: the backward rule
  # only scales them.
  t_grads = iter(t_grads)
  unit_params = [None] * len(param_leaves)
  for i, direct in enumerate(jax.tree.leaves(u_theta)):
    if perturbed.params[i]:
      unit_params[i] = t_theta[i] + betas[0] * direct
  unit_consts = [next(t_grads) if p else None for p in perturbed.consts]
  unit_x = next(t_grads) if perturbed.x else None
  unit_targets = None
  if perturbed.targets:
    unit_targets = next(t_grads) + betas[1] * d_primal_targets
  unit_lambdas = (
    t_per_sample.astype(lambdas.dtype) if perturbed.lambdas else None
  )
  unit_betas = jnp.stack([stationarity, primal]) if perturbed.betas else None
  units = (unit_params, unit_consts, unit_x, unit_targets, unit_lambdas)
  aux = (stationarity, primal, logits)
  return (total, aux), (*units, unit_betas)


def _kkt_fast_bwd(static, units, cotangents):
  # The aux outputs reach callers through stop_gradient (`_kkt_terms`):
  # their cotangents are zero.
  ct_total, _ = cotangents
  if isinstance(ct_total, SymbolicZero):
    ct_total = jnp.zeros(ct_total.shape, ct_total.dtype)
  unit_params, unit_consts, unit_x, unit_targets, unit_lambdas, unit_betas = (
    units
  )
  scale = lambda a: None if a is None else ct_total * a
  return (
    [scale(a) for a in unit_params],
    [scale(a) for a in unit_consts],
    scale(unit_x),
    scale(unit_targets),
    scale(unit_lambdas),
    None,
    scale(unit_betas),
  )


# The forward rule, which does all the work, is traced inside the public
# functions' `full_precision`; the backward rule only scales.
_kkt_fast.defvjp(_kkt_fast_fwd, _kkt_fast_bwd, symbolic_zeros=True)


def _kkt_terms(
  apply_fn,
  params,
  x,
  targets,
  lambdas,
  active,
  betas,
  *,
  gated,
  distance,
  method,
  chunk_size,
):
  """``(total, (stationarity, primal, logits))``, the aux without gradient.

  ``lambdas`` are the effective multipliers (zero where not ``active``);
  ``betas = (beta_stationarity, beta_primal)``; ``gated`` None: no primal
  term.
  """
  dtype = jnp.result_type(lambdas, *jax.tree.leaves(params))
  betas = jnp.stack([jnp.asarray(b, dtype) for b in betas])
  # Parameters enter as a flat list of leaves: the custom VJP's symbolic-zero
  # protocol would otherwise have to unflatten arbitrary custom pytree nodes
  # (e.g. nnx.State) around its CustomVJPPrimal records.
  leaves, treedef = jax.tree.flatten(params)
  if method == "reverse":
    static = _Static(
      lambda p, xc, _: apply_fn(p, xc), treedef, distance, chunk_size, gated
    )
    total, aux = _kkt_reverse(
      static, leaves, [], x, targets, lambdas, active, betas
    )
    return total, jax.lax.stop_gradient(aux)
  # A custom VJP must not close over values that are being differentiated
  # (an outer jax.grad over something apply_fn closes over: bilevel and
  # meta-learning uses): hoist them into explicit inputs. The converted
  # function is traced for the shape it is called with, one chunk.
  plan = _chunk_plan(x.shape[0], chunk_size)
  rows = x.shape[0] if plan is None else plan.chunk
  example_x = jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype)
  converted, consts = _hoist_closure(apply_fn, params, example_x)
  static = _Static(converted, treedef, distance, chunk_size, gated)
  total, aux = _kkt_fast(
    static, leaves, consts, x, targets, lambdas, active, betas
  )
  return total, jax.lax.stop_gradient(aux)


def _hoist_closure(
  apply_fn: ApplyFn, params: Params, example_x: jax.ShapeDtypeStruct
) -> tuple[Callable[[Params, jax.Array, list], jax.Array], list[jax.Array]]:
  """``apply_fn`` with the tracers it closes over as explicit inputs.

  Returns ``(converted, consts)`` with ``converted(params, x, consts) ==
  apply_fn(params, x)`` for ``x`` of the shape and dtype of ``example_x``;
  ``consts`` are the tracers of enclosing transformations that
  ``apply_fn`` closes over (concrete arrays stay closed over). What
  ``jax.closure_convert`` does, without its cache: that cache holds every
  converted function, and with it every array its closure captured, alive
  (measured: an eager loop of 5 steps kept all 5 of its 4 MB closed-over
  arrays).
  """
  closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(
    params, example_x
  )
  num_args = len(jax.tree.leaves((params, example_x)))
  if len(closed.jaxpr.invars) != num_args:
    raise NotImplementedError(
      "this JAX version traces closures differently: use method='reverse'."
    )
  is_tracer = [isinstance(c, jax.core.Tracer) for c in closed.consts]
  kept = [
    None if t else c for c, t in zip(closed.consts, is_tracer, strict=True)
  ]
  hoisted = [c for c, t in zip(closed.consts, is_tracer, strict=True) if t]
  out_tree = jax.tree.structure(out_shape)

  def converted(p, xx, consts):
    given = iter(consts)
    all_consts = [
      next(given) if t else c for c, t in zip(kept, is_tracer, strict=True)
    ]
    flat = jax.tree.leaves((p, xx))
    out = jax.core.eval_jaxpr(closed.jaxpr, all_consts, *flat)
    return jax.tree.unflatten(out_tree, out)

  return converted, hoisted


@full_precision
def stationarity_loss(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  lambdas: jax.typing.ArrayLike,
  *,
  distance: Distance = DEFAULT_DISTANCE,
  method: Method = "fast",
  chunk_size: int | None = None,
) -> jax.Array:
  """Stationarity loss ``D(theta*, -sum_i lambda_i grad_theta L_i)``.

  Distances, with ``g = sum_i lambda_i grad_theta L_i`` and ``r = theta* + g``
  flattened to P scalars:

  * ``"l1_mean"`` (the paper's): ``mean_p |r_p|`` over all P scalars;
  * ``"l2_sq"`` (Algorithm 1): ``sum_p r_p^2``;
  * ``"cosine"``: ``1 - cos(theta*, -g)``, in [0, 2].

  A negative multiplier breaks dual feasibility: concrete ``lambdas`` with
  a negative entry raise a ``ValueError``, traced ones are not checked (see
  `weighted_loss_grad`).

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
    params: the trained parameter pytree theta*.
    x: ``[N, ...]`` floating candidates (normalised images).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    lambdas: ``float[N]`` multipliers, ``>= 0``.
    distance: one of ``DISTANCES``.
    method: ``"fast"`` (custom VJP, forward-over-reverse; reverse mode only:
      ``jax.jvp`` raises a ``TypeError``) or ``"reverse"`` (plain
      reverse-over-reverse autodiff; any mode). Values and gradients agree,
      with respect to every argument and to what ``apply_fn`` closes over.
    chunk_size: samples per pass; None for a single pass.

  Returns:
    A scalar.

  Raises:
    ValueError: integer ``x``, concrete negative ``lambdas``, an unknown
      ``distance`` or ``method``, or shapes that do not fit.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 8; Algorithm 1
    (squared L2).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x, targets = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> lambdas = jnp.ones(4)
    >>> print(kkt.stationarity_loss(apply_fn, params, x, targets, lambdas))
    1.0
    >>> gx, gl = jax.grad(kkt.stationarity_loss, argnums=(2, 4))(
    ...     apply_fn, params, x, targets, lambdas)
    >>> gx.shape, gl.shape
    ((4, 3), (4,))
  """
  x, targets, lambdas = map(jnp.asarray, (x, targets, lambdas))
  checks.check_choice("distance", distance, DISTANCES)
  checks.check_choice("method", method, METHODS)
  checks.check_chunk_size(chunk_size)
  checks.check_kkt_inputs(apply_fn, params, x, targets, lambdas)
  return _kkt_terms(
    apply_fn,
    params,
    x,
    targets,
    lambdas,
    None,
    (1.0, 0.0),
    gated=None,
    distance=distance,
    method=method,
    chunk_size=chunk_size,
  )[0]


# ----------------------------------------------------------------------------
# Primal feasibility and the total DeepKKT loss.


def _target_labels(targets: jax.Array) -> jax.Array:
  return targets if targets.ndim == 1 else jnp.argmax(targets, axis=-1)


def _primal_loss(logits, targets, *, gated, active):
  losses = cross_entropy(logits, targets)
  if gated:
    correct = jnp.argmax(logits, axis=-1) == _target_labels(targets)
    losses = jnp.where(correct, 0.0, losses)
  if active is None:
    return jnp.mean(losses)
  count = jnp.maximum(jnp.sum(active), 1)
  return jnp.sum(jnp.where(active, losses, 0.0)) / count


def primal_loss(
  logits: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  *,
  gated: bool = True,
  active: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Primal-feasibility loss: gated cross-entropy.

  ``L_primal = (1/n) sum_i L_i`` with ``L_i = 0`` when candidate i is already
  classified as its target (argmax of the logits equals the label, or the
  argmax of a soft target) and the cross-entropy otherwise; n is the number
  of (active) candidates. ``gated=False`` gives the plain mean cross-entropy.

  Args:
    logits: ``[N, C]`` model outputs for the candidates.
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    gated: whether correctly classified candidates contribute zero.
    active: optional ``bool[N]`` dual-feasibility mask; inactive candidates
      contribute nothing and are not counted in n.

  Returns:
    A scalar.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 7.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> logits = jnp.array([[2.0, 0.0], [2.0, 0.0]])
    >>> targets = jnp.array([0, 1])  # the first is already correct
    >>> print(f"{kkt.primal_loss(logits, targets):.4f}")
    1.0635
    >>> print(f"{kkt.primal_loss(logits, targets, gated=False):.4f}")
    1.1269
  """
  logits, targets = jnp.asarray(logits), jnp.asarray(targets)
  checks.check_targets_shape(targets, None)
  num_classes = checks.check_logits_vs_targets(logits.shape, targets, "logits")
  checks.check_target_values(targets, num_classes)
  if active is not None:
    active = jnp.asarray(active)
    checks.check_active(active, targets.shape[0])
  return _primal_loss(logits, targets, gated=gated, active=active)


@full_precision
def deepkkt_loss(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  lambdas: jax.typing.ArrayLike,
  *,
  active: jax.typing.ArrayLike | None = None,
  beta_stationarity: float = 1.0,
  beta_primal: float = 1.0,
  gated: bool = True,
  distance: Distance = DEFAULT_DISTANCE,
  method: Method = "fast",
  chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DeepKKT loss ``L_kkt = beta_stat * L_stat + beta_primal * L_primal``.

  One forward pass of the candidates serves both terms. Inactive candidates
  (``active[i]`` False, e.g. lambda went negative) get a zero multiplier in
  the stationarity term and are left out of the primal average; their
  gradients are zero. ``jax.grad`` with respect to ``x`` and ``lambdas``
  (or anything else, closed-over values of ``apply_fn`` included) takes the
  fast custom-VJP path when ``method="fast"``; forward mode needs
  ``method="reverse"``.

  Multipliers of active candidates must be non-negative (dual
  feasibility). A negative one is defined -- it flips that candidate's
  gradient in the stationarity sum -- but it is not a KKT multiplier, so
  concrete ``lambdas`` with a negative entry on an active row raise a
  ``ValueError``; an inactive row's lambda is not checked (it takes no
  part). Traced ``lambdas`` or ``active`` (inside ``jit``, ``grad`` or
  ``vmap``) are not checked: their values are unknown when the check
  runs. Synthesis keeps them feasible by softplus or by the mask
  (`dsv_jax.synthesize`).

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
    params: the trained parameter pytree theta* (frozen).
    x: ``[N, ...]`` floating candidates (normalised images).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    lambdas: ``float[N]`` multipliers, ``>= 0`` on the active rows.
    active: optional ``bool[N]`` dual-feasibility mask (all True if None).
    beta_stationarity: ``beta_stat``, the weight of the stationarity term
      (1 in the paper); it scales the term's value and its gradients with
      respect to ``x`` and ``lambdas``.
    beta_primal: weight of the primal term (beta1 in Eq. 9; the paper's
      Appendix D uses 2e-3 for CIFAR-10 and 2e-5 for ImageNet).
    gated: gate the primal cross-entropy (Eq. 7); False: plain mean CE.
    distance: stationarity distance, one of ``DISTANCES``.
    method: ``"fast"`` or ``"reverse"``, see ``stationarity_loss``.
    chunk_size: samples per pass; None for a single pass.

  Returns:
    ``(total, aux)``: the scalar loss and a dict of non-differentiable
    diagnostics: ``total``, ``stationarity``, ``primal`` (scalars),
    ``loss`` (per-sample CE), ``entropy`` (predictive entropy), ``margin``
    (target logit minus the largest other logit), ``correct`` (bool), all
    ``[N]``, and ``num_active`` (int32 scalar).

  Raises:
    ValueError: integer ``x``, concrete negative ``lambdas`` on active rows,
      an unknown ``distance`` or ``method``, or shapes that do not fit.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 6-9, Algorithm 1.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x, targets = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> lambdas = jnp.ones(4)
    >>> total, aux = kkt.deepkkt_loss(apply_fn, params, x, targets, lambdas)
    >>> # Stationarity 1.0 (g = 0) + primal: two of four candidates are wrong.
    >>> print(f"{total:.4f} {aux['primal']:.4f}", int(aux["num_active"]))
    1.3466 0.3466 4
    >>> grad_fn = jax.grad(kkt.deepkkt_loss, argnums=(2, 4), has_aux=True)
    >>> (gx, gl), aux = grad_fn(apply_fn, params, x, targets, lambdas)
    >>> gx.shape, gl.shape
    ((4, 3), (4,))
  """
  x, targets, lambdas = map(jnp.asarray, (x, targets, lambdas))
  active = None if active is None else jnp.asarray(active)
  checks.check_choice("distance", distance, DISTANCES)
  checks.check_choice("method", method, METHODS)
  checks.check_chunk_size(chunk_size)
  checks.check_kkt_inputs(apply_fn, params, x, targets, lambdas, active)
  effective = lambdas if active is None else jnp.where(active, lambdas, 0.0)
  total, (stationarity, primal, logits) = _kkt_terms(
    apply_fn,
    params,
    x,
    targets,
    effective,
    active,
    (beta_stationarity, beta_primal),
    gated=gated,
    distance=distance,
    method=method,
    chunk_size=chunk_size,
  )
  labels = _target_labels(targets)
  log_probs = jax.nn.log_softmax(logits)
  target_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1]), -jnp.inf, logits)
  aux = {
    "total": jax.lax.stop_gradient(total),
    "stationarity": stationarity,
    "primal": primal,
    "loss": cross_entropy(logits, jax.lax.stop_gradient(targets)),
    "entropy": -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1),
    "margin": target_logit - jnp.max(others, axis=-1),
    "correct": jnp.argmax(logits, axis=-1) == labels,
    "num_active": (
      jnp.asarray(x.shape[0], jnp.int32)
      if active is None
      else jnp.sum(active, dtype=jnp.int32)
    ),
  }
  return total, aux


DeepKKTLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def make_deepkkt_loss(
  apply_fn: ApplyFn,
  *,
  beta_stationarity: float = 1.0,
  beta_primal: float = 1.0,
  gated: bool = True,
  distance: Distance = DEFAULT_DISTANCE,
  method: Method = "fast",
  chunk_size: int | None = None,
) -> DeepKKTLoss:
  """`deepkkt_loss` with the model and its configuration bound (optax-style).

  Returns ``loss(params, x, targets, lambdas, active=None) -> (total,
  aux)``, equal to ``deepkkt_loss(apply_fn, params, x, targets, lambdas,
  active=active, **config)``. Every argument of ``loss`` is an array or a
  pytree of arrays (``active`` may be None), so ``jax.jit(loss)`` needs no
  static arguments and ``jax.grad(loss, argnums=(1, 3), has_aux=True)``
  differentiates with respect to ``x`` and ``lambdas``. The configuration
  is checked here, once; the arrays on every call, as by `deepkkt_loss`.

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
    beta_stationarity, beta_primal, gated, distance, method, chunk_size:
      as in `deepkkt_loss`.

  Returns:
    The loss function.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x, targets = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> loss = kkt.make_deepkkt_loss(apply_fn, beta_primal=0.5)
    >>> total, aux = jax.jit(loss)(params, x, targets, jnp.ones(4))
    >>> print(f"{total:.4f}")
    1.1733
    >>> grad_fn = jax.jit(jax.grad(loss, argnums=(1, 3), has_aux=True))
    >>> (gx, gl), aux = grad_fn(params, x, targets, jnp.ones(4))
    >>> gx.shape, gl.shape
    ((4, 3), (4,))
  """
  checks.check_choice("distance", distance, DISTANCES)
  checks.check_choice("method", method, METHODS)
  checks.check_chunk_size(chunk_size)
  config = {
    "beta_stationarity": beta_stationarity,
    "beta_primal": beta_primal,
    "gated": gated,
    "distance": distance,
    "method": method,
    "chunk_size": chunk_size,
  }

  def loss(
    params: Params,
    x: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    lambdas: jax.typing.ArrayLike,
    active: jax.typing.ArrayLike | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    return deepkkt_loss(
      apply_fn, params, x, targets, lambdas, active=active, **config
    )

  return loss


# ----------------------------------------------------------------------------
# Per-sample gradients: explicit (reference) and matrix-free products.


@full_precision
def per_sample_grads(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
) -> Params:
  """Explicit per-sample gradients ``grad_theta L_i`` (vmap of grad).

  The obvious reference for the fast paths and a diagnostic for small
  models: memory is O(N * P). Prefer ``weighted_loss_grad`` (``G @ lambda``)
  and ``per_sample_grad_dots`` (``G^T @ v``) on real models.

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
    params: the parameter pytree theta.
    x: ``[N, ...]`` floating samples (normalised images).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.

  Returns:
    A pytree like ``params`` with a leading ``N`` axis on every leaf.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 5 (the columns
    ``grad_theta L_i`` of the stationarity condition).

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x, targets = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> kkt.per_sample_grads(apply_fn, params, x, targets)["w"].shape
    (4, 3, 2)
  """
  x, targets = jnp.asarray(x), jnp.asarray(targets)
  checks.check_kkt_inputs(apply_fn, params, x, targets)

  def one(xi, ti):
    return jax.grad(
      lambda p: cross_entropy(apply_fn(p, xi[None]), ti[None])[0]
    )(params)

  return jax.vmap(one)(x, targets)


@full_precision
def per_sample_grad_dots(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  direction: Params,
  *,
  chunk_size: int | None = None,
) -> jax.Array:
  """All inner products ``<grad_theta L_i, direction>`` (``G^T @ v``).

  One forward-mode jvp of the per-sample loss vector in parameter direction
  ``direction``; per-sample gradients are never formed. With ``chunk_size``
  the samples stream through ``lax.map``, so memory is O(P + chunk). With
  ``weighted_loss_grad`` (``G @ lambda``) this gives matrix-free products
  with the P x N per-sample-gradient matrix G.

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``.
    params: the parameter pytree theta.
    x: ``[N, ...]`` floating samples (normalised images).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    direction: a pytree like ``params``.
    chunk_size: samples per pass; None for a single pass.

  Returns:
    ``float[N]``.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 5 (``G^T r`` is the
    lambda-gradient of ``<r, sum_i lambda_i grad_theta L_i>``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from dsv_jax import kkt
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.ones((3, 2))}
    >>> x, targets = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> v = {"w": jnp.array([[1.0, 0.0]] * 3)}
    >>> print(kkt.per_sample_grad_dots(apply_fn, params, x, targets, v))
    [-1.5  1.5 -1.5  1.5]
  """
  x, targets = jnp.asarray(x), jnp.asarray(targets)
  checks.check_chunk_size(chunk_size)
  checks.check_kkt_inputs(apply_fn, params, x, targets)
  if jax.tree.structure(direction) != jax.tree.structure(params):
    raise ValueError("direction must be a pytree with the structure of params.")

  def dots(xc, tc):
    per_sample_loss = lambda p: cross_entropy(apply_fn(p, xc), tc)
    return jax.jvp(per_sample_loss, (params,), (direction,))[1]

  plan = _chunk_plan(x.shape[0], chunk_size)
  if plan is None:
    return dots(x, targets)
  xs = (_to_chunks(x, plan, zero=False), _to_chunks(targets, plan, zero=False))
  return _from_chunks(jax.lax.map(lambda a: dots(*a), xs), plan)


__all__ = [
  "DEFAULT_DISTANCE",
  "DISTANCES",
  "MATMUL_PRECISION",
  "METHODS",
  "Distance",
  "Method",
  "cross_entropy",
  "DeepKKTLoss",
  "deepkkt_loss",
  "distance_fn",
  "full_precision",
  "make_deepkkt_loss",
  "num_scalars",
  "per_sample_grad_dots",
  "per_sample_grads",
  "primal_loss",
  "stationarity_loss",
  "stationarity_residual",
  "weighted_loss_grad",
]
