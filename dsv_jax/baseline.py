"""The KKT reconstruction baseline of Haim et al. 2022 / Buzaglo et al. 2023.

Prior work reconstructs training samples from a trained network by fitting
samples ``x_i`` and multipliers ``lambda_i`` to the stationarity condition of
the max-margin problem the network implicitly solves:

  L = || theta* - sum_i lambda_i grad_theta m_i(x_i) ||^2 / ||theta*||^2
      + beta_lambda * mean_i max(0, lambda_min - lambda_i)

with the multiclass margin ``m_i = Phi_{y_i}(x_i) - max_{j != y_i}
Phi_j(x_i)`` (Buzaglo et al.; Haim et al.'s binary ``y_i Phi(x_i)`` is its
two-class case), the lambda_min hinge of Haim et al., and ``x`` clipped to
the valid pixel range after every Adam step. The division by ``||theta*||^2``
(OURS) makes the residual scale-free so that one ``beta_lambda`` suits any
model; the minimiser is unchanged. Compared with DeepKKT there is no
cross-entropy, no primal (classification) term, no augmentation and no image
prior: the baseline row shows what those add.

As for DeepKKT, ``sum_i lambda_i grad m_i = grad_theta sum_i lambda_i m_i``
is ONE backward pass, and its derivative in x and lambda is grad-of-grad.

`make_reconstructor` is a configuration of the candidate optimiser that
DSV synthesis uses (`dsv_jax.candidate_opt`): a `synthesize.Synthesizer`
over a `synthesize.SynthState`, so any synthesis loop drives it (the
report's run: `dsv_jax.experiment.report.kkt_baseline`).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from dsv_jax import synthesize
from dsv_jax.candidate_opt import FREE, Synthesizer, make_candidate_optimizer
from dsv_jax.logits import logit_stats
from dsv_jax.types import ApplyFn, Params


def margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``[N]`` margins ``Phi_y - max_{j != y} Phi_j`` of logits ``[N, C]``."""
  return logit_stats(logits, labels).margin


def _sq_norm(tree) -> jax.Array:
  return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree))


def reconstruction_loss(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.Array,
  labels: jax.Array,
  lambdas: jax.Array,
  *,
  active: jax.Array | None = None,
  lambda_min: float = 0.05,
  beta_lambda: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Haim/Buzaglo reconstruction loss; ``(total, aux)``.

  Args:
    apply_fn, params: the frozen classifier theta*.
    x: ``[N, H, W, C]`` candidates.
    labels: int ``[N]`` their classes.
    lambdas: ``[N]`` multipliers.
    active: optional ``bool[N]``; inactive rows (padding) take no part.
    lambda_min: the hinge's floor on lambda.
    beta_lambda: weight of the hinge.

  Returns:
    ``total`` and ``aux`` with ``stationarity`` (the relative squared
    residual), ``lambda_penalty`` and the margins ``[N]``.

  References:
    Haim et al., "Reconstructing Training Data from Trained Neural
    Networks", NeurIPS 2022, Eq. 5-6; Buzaglo et al., "Deconstructing Data
    Reconstruction", NeurIPS 2023 (multiclass margin).
  """
  weights = lambdas if active is None else jnp.where(active, lambdas, 0.0)

  def weighted_margin(p):
    m = margins(apply_fn(p, x), labels)
    return jnp.sum(weights * m), m

  g, m = jax.grad(weighted_margin, has_aux=True)(params)
  residual = jax.tree.map(lambda t, gi: t - gi, params, g)
  stationarity = _sq_norm(residual) / _sq_norm(params)
  hinge = jnp.maximum(lambda_min - lambdas, 0.0)
  if active is None:
    penalty = jnp.mean(hinge)
  else:
    penalty = jnp.sum(jnp.where(active, hinge, 0.0)) / jnp.maximum(
      jnp.sum(active), 1
    )
  total = stationarity + beta_lambda * penalty
  return total, {
    "stationarity": stationarity,
    "lambda_penalty": penalty,
    "margin": m,
  }


def make_reconstructor(
  apply_fn: ApplyFn,
  *,
  x_tx: optax.GradientTransformation | None = None,
  lambda_tx: optax.GradientTransformation | None = None,
  lambda_min: float = 0.05,
  beta_lambda: float = 1.0,
  lambda_init: tuple[float, float] = (0.5, 1.0),
  pixel_min: jax.typing.ArrayLike | None = None,
  pixel_max: jax.typing.ArrayLike | None = None,
) -> Synthesizer:
  """The reconstruction baseline as a `synthesize.Synthesizer`.

  Args:
    apply_fn: the frozen classifier (eval mode); its params are an
      argument of the returned functions.
    x_tx: optimiser of x (default ``optax.adam(0.01)``).
    lambda_tx: optimiser of lambda (default ``optax.adam(0.05)``).
    lambda_min, beta_lambda: see `reconstruction_loss`.
    lambda_init: initial lambdas ~ U[low, high].
    pixel_min, pixel_max: bounds x is clipped to after every step.

  Returns:
    A `Synthesizer` whose ``init_fn(key, params, x0, labels, active=None)``
    and ``step_fn(state, params, labels, key)`` match DeepKKT synthesis
    (``labels`` int ``[N]``; soft targets are reduced to their argmax).
    lambda is a free variable (``lambda_param`` is lambda) held near
    ``>= lambda_min`` by the hinge; no candidate is ever deactivated.
  """
  if lambda_min < 0 or beta_lambda < 0:
    raise ValueError(
      f"lambda_min and beta_lambda must be >= 0, got {lambda_min}, "
      f"{beta_lambda}."
    )
  objective = functools.partial(
    _objective, apply_fn, lambda_min=lambda_min, beta_lambda=beta_lambda
  )
  return make_candidate_optimizer(
    apply_fn,
    objective,
    lambda_param=FREE,
    freeze_inactive=False,
    x_tx=x_tx,
    lambda_tx=lambda_tx,
    lambda_init=lambda_init,
    pixel_min=pixel_min,
    pixel_max=pixel_max,
  )


def _objective(
  apply_fn, params, x, lambdas, active, targets, key, *, lambda_min, beta_lambda
):
  """`reconstruction_loss` at the candidates' labels, with the synthesis
  metrics (`make_candidate_optimizer`'s objective)."""
  del key  # The baseline has no augmentation.
  labels = synthesize.target_labels(targets)
  total, aux = reconstruction_loss(
    apply_fn,
    params,
    x,
    labels,
    lambdas,
    active=active,
    lambda_min=lambda_min,
    beta_lambda=beta_lambda,
  )
  desc = synthesize.describe_logits(apply_fn(params, x), labels)
  act = active.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(act), 1.0)
  correct = (desc["prediction"] == labels).astype(jnp.float32)
  metrics = {
    "total": total,
    "stationarity": aux["stationarity"],
    "lambda_penalty": aux["lambda_penalty"],
    "margin": jnp.sum(aux["margin"] * act) / count,
    "entropy": jnp.sum(desc["entropy"] * act) / count,
    "accuracy": jnp.sum(correct * act) / count,
  }
  return total, jax.tree.map(jax.lax.stop_gradient, metrics)


__all__ = ["make_reconstructor", "margins", "reconstruction_loss"]
