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

import functools
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from dsv_jax import _kkt_chunks, _kkt_engine, checks
from dsv_jax.logits import logit_stats
from dsv_jax.types import ApplyFn, Params

Distance = Literal["l1_mean", "l2_sq", "cosine"]
Method = Literal["fast", "reverse"]
DISTANCES: tuple[Distance, ...] = get_args(Distance)
# The default stationarity distance of every DeepKKT objective here and of
# synthesis (`dsv_jax.synthesize`, the packaged configs): cosine is
# scale-free, so its balance against the primal cross-entropy does not
# depend on the model. Measured: docs/method.md, choices table. Selection
# uses l2_sq (`dsv_jax.select.DEFAULT_DISTANCE`): its complementary-
# slackness term needs a distance that is not scale-free.
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
  return _kkt_engine.cross_entropy(logits, targets)
  # The operations of optax's softmax_cross_entropy(_with_integer_labels),


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
  return _kkt_engine.weighted_grad_and_logits(
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
  return _kkt_engine.tree_add(params, g)


# ----------------------------------------------------------------------------
# Distances D(theta*, -g) between the weights and the reconstruction.


num_scalars = _kkt_engine.num_scalars


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
  return _kkt_engine.DISTANCE_FNS[distance]


# ----------------------------------------------------------------------------
# The stationarity loss (its fast derivative: `dsv_jax._kkt_engine`).


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
  return _kkt_engine.kkt_terms(
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
  return _kkt_engine.gated_primal_loss(
    logits, targets, gated=gated, active=active
  )


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
  total, (stationarity, primal, logits) = _kkt_engine.kkt_terms(
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
  labels = _kkt_engine.target_labels(targets)
  stats = logit_stats(logits, labels)
  aux = {
    "total": jax.lax.stop_gradient(total),
    "stationarity": stationarity,
    "primal": primal,
    "loss": cross_entropy(logits, jax.lax.stop_gradient(targets)),
    "entropy": stats.entropy,
    "margin": stats.margin,
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

  plan = _kkt_chunks.chunk_plan(x.shape[0], chunk_size)
  if plan is None:
    return dots(x, targets)
  xs = (
    _kkt_chunks.to_chunks(x, plan, zero=False),
    _kkt_chunks.to_chunks(targets, plan, zero=False),
  )
  return _kkt_chunks.from_chunks(jax.lax.map(lambda a: dots(*a), xs), plan)


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
