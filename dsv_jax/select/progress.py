"""What a lambda fit does between iterations: report its metrics and state
to the caller's hooks, checkpoint the whole state (all processes' rows),
and resume from a checkpoint."""

import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dsv_jax.select.fista import SolverState
from dsv_jax.select.layout import gather_state
from dsv_jax.types import Params

if TYPE_CHECKING:
  from dsv_jax.checkpoints import RunCheckpointer


def checkpoint_target(params: Params, n: int) -> SolverState:
  """A zero `SolverState` of ``n`` samples: the structure a checkpoint of a
  fit of ``params`` restores into."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  vec = jnp.zeros(n, jnp.float32)
  one = jnp.float32(0)
  return SolverState(
    step=jnp.int32(0),
    contributions=vec,
    contributions_prev=vec,
    g=zeros,
    g_prev=zeros,
    momentum=one,
    lipschitz=one,
    objective=one,
    max_step=one,
  )


def restore(
  checkpointer: "RunCheckpointer", params: Params, n: int, max_iters: int
) -> SolverState | None:
  """The newest readable state in ``checkpointer``, or None."""
  restored = checkpointer.restore(checkpoint_target(params, n))
  if restored is None:
    return None
  step, state, _ = restored
  logging.getLogger(__name__).info(
    "Resumed selection from iteration %d of %d.", step, max_iters
  )
  return state


def saver(
  checkpointer: "RunCheckpointer | None",
  ckpt_every: int,
  meta: dict[str, Any] | None,
  *,
  n: int,
  chunk_size: int,
  mesh: Mesh,
) -> Callable[..., None]:
  """``save(step, state, final)``: checkpoints every ``ckpt_every`` steps
  (``state`` this process's rows, gathered: a collective) and the final,
  already gathered, state; does nothing without a checkpointer."""
  if not isinstance(ckpt_every, int) or ckpt_every < 0:
    raise ValueError(f"ckpt_every must be an int >= 0, got {ckpt_every!r}.")

  def save(step: int, state: SolverState, *, final: bool) -> None:
    if checkpointer is None:
      return
    if final:
      checkpointer.save(step, state, meta or {})
    elif ckpt_every and step % ckpt_every == 0:
      full = gather_state(state, n, chunk_size=chunk_size, mesh=mesh)
      checkpointer.save(step, full, meta or {})

  return save


def reporter(
  on_metrics: Callable[[dict[str, float]], None] | None,
  log_every: int,
  on_state: Callable[[SolverState], None] | None,
  callback: Callable[[SolverState, dict[str, float]], None] | None,
  max_iters: int,
) -> Callable[[SolverState, dict[str, float]], None]:
  """``report(state, row)`` after an iteration: ``on_metrics`` every
  ``log_every`` iterations and at ``max_iters``, then ``on_state`` and the
  deprecated ``callback`` after every one."""
  if not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"log_every must be an int >= 1, got {log_every!r}.")
  if callback is not None:
    warnings.warn(
      "fit_lambdas(callback=...) is deprecated: use on_state=... (the state "
      "after every iteration) and on_metrics=... (its metrics row).",
      DeprecationWarning,
      stacklevel=4,  # The caller of fit_lambdas (past its wrapper).
    )

  def report(state: SolverState, row: dict[str, float]) -> None:
    step = row["step"]
    if on_metrics is not None and (step % log_every == 0 or step == max_iters):
      on_metrics(row)
    if on_state is not None:
      on_state(state)
    if callback is not None:
      callback(state, row)

  return report
