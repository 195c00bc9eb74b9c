"""The KKT reconstruction baseline of Haim et al. 2022 / Buzaglo et al. 2023.

Prior work reconstructs training samples from a trained network by fitting
samples ``x_i`` and multipliers ``lambda_i`` to the stationarity condition of
the max-margin problem the network implicitly solves:

  L = || theta* - (1/m) sum_i lambda_i grad_theta m_i(x_i) ||^2 / ||theta*||^2
      + beta_lambda * mean_i max(0, lambda_min - lambda_i)

over the m candidates, with the multiclass margin ``m_i = Phi_{y_i}(x_i) -
max_{j != y_i} Phi_j(x_i)`` (Buzaglo et al.; Haim et al.'s binary ``y_i
Phi(x_i)`` is its two-class case), the lambda_min hinge of Haim et al., and
``x`` clipped to the valid pixel range after every Adam step.

Units of lambda. The 1/m is Haim et al.'s (their ``get_kkt_loss`` divides
the weighted sum by the number of candidates): lambda is each candidate's
multiplier times m, so lambda_min, lambda_init and the lambda learning rate
are per-candidate shares of the multipliers' total, whatever m is. The
division by ``||theta*||^2`` (OURS) makes the residual scale-free; it does
NOT make one lambda setting suit every model. The multipliers that satisfy
stationarity have a total fixed by the model: taking the inner product of
``theta* = sum_i mu_i grad m_i`` with theta* gives ``sum_i mu_i <theta*,
grad m_i> = ||theta*||^2``, which for a network positively homogeneous of
degree L in theta (a bias-free ReLU MLP: L = its number of layers) is
``sum_i mu_i m_i = ||theta*||^2 / L``: the total scales as ``||theta*||^2 /
(L * margin)``. The defaults (lambda_min 0.05, lambda_init U[0.5, 1], Adam
0.05, all in these units) reach the training set's own residual (that of
`best_multipliers`) with x fixed at the training images on the bias-free
MLPs of ``benchmarks/docs/reconstruct.md``, whose totals ``sum_i mu_i`` are
0.2 to 0.8 (`tests/reconstruct_test.py` checks it on a tiny one). For a
model whose total is far from that, scale them by `best_multipliers` at a
few real images (Haim et al. sweep lambda_min per model). The same
numbers in raw units (no 1/m) put the floor at a total of 0.05 m and the
start near 0.75 m: on the test's model the lambda fit stalled at 5x the
training set's residual, on 50 digits at 66x
(``benchmarks/docs/reconstruct.md``).

Compared with DeepKKT there is no cross-entropy, no primal
(classification) term, no augmentation and no image prior: the baseline
row shows what those add.

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
import numpy as np
import optax
import scipy.optimize

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
    lambdas: ``[N]`` multipliers in Haim et al.'s units (the module
      docstring): the weight of ``grad m_i`` is ``lambdas[i] / m``.
    active: optional ``bool[N]``; inactive rows (padding) take no part
      and do not count in m.
    lambda_min: the hinge's floor on lambda (same units).
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
  # Haim et al.'s units: lambda is a share of the total (module docstring).
  m = x.shape[0] if active is None else jnp.maximum(jnp.sum(active), 1)
  weights = weights / m

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


def best_multipliers(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.Array,
  labels: jax.Array,
) -> tuple[np.ndarray, float]:
  """The multipliers >= 0 that best satisfy stationarity at fixed ``x``.

  Solves ``min_{lambda >= 0} || theta* - (1/m) sum_i lambda_i grad m_i(x_i)
  ||^2`` exactly (non-negative least squares over the per-sample margin
  gradients, float64), the residual `reconstruction_loss` reaches at x
  without its hinge. At a model's training set it is the residual a
  reconstruction should reach, and the multipliers' scale to set
  `make_reconstructor`'s lambda settings by (module docstring). Memory:
  one gradient per sample, so for small models.

  Returns:
    ``(lambdas [N] in reconstruction_loss's units, stationarity)``.
  """
  x = jnp.asarray(x)
  labels = jnp.asarray(labels, jnp.int32)

  def margin(p, xi, yi):
    return margins(apply_fn(p, xi[None]), yi[None])[0]

  grads = jax.vmap(jax.grad(margin), in_axes=(None, 0, 0))(params, x, labels)
  cols = np.concatenate(
    [
      np.asarray(g, np.float64).reshape(x.shape[0], -1)
      for g in jax.tree.leaves(grads)
    ],
    axis=1,
  ).T
  theta = np.concatenate(
    [np.asarray(t, np.float64).reshape(-1) for t in jax.tree.leaves(params)]
  )
  mu, _ = scipy.optimize.nnls(cols, theta)
  residual = np.sum(np.square(theta - cols @ mu)) / np.sum(np.square(theta))
  return mu * x.shape[0], float(residual)


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

  The lambda settings are in Haim et al.'s units (shares of the
  multipliers' total; module docstring), measured to suit bias-free MLPs
  whose multipliers total 0.2 to 0.8; scale them by `best_multipliers` at
  a few real images for other models.

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


__all__ = [
  "best_multipliers",
  "make_reconstructor",
  "margins",
  "reconstruction_loss",
]
