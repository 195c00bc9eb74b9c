"""The sharded, resumable optimisation loop of synthesis-like stages.

Synthesis, editing, interpolation and the KKT-reconstruction baseline all
optimise per-candidate state (`synthesize.Synthesizer`): candidates are
padded to the mesh, sharded over its `data` axis, stepped by one jitted
function with donated state, checkpointed and logged.
"""

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dsv_jax import checkpoints, parallel, synthesize


def state_shardings(init_fn: Callable, x0p, tp, valid, key, mesh):
  """P("data") for the state leaves that hold one row per candidate, P()
  for the rest.

  A leaf is per-candidate when its shape follows the number of candidates:
  the state is traced (no compute) at m and at 2m candidates and the
  leaves whose leading axis changes are sharded. A leaf that merely has m
  rows by coincidence (an optimiser's own table, say) stays replicated.
  """
  batch = parallel.batch_sharding(mesh)
  rep = parallel.replicated_sharding(mesh)
  double = lambda a: jnp.concatenate([a, a])  # noqa: E731
  at_m = jax.eval_shape(init_fn, key, x0p, tp, valid)
  at_2m = jax.eval_shape(init_fn, key, double(x0p), double(tp), double(valid))
  return jax.tree.map(
    lambda a, b: batch if a.shape[:1] != b.shape[:1] else rep, at_m, at_2m
  )


def resize(x, shape) -> jax.Array:
  """Images ``[B, h, w, C]`` resized (bilinear, antialiased) to ``shape``
  ``(H, W, C)``."""
  return jax.image.resize(x, (x.shape[0], *shape), "bilinear")


def upsampling(apply_fn: Callable, shape) -> Callable:
  """``apply_fn`` on images upsampled to the classifier's ``shape`` first:
  the classifier of a low-resolution phase, differentiable in the small
  images."""

  def apply_low(params, x):
    return apply_fn(params, resize(x, shape))

  return apply_low


def run_synthesis_loop(
  synth: synthesize.Synthesizer,
  params,
  key: jax.Array,
  x0: np.ndarray,
  targets: np.ndarray,
  *,
  steps: int,
  mesh=None,
  checkpointer: checkpoints.RunCheckpointer | None = None,
  ckpt_every: int = 0,
  ckpt_meta: dict | None = None,
  log_every: int = 100,
  on_metrics: Callable[[dict], None] | None = None,
  name: str = "synthesize",
):
  """Runs a synthesis sharded over `mesh`, resuming from `checkpointer`.

  Candidates are padded to a multiple of the mesh size (padding rows start
  inactive; checkpoints leave them out, so a run resumes on a mesh of
  another size), sharded ``P("data")`` with the classifier's ``params``
  replicated (an argument of the step, not a constant of it), and the step
  is jitted once with donated state.

  Returns:
    ``(state, n, resumed_from_step, rows)``: the final state (padded), the
    number of real candidates, the step resumed from (0: none) and the
    logged metrics rows.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  n = len(targets)
  (x0p, tp), valid = parallel.pad_to_multiple(
    (jnp.asarray(x0), jnp.asarray(targets)), parallel.num_shards(mesh)
  )
  synthesize.check_images(x0)
  init_key = jax.random.fold_in(key, 0)
  state = synth.init_fn(init_key, params, x0p, tp, active=valid)
  state_sh = state_shardings(
    lambda k, x, t, v: synth.init_fn(k, params, x, t, active=v),
    x0p,
    tp,
    valid,
    init_key,
    mesh,
  )
  state = parallel.put(state, state_sh)
  tp = parallel.shard_batch(tp, mesh)
  params = parallel.replicate(params, mesh)
  # Checkpoints hold the n real rows of the per-candidate leaves, not the
  # padding, whose amount follows the mesh: a run saved on one number of
  # devices resumes on another, its padding rows fresh from `init_fn`.
  per_row = jax.tree.map(lambda s: s == parallel.batch_sharding(mesh), state_sh)

  def real_rows(st):
    return jax.tree.map(lambda a, row: a[:n] if row else a, st, per_row)

  resumed = 0
  if checkpointer is not None:
    restored = checkpointer.restore(real_rows(state))
    if restored is not None:
      resumed, real, _ = restored
      state = jax.tree.map(
        lambda a, fresh, row: jnp.concatenate([a, fresh[n:]]) if row else a,
        real,
        state,
        per_row,
      )
      state = parallel.put(state, state_sh)
      logging.info("Resumed %s from step %d of %d.", name, resumed, steps)
  step_key = jax.random.fold_in(key, 1)
  step_fn = jax.jit(
    synth.step_fn,
    in_shardings=(
      state_sh,
      parallel.replicated_sharding(mesh),
      parallel.batch_sharding(mesh),
      None,
    ),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )
  rows = []
  t0, s0 = time.perf_counter(), resumed
  for step in range(resumed + 1, steps + 1):
    state, metrics = step_fn(state, params, tp, step_key)
    if step % log_every == 0 or step == steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      now = time.perf_counter()
      rate = (step - s0) / (now - t0)
      row = {
        "step": step,
        "steps_per_s": rate,
        "candidate_steps_per_s": rate * n,
        **metrics,
      }
      t0, s0 = now, step
      logging.info(
        "%s step %d/%d: %s",
        name,
        step,
        steps,
        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"),
      )
      rows.append(row)
      if on_metrics is not None:
        on_metrics(row)
    if checkpointer is not None and (
      (ckpt_every and step % ckpt_every == 0) or step == steps
    ):
      checkpointer.save(step, real_rows(state), ckpt_meta or {})
  return state, n, resumed, rows


__all__ = ["resize", "run_synthesis_loop", "state_shardings", "upsampling"]
