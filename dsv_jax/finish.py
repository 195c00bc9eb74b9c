"""Finishing phase: full-batch L-BFGS to a stationary point of training.

DeepKKT's stationarity condition assumes theta* is a stationary point of
the training objective; minibatch Adam with augmentation stops short of
it. `finish_full_batch` minimises the objective full batch, built from
named pieces: the split of theta into optimised and frozen leaves
(`_Split`, a flat vector by ``ravel_pytree``), the streamed value and
gradient (`_make_value_grad`), the L-BFGS direction, an Armijo line search
and the checkpointed `FinishState`.
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.flatten_util import ravel_pytree

from dsv_jax import checks, parallel
from dsv_jax.batches import padded_batches
from dsv_jax.types import Params, PyTree

if TYPE_CHECKING:  # Orbax is imported only by those who checkpoint.
  from dsv_jax.checkpoints import RunCheckpointer


class FinishState(NamedTuple):
  """State of `finish_full_batch` (a checkpointable pytree).

  Attributes:
    step: iterations done (int32 scalar).
    params: the full parameter pytree.
    s_hist: ``[memory, P_r]`` L-BFGS parameter differences (ring buffer)
      over the optimised leaves, flattened.
    y_hist: ``[memory, P_r]`` the matching gradient differences.
    count: pairs stored so far (int32; the ring's next slot is
      ``count % memory``).
  """

  step: jax.Array
  params: Params
  s_hist: jax.Array
  y_hist: jax.Array
  count: jax.Array


def _lbfgs_direction(g, s_hist, y_hist, count):
  """The L-BFGS two-loop recursion: ``-H g`` from the stored pairs."""
  m = s_hist.shape[0]
  k = min(int(count), m)
  order = [(int(count) - 1 - j) % m for j in range(k)]  # Newest first.
  q = g.copy()
  alphas = []
  for i in order:
    rho = 1.0 / float(y_hist[i] @ s_hist[i])
    a = rho * float(s_hist[i] @ q)
    q -= a * y_hist[i]
    alphas.append((i, rho, a))
  if k:
    newest = order[0]
    q *= float(s_hist[newest] @ y_hist[newest]) / float(
      y_hist[newest] @ y_hist[newest]
    )
  for i, rho, a in reversed(alphas):
    b = rho * float(y_hist[i] @ q)
    q += (a - b) * s_hist[i]
  return -q


class _Split(NamedTuple):
  """theta as optimised and frozen leaves; the optimised ones as one flat
  float64 vector (the L-BFGS variable)."""

  flags: list[bool]  # per leaf of theta: optimised
  treedef: Any
  frozen: list[jax.Array]
  unravel: Callable[[jax.Array], list[jax.Array]]
  size: int  # P_r, the optimised scalars

  def merge(self, opt: list[jax.Array], frozen=None) -> Params:
    """theta from the optimised leaves and the frozen ones."""
    frozen = self.frozen if frozen is None else frozen
    out, it_o, it_f = [], iter(opt), iter(frozen)
    for f in self.flags:
      out.append(next(it_o) if f else next(it_f))
    return jax.tree.unflatten(self.treedef, out)

  def flat(self, opt: list[jax.Array]) -> np.ndarray:
    """The optimised leaves (or their gradients) as float64 ``[P_r]``."""
    return np.asarray(ravel_pytree(opt)[0], np.float64)

  def leaves(self, v: np.ndarray) -> list[jax.Array]:
    """The float32 optimised leaves at the flat point ``v``."""
    return self.unravel(jnp.asarray(v, jnp.float32))

  def optimised(self, params: Params) -> list[jax.Array]:
    leaves = jax.tree.leaves(params)
    return [a for a, f in zip(leaves, self.flags, strict=True) if f]


def _split(params: Params, mask: PyTree | None) -> _Split:
  leaves, treedef = jax.tree.flatten(params)
  flags = (
    [True] * len(leaves)
    if mask is None
    else [bool(f) for f in jax.tree.leaves(mask)]
  )
  opt = [a for a, f in zip(leaves, flags, strict=True) if f]
  frozen = [a for a, f in zip(leaves, flags, strict=True) if not f]
  vec, unravel = ravel_pytree(opt)
  return _Split(flags, treedef, frozen, unravel, int(vec.size))


def _make_value_grad(apply_fn, split, images, labels, weight_decay, chunk):
  """``v -> (F(v), grad F(v))`` over the optimised leaves (float64), one
  streamed pass over the training set in fixed-shape chunks."""
  n = len(labels)
  frozen_sq = sum(float(np.vdot(a, a)) for a in split.frozen)

  @jax.jit
  def chunk_vg(opt, frozen, xc, yc, wc):
    def total(o):
      logits = apply_fn(split.merge(o, frozen), xc)
      return jnp.sum(
        wc * optax.softmax_cross_entropy_with_integer_labels(logits, yc)
      )

    return jax.value_and_grad(total)(opt)

  def value_grad(v):
    opt = split.leaves(v)
    ce, grad = 0.0, np.zeros_like(v)
    for (xc, yc), real in padded_batches([images, labels], chunk):
      # Padded rows (repeats of the last) get weight 0.
      wc = np.ones(chunk, np.float32)
      wc[real:] = 0
      val, g = chunk_vg(opt, split.frozen, xc, yc, wc)
      ce += float(val)
      grad += split.flat(g)
    sq = float(v @ v)
    value = ce / n + 0.5 * weight_decay * (sq + frozen_sq)
    return value, grad / n + weight_decay * v

  return value_grad


def _check_settings(weight_decay, steps, memory, chunk_size, tol):
  if weight_decay <= 0:
    raise ValueError(
      "The finishing phase needs weight_decay > 0: without it the "
      "objective has no stationary point on separable training data."
    )
  if steps < 0 or memory < 1 or chunk_size < 1 or tol < 0:
    raise ValueError(
      f"Bad finishing settings: steps={steps}, memory={memory}, "
      f"chunk_size={chunk_size}, tol={tol}."
    )


def _direction(grad, v, s_hist, y_hist, count):
  """``(d, slope, count)``: the L-BFGS direction, or a gradient step (and
  the history dropped) where there is no usable curvature."""
  d = _lbfgs_direction(grad, s_hist, y_hist, count)
  slope = float(grad @ d)
  if slope >= 0 or not count:
    # No curvature yet (or a bad one): a gradient step moving theta by
    # 1% of its norm, then let the line search adjust it.
    count = 0
    d = -grad * (0.01 * np.linalg.norm(v) / max(np.linalg.norm(grad), 1e-30))
    slope = float(grad @ d)
  return d, slope, count


def _line_search(value_grad, v, value, d, slope):
  """Armijo backtracking from step 1: ``(v, F, grad F, alpha)`` accepted,
  or None when no step of 30 halvings decreases F."""
  alpha = 1.0
  for _ in range(30):
    # The parameters are float32 (as evaluated and checkpointed).
    v_new = (v + alpha * d).astype(np.float32).astype(np.float64)
    value_new, grad_new = value_grad(v_new)
    if value_new <= value + 1e-4 * alpha * slope:
      return v_new, value_new, grad_new, alpha
    alpha *= 0.5
  return None


def _remember(s_hist, y_hist, count, s_vec, y_vec) -> int:
  """Stores a curvature pair in the ring (in place); the new count."""
  if float(s_vec @ y_vec) > 1e-12 * float(y_vec @ y_vec):
    slot = count % len(s_hist)
    # Kept at the checkpoint's float32, so a resumed run continues with
    # exactly the state an uninterrupted one has.
    s_hist[slot] = s_vec.astype(np.float32)
    y_hist[slot] = y_vec.astype(np.float32)
    count += 1
  return count


def _finish_state(step, params, s_hist, y_hist, count) -> FinishState:
  return FinishState(
    jnp.int32(step),
    params,
    jnp.asarray(s_hist, jnp.float32),
    jnp.asarray(y_hist, jnp.float32),
    jnp.int32(count),
  )


def _restored(checkpointer, params, memory, size) -> FinishState:
  """The fresh state, or the one ``checkpointer`` holds."""
  state = _finish_state(
    0, params, np.zeros((memory, size)), np.zeros((memory, size)), 0
  )
  if checkpointer is not None:
    restored = checkpointer.restore(state)
    if restored is not None:
      state = restored[1]
      logging.info(
        "Resumed the finishing phase from iteration %d.", restored[0]
      )
  return state


def _log(row, steps, tol, on_metrics):
  logging.info(
    "finish iteration %d/%d: objective %.6g, relative gradient %.4g "
    "(target %.3g), step %.3g",
    row["step"],
    steps,
    row["objective"],
    row["rel_grad"],
    tol,
    row["alpha"],
  )
  if on_metrics is not None:
    on_metrics(row)


def finish_full_batch(
  apply_fn: Callable[[Params, jax.Array], jax.Array],
  params: Params,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  weight_decay: float,
  steps: int,
  mask: PyTree | None = None,
  tol: float = 0.01,
  memory: int = 10,
  chunk_size: int = 1024,
  checkpointer: "RunCheckpointer | None" = None,
  ckpt_every: int = 0,
  ckpt_meta: dict[str, Any] | None = None,
  log_every: int = 10,
  on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Params, dict[str, Any]]:
  """Brings a trained classifier to a stationary point of its objective.

  DeepKKT's stationarity condition assumes theta* is a stationary point of
  the training objective ``F = mean_i CE_i + (wd / 2) ||theta||^2`` (then
  ``lambda_i = 1 / (N wd)`` represents theta* exactly). Minibatch Adam with
  augmentation stops short of it: on digits the relative gradient
  ``||grad F|| / (wd ||theta||)`` (= the residual of the uniform lambda) was
  0.94 after training. This phase minimises F on the
  un-augmented training set, full batch, by L-BFGS with an Armijo line
  search, over the leaves in ``mask`` (the others frozen: a scale-invariant
  leaf has no stationary point under weight decay, see
  `dsv_jax.select.represented_leaves`). It stops when that relative
  gradient is below ``tol`` or after ``steps`` iterations; each iteration
  is one streamed value-and-gradient pass per line-search trial (usually
  one). Resumes exactly from ``checkpointer``.

  Args:
    apply_fn: ``(params, x) -> logits``, evaluation mode.
    params: the trained parameters.
    images, labels: the training split (host arrays).
    weight_decay: the coupled L2 coefficient of training (> 0).
    steps: maximum L-BFGS iterations.
    mask: a pytree of bools like ``params``: the optimised leaves (None:
      all).
    tol: target relative gradient ``||grad F|| / (wd ||theta||)`` over the
      optimised leaves.
    memory: L-BFGS pairs kept.
    chunk_size: samples per pass (memory O(chunk)).
    checkpointer, ckpt_every, ckpt_meta: periodic checkpoints (resume).
    log_every: iterations between progress lines.
    on_metrics: called with each logged metrics row.

  Returns:
    ``(params, info)``: the finished parameters and a dict with the
    relative gradient before and after, the objective, iterations and the
    reason it stopped.
  """
  _check_settings(weight_decay, steps, memory, chunk_size, tol)
  t_start = time.perf_counter()
  split = _split(params, mask)
  images = checks.host_float32_images(images, "images")
  labels = np.asarray(labels, np.int32)
  chunk = parallel.balanced_chunk(len(labels), chunk_size)
  value_grad = _make_value_grad(
    apply_fn, split, images, labels, weight_decay, chunk
  )

  def rel_grad(v, g):
    return float(
      np.linalg.norm(g) / (weight_decay * max(np.linalg.norm(v), 1e-30))
    )

  state = _restored(checkpointer, params, memory, split.size)
  v = split.flat(split.optimised(state.params))
  s_hist = np.asarray(state.s_hist, np.float64)
  y_hist = np.asarray(state.y_hist, np.float64)
  count, step = int(state.count), int(state.step)
  value, grad = value_grad(v)
  first = rel_grad(v, grad)
  reason = "steps"
  while True:
    if rel_grad(v, grad) <= tol:
      reason = "tol"
      break
    if step >= steps:
      break
    d, slope, count = _direction(grad, v, s_hist, y_hist, count)
    accepted = _line_search(value_grad, v, value, d, slope)
    if accepted is None:
      reason = "line search (float32 precision reached)"
      break
    v_new, value, grad_new, alpha = accepted
    count = _remember(s_hist, y_hist, count, v_new - v, grad_new - grad)
    v, grad = v_new, grad_new
    step += 1
    row = {
      "step": step,
      "objective": value,
      "rel_grad": rel_grad(v, grad),
      "alpha": alpha,
    }
    if step % log_every == 0:
      _log(row, steps, tol, on_metrics)
    if checkpointer is not None and ckpt_every and step % ckpt_every == 0:
      out = split.merge(split.leaves(v))
      state = _finish_state(step, out, s_hist, y_hist, count)
      checkpointer.save(step, state, ckpt_meta or {})
  out = split.merge(split.leaves(v))
  if checkpointer is not None:
    state = _finish_state(step, out, s_hist, y_hist, count)
    checkpointer.save(step, state, ckpt_meta or {})
  info = {
    "iterations": step,
    "rel_grad_before": first,
    "rel_grad_after": rel_grad(v, grad),
    "objective": value,
    "stopped": reason,
    "optimised_scalars": split.size,
    "time_s": time.perf_counter() - t_start,
  }
  logging.info("Finishing phase done: %s", info)
  return out, info


__all__ = ["FinishState", "finish_full_batch"]
