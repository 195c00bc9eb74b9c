"""The candidate optimiser: images and multipliers fitted by gradient descent.

DSV synthesis (`dsv_jax.synthesize.make_synthesizer`) and the
reconstruction baseline (`dsv_jax.baseline.make_reconstructor`) are both
configurations of `make_candidate_optimizer`: candidates ``x`` (one fixed
target each) and multipliers ``lambda`` descend an objective, each with
its own optimiser, ``x`` clipped to the valid pixel range after every
step. They differ in the objective and in how ``lambda`` is parametrised
(`LambdaParam`). The functions are pure over a `SynthState` pytree (jit,
shard and checkpoint it as-is); the classifier's parameters are an
argument of every function, never closed over.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dsv_jax.candidate_init import check_candidates
from dsv_jax.types import ApplyFn

# ``(params, x, lambdas, active, targets, key) -> (total, aux)``: the
# objective at lambda itself (not its parametrisation), at step key ``key``.
Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class SynthState(NamedTuple):
  """Everything a synthesis run needs to continue (a checkpointable pytree).

  Attributes:
    step: int32 scalar, optimiser steps taken.
    x: ``[N, H, W, C]`` candidates in the dataset's normalised space.
    lambda_param: ``[N]`` free lambda variable (lambda itself for
      ``dual="mask"``, s with lambda = softplus(s) for ``"softplus"``).
    active: ``bool[N]`` dual-feasibility mask.
    opt_x: optimiser state of x.
    opt_lambda: optimiser state of lambda_param.
  """

  step: jax.Array
  x: jax.Array
  lambda_param: jax.Array
  active: jax.Array
  opt_x: optax.OptState
  opt_lambda: optax.OptState


class Synthesizer(NamedTuple):
  """Pure functions of a synthesis run (see `make_candidate_optimizer`).

  Attributes:
    init_fn: ``(key, params, x0[N, H, W, C], targets, active=None) ->
      SynthState``; draws the initial lambdas from ``key`` and checks the
      inputs against the model (``x0`` floating, normalised). ``active``
      (``bool[N]``, default all True) marks rows that take part (e.g.
      False on padding rows added for sharding). The state holds copies of
      ``x0`` and ``active``, so donating it leaves the caller's arrays
      alone.
    step_fn: ``(state, params, targets, key) -> (state, metrics)``; one
      optimiser step. Metrics are scalars computed at the state before the
      update, except ``num_active`` and ``survival`` (after it).
    lambdas_fn: ``state -> float[N]`` multipliers lambda.
    loss_fn: ``(params, x, lambda_param, active, targets, key) -> (total,
      aux)``, the objective at step key ``key`` (already folded with the
      step).
    step: ``step_fn`` jitted once, donating the state (see the module
      docstring).
  """

  init_fn: Callable[..., SynthState]
  step_fn: Callable[..., tuple[SynthState, dict[str, jax.Array]]]
  lambdas_fn: Callable[[SynthState], jax.Array]
  loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  step: Callable[..., tuple[SynthState, dict[str, jax.Array]]]


def synthesizer(init_fn, step_fn, lambdas_fn, loss_fn) -> Synthesizer:
  """A `Synthesizer` of these pure functions, with its jitted step."""
  step = jax.jit(step_fn, donate_argnums=(0,))
  return Synthesizer(init_fn, step_fn, lambdas_fn, loss_fn, step)


def initial_state(
  x: jax.Array,
  lambda_param: jax.Array,
  active: jax.Array | None,
  *,
  x_tx: optax.GradientTransformation,
  lambda_tx: optax.GradientTransformation,
) -> SynthState:
  """A step-0 `SynthState` (all candidates active unless ``active``).

  Every array is a fresh buffer: the state is meant to be donated to the
  jitted step, which must not delete the caller's ``x`` or ``active``.
  """
  n = x.shape[0]
  x, lambda_param = jnp.copy(x), jnp.copy(lambda_param)
  return SynthState(
    step=jnp.zeros((), jnp.int32),
    x=x,
    lambda_param=lambda_param,
    active=(
      jnp.ones((n,), jnp.bool_)
      if active is None
      else jnp.array(active, jnp.bool_, copy=True)
    ),
    opt_x=x_tx.init(x),
    opt_lambda=lambda_tx.init(lambda_param),
  )


def masked_mean(per_image: jax.Array, active: jax.Array | None) -> jax.Array:
  """Mean of ``per_image`` over the active rows (all with None)."""
  if active is None:
    return jnp.mean(per_image)
  count = jnp.maximum(jnp.sum(active), 1)
  return jnp.sum(jnp.where(active, per_image, 0.0)) / count


class LambdaParam(NamedTuple):
  """How the optimised variable holds lambda (dual feasibility).

  Attributes:
    to_lambda: variable -> lambda.
    from_lambda: lambda -> variable (for the initial lambdas).
    disqualify: a candidate whose variable falls below 0 leaves for good
      (its ``active`` flag goes False; the paper's mask).
  """

  to_lambda: Callable[[jax.Array], jax.Array]
  from_lambda: Callable[[jax.Array], jax.Array]
  disqualify: bool


def _identity(a: jax.Array) -> jax.Array:
  return a


def _inverse_softplus(lam: jax.Array) -> jax.Array:
  # Stable for large lambda: s = lam + log(-expm1(-lam)).
  return lam + jnp.log(-jnp.expm1(-lam))


# lambda itself, free (held >= 0 by a penalty, or not at all).
FREE = LambdaParam(_identity, _identity, disqualify=False)
# lambda itself; a candidate whose lambda falls below 0 is disqualified.
MASK = LambdaParam(_identity, _identity, disqualify=True)
# lambda = softplus(s): always positive, no candidate ever leaves.
SOFTPLUS = LambdaParam(jax.nn.softplus, _inverse_softplus, disqualify=False)


def check_lambda_init(lambda_init: tuple[float, float]) -> tuple[float, float]:
  """``(low, high)`` as floats; raises ValueError unless low <= high."""
  low, high = map(float, lambda_init)
  if not low <= high:
    raise ValueError(f"lambda_init must be (low, high), got {lambda_init}.")
  return low, high


def make_candidate_optimizer(
  apply_fn: ApplyFn,
  objective: Objective,
  *,
  lambda_param: LambdaParam,
  x_tx: optax.GradientTransformation | None = None,
  lambda_tx: optax.GradientTransformation | None = None,
  lambda_init: tuple[float, float] = (0.5, 1.0),
  pixel_min: jax.typing.ArrayLike | None = None,
  pixel_max: jax.typing.ArrayLike | None = None,
  freeze_inactive: bool = True,
) -> Synthesizer:
  """A `Synthesizer` descending ``objective`` over candidates and lambdas.

  Args:
    apply_fn: ``(params, x[B, H, W, C]) -> logits[B, C]``, eval mode (for
      the input checks of ``init_fn``).
    objective: ``(params, x, lambdas, active, targets, key) -> (total,
      aux)``; ``aux`` is reported as metrics (without gradient).
    lambda_param: how the variable holds lambda (`FREE`, `MASK`,
      `SOFTPLUS`).
    x_tx: optimiser of the images (default ``optax.adam(0.01)``).
    lambda_tx: optimiser of the lambda variable (default
      ``optax.adam(0.05)``).
    lambda_init: ``(low, high)``: initial lambdas are uniform in it.
    pixel_min, pixel_max: per-channel ``[C]`` (or scalar) bounds x is
      clipped to after every step; None: no clipping.
    freeze_inactive: zero the updates of inactive candidates (whose
      gradient is zero, but whose optimiser momentum is not). False: the
      optimisers' updates as they are (for an ``objective`` under which
      inactive rows never move; the baseline's step, kept as it was).

  Returns:
    A `Synthesizer`: ``init_fn`` checks the candidates and draws the
    lambdas from its key; ``step_fn`` folds the step into its key, takes
    one step of both optimisers (and freezes inactive candidates).
  """
  low, high = check_lambda_init(lambda_init)
  x_tx = optax.adam(0.01) if x_tx is None else x_tx
  lambda_tx = optax.adam(0.05) if lambda_tx is None else lambda_tx
  lo = None if pixel_min is None else jnp.asarray(pixel_min, jnp.float32)
  hi = None if pixel_max is None else jnp.asarray(pixel_max, jnp.float32)
  to_lambda = lambda_param.to_lambda

  def clip(x):
    if lo is None and hi is None:
      return x
    return jnp.clip(x, lo, hi)

  def init_fn(key, params, x0, targets, active=None) -> SynthState:
    check_candidates(apply_fn, params, x0, targets)
    lam = jax.random.uniform(key, (x0.shape[0],), jnp.float32, low, high)
    return initial_state(
      clip(jnp.asarray(x0, jnp.float32)),
      lambda_param.from_lambda(lam),
      active,
      x_tx=x_tx,
      lambda_tx=lambda_tx,
    )

  def loss_fn(params, x, variable, active, targets, key):
    return objective(params, x, to_lambda(variable), active, targets, key)

  def step_fn(state: SynthState, params, targets, key):
    targets = jnp.asarray(targets)
    step_key = jax.random.fold_in(key, state.step)
    grad_fn = jax.grad(loss_fn, argnums=(1, 2), has_aux=True)
    (gx, gl), aux = grad_fn(
      params, state.x, state.lambda_param, state.active, targets, step_key
    )
    ux, opt_x = x_tx.update(gx, state.opt_x, state.x)
    ul, opt_lambda = lambda_tx.update(gl, state.opt_lambda, state.lambda_param)
    act = state.active
    if freeze_inactive:
      # Disqualified candidates are frozen: the optimiser's momentum must
      # not keep moving them after their gradient became zero.
      ux = jnp.where(act.reshape(-1, *([1] * (ux.ndim - 1))), ux, 0.0)
      ul = jnp.where(act, ul, 0.0)
    x = clip(state.x + ux)
    variable = state.lambda_param + ul
    active = act
    if lambda_param.disqualify:
      active = act & (variable >= 0)
    lam = to_lambda(variable)
    new = SynthState(state.step + 1, x, variable, active, opt_x, opt_lambda)
    n_active = jnp.sum(active, dtype=jnp.int32)
    aux.update(
      num_active=n_active,
      survival=n_active / active.shape[0],
      lambda_mean=masked_mean(lam, active),
      lambda_min=jnp.min(jnp.where(active, lam, jnp.inf)),
    )
    return new, aux

  def lambdas_fn(state: SynthState) -> jax.Array:
    return to_lambda(state.lambda_param)

  return synthesizer(init_fn, step_fn, lambdas_fn, loss_fn)


__all__ = [
  "FREE",
  "MASK",
  "SOFTPLUS",
  "LambdaParam",
  "Objective",
  "SynthState",
  "Synthesizer",
  "check_lambda_init",
  "initial_state",
  "make_candidate_optimizer",
  "masked_mean",
  "synthesizer",
]
