"""Per-sample statistics of a classifier's logits: entropy and margin.

The classifier-health numbers of training, the candidate diagnostics of
synthesis, the DeepKKT loss's aux outputs and the reconstruction
baseline's margin all read them here.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LogitStats(NamedTuple):
  """`logit_stats` of logits ``[N, C]``.

  Attributes:
    log_probs: ``[N, C]`` log-softmax.
    entropy: ``[N]`` predictive entropy (at most ln C).
    margin: ``[N]`` the label's logit minus the largest other logit.
  """

  log_probs: jax.Array
  entropy: jax.Array
  margin: jax.Array


def logit_stats(logits: jax.Array, labels: jax.Array) -> LogitStats:
  """Entropy and margin of every row of ``logits`` against int ``labels``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax.logits import logit_stats
    >>> stats = logit_stats(jnp.array([[2.0, 0.0, 1.0]]), jnp.array([0]))
    >>> print(stats.margin)
    [1.]
  """
  log_probs = jax.nn.log_softmax(logits)
  target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  others = jnp.where(is_label, -jnp.inf, logits)
  return LogitStats(
    log_probs=log_probs,
    entropy=-jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1),
    margin=target - jnp.max(others, axis=-1),
  )


__all__ = ["LogitStats", "logit_stats"]
