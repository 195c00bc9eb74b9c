"""`stationarity_residuals`: how far a given lambda is from representing
theta*, in one streamed pass (the anchor every fit is read against)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dsv_jax import checks, kkt, parallel
from dsv_jax.select.fista import sq_norm
from dsv_jax.select.invariance import masker
from dsv_jax.select.layout import make_layout
from dsv_jax.select.operator import Strategy, make_operator
from dsv_jax.types import ApplyFn, Params, PyTree


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
  layout = make_layout(len(x), chunk_size, mesh, jax.process_index())
  if jax.process_count() > 1:  # Each process streams its own rows.
    x, targets = x[layout.rows], targets[layout.rows]
    lambdas = lambdas[layout.rows]
  op = make_operator(apply_fn, params, x, targets, layout, mesh, strategy)
  g = op.matvec(lambdas)
  restrict = masker(mask if mask is not None else params)

  def rel(p, gg):
    r = jax.tree.map(jnp.add, p, gg)
    return float(jnp.sqrt(sq_norm(r) / sq_norm(p)))

  params = parallel.put(params, parallel.replicated_sharding(mesh))
  if mask is None:
    both = rel(params, g)
    return both, both
  return rel(restrict(params), restrict(g)), rel(params, g)
