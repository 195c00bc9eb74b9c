"""Base-classifier training: a pure jitted step and a resumable loop.

The recipe defaults to the paper's: Adam (lr 1e-3) with *coupled* L2 weight
decay 5e-3 (the decay term is added to the gradient before Adam, as PyTorch's
`Adam(weight_decay=...)` does). Coupled decay matters for DeepKKT: at a
stationary point theta* = -sum_i grad L_i / (N wd).

Every random choice of a step (which samples form the batch, the
augmentation) is derived from `fold_in(key, step)` or `fold_in(key, epoch)`,
so no RNG state is saved and a run resumed from a checkpoint at step s
computes exactly the same steps s+1, ... as an uninterrupted run.
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dsv_jax import augment, checks, parallel
from dsv_jax.models import FunctionalModel
from dsv_jax.types import Params, PyTree

if TYPE_CHECKING:  # Orbax is imported only by those who checkpoint.
  from dsv_jax.checkpoints import RunCheckpointer


class TrainState(NamedTuple):
  """Everything a training run needs to continue (a checkpointable pytree)."""

  step: jax.Array  # int32 scalar: number of optimiser steps taken.
  params: Params
  model_state: PyTree  # Non-trainable state, e.g. BatchNorm statistics.
  opt_state: optax.OptState


SCHEDULES = ("constant", "cosine")


def make_optimizer(
  *,
  learning_rate: float = 1e-3,
  weight_decay: float = 5e-3,
  schedule: str = "constant",
  steps: int | None = None,
) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (the paper's classifier recipe).

  Args:
    learning_rate: Adam's (peak) learning rate.
    weight_decay: coefficient of the L2 term added to the gradient.
    schedule: "constant" (the paper states no schedule) or "cosine" (decay
      to 0 over `steps`): ending with a small step size brings theta*
      closer to the stationary point DeepKKT assumes, and measured higher
      accuracy (see benchmarks/README.md).
    steps: total steps of the run, needed by "cosine".
  """
  if schedule == "constant":
    lr = learning_rate
  elif schedule == "cosine":
    if not steps:
      raise ValueError("The cosine schedule needs the number of steps.")
    lr = optax.cosine_decay_schedule(learning_rate, decay_steps=steps)
  else:
    raise ValueError(f"Unknown schedule {schedule!r}; expected {SCHEDULES}.")
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))


def init_state(fm: FunctionalModel, tx: optax.GradientTransformation):
  """The step-0 training state of a functional model."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=fm.params,
    model_state=fm.state,
    opt_state=tx.init(fm.params),
  )


def batch_indices(
  key: jax.Array,
  step: jax.typing.ArrayLike,
  *,
  num_examples: int,
  batch_size: int,
) -> jax.Array:
  """Indices of the batch at ``step``: epochs are seeded permutations.

  Epoch ``e`` is the permutation ``permutation(fold_in(key, e),
  num_examples)`` cut into ``num_examples // batch_size`` consecutive
  batches (the remainder of each epoch is skipped), so any step's batch is
  a pure function of ``(key, step)`` and a resumed run sees the same
  batches. Used by `make_train_step` and `dsv_jax.retrain`; jittable.

  Returns:
    int ``[batch_size]`` indices into ``[0, num_examples)``.
  """
  steps_per_epoch = num_examples // batch_size
  epoch, pos = jnp.divmod(step, steps_per_epoch)
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return jax.lax.dynamic_slice(perm, (pos * batch_size,), (batch_size,))


def make_train_step(
  fm: FunctionalModel,
  tx: optax.GradientTransformation,
  key: jax.Array,
  *,
  batch_size: int,
  flip: bool = False,
  max_shift: int = 0,
  mesh: "jax.sharding.Mesh | None" = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `step(state, data) -> (state, metrics)`; not jitted (caller's job).

  `data` is the whole training split on device, `{"image", "label"}`; the
  step picks its batch from it, so no host-side input pipeline is needed
  for the in-memory datasets this project uses. With a `mesh` whose size
  divides `batch_size`, the batch is split over its ``data`` axis: each
  device runs the forward and backward pass of its share, and XLA sums the
  gradients (BatchNorm's batch statistics stay those of the whole batch).
  """
  data_key, aug_key = jax.random.split(key)
  split = None
  if mesh is not None and batch_size % parallel.num_shards(mesh) == 0:
    split = parallel.batch_sharding(mesh)

  def loss_fn(params, model_state, images, labels):
    logits, new_model_state = fm.train_apply(params, model_state, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss.mean(), (new_model_state, acc)

  def step(state: TrainState, data: dict) -> tuple[TrainState, dict]:
    num_examples = data["label"].shape[0]
    if num_examples < batch_size:
      raise ValueError(
        f"batch_size {batch_size} exceeds the {num_examples} training "
        "examples; lower train.batch_size."
      )
    idx = batch_indices(
      data_key, state.step, num_examples=num_examples, batch_size=batch_size
    )
    images = data["image"][idx]
    images = augment.flip_and_translate(
      jax.random.fold_in(aug_key, state.step),
      images,
      flip=flip,
      max_shift=max_shift,
    )
    labels = data["label"][idx]
    if split is not None:
      images, labels = jax.lax.with_sharding_constraint((images, labels), split)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (model_state, acc)), grads = grad_fn(
      state.params, state.model_state, images, labels
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, params, model_state, opt_state)
    return new_state, {"loss": loss, "accuracy": acc}

  return step


def make_eval_fn(fm: FunctionalModel, *, batch_size: int = 1000):
  """Builds `evaluate(params, model_state, split) -> dict` of split means.

  Keys: ``loss`` (cross-entropy), ``accuracy``, and the classifier-health
  numbers ``entropy`` (predictive entropy, at most ln C), ``margin``
  (label logit minus the largest other logit) and ``logit_std`` (the
  standard deviation of a sample's logits across classes): a classifier
  whose entropy on its own training images is near ln C is near-uniform,
  however accurate, and every boundary measurement on it is void.

  Runs a jitted forward pass over fixed-size batches (the last one padded and
  masked), so one compilation serves any split size.
  """

  @jax.jit
  def batch_stats(params, model_state, images, labels, mask):
    logits = fm.eval_apply(params, model_state, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    logp = jax.nn.log_softmax(logits)
    entropy = -jnp.sum(jnp.exp(logp) * logp, -1)
    is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), -1)
    margin = label_logit - jnp.max(jnp.where(is_label, -jnp.inf, logits), -1)
    per_sample = (loss, correct, entropy, margin, jnp.std(logits, -1))
    return [jnp.sum(v * mask) for v in per_sample]

  def evaluate(params, model_state, split: dict) -> dict[str, float]:
    images, labels = np.asarray(split["image"]), np.asarray(split["label"])
    n = labels.shape[0]
    if n == 0:
      raise ValueError("Cannot evaluate on an empty split.")
    totals = np.zeros(5)
    for start in range(0, n, batch_size):
      xb, yb = (
        images[start : start + batch_size],
        labels[start : start + batch_size],
      )
      pad = batch_size - yb.shape[0]
      mask = np.concatenate([np.ones(yb.shape[0]), np.zeros(pad)])
      xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
      sums = batch_stats(params, model_state, xb, yb, mask)
      totals += np.array([float(v) for v in sums])
    keys = ("loss", "accuracy", "entropy", "margin", "logit_std")
    return dict(zip(keys, (totals / n).tolist(), strict=True))

  return evaluate


# A classifier whose mean predictive entropy on its own training images
# exceeds this fraction of ln C is reported as near-uniform.
UNHEALTHY_ENTROPY_FRACTION = 0.5


def health_warning(train_entropy: float, num_classes: int) -> str | None:
  """A one-line warning when a classifier is near-uniform, else None."""
  limit = UNHEALTHY_ENTROPY_FRACTION * float(np.log(num_classes))
  if train_entropy <= limit:
    return None
  return (
    f"The classifier is near-uniform: mean predictive entropy on its "
    f"training images is {train_entropy:.3f} nats (maximum ln "
    f"{num_classes} = {np.log(num_classes):.3f}; warning above {limit:.3f}). "
    "Boundary measurements (entropy, margin, flips) on it mean little; "
    "check the architecture against the image size (e.g. model.depth) and "
    "the training recipe."
  )


def train_classifier(
  fm: FunctionalModel,
  train_split: dict,
  key: jax.Array,
  *,
  steps: int,
  batch_size: int = 128,
  learning_rate: float = 1e-3,
  weight_decay: float = 5e-3,
  lr_schedule: str = "constant",
  flip: bool = False,
  max_shift: int = 0,
  eval_split: dict | None = None,
  eval_every: int = 0,
  log_every: int = 100,
  checkpointer: "RunCheckpointer | None" = None,
  ckpt_every: int = 0,
  ckpt_meta: dict[str, Any] | None = None,
  on_metrics: Callable[[dict[str, Any]], None] | None = None,
  mesh: "jax.sharding.Mesh | None" = None,
) -> tuple[TrainState, dict[str, float]]:
  """Trains `fm` for `steps` steps, resuming from `checkpointer` if it has one.

  Args:
    fm: the model as pure functions (see `dsv_jax.models.functional`).
    train_split: `{"image": f32[N, H, W, C], "label": i32[N]}`, images
      normalised (`DatasetInfo.normalize`).
    key: PRNG key; batches and augmentations derive from it and the step.
    steps: total number of optimiser steps of the run.
    batch_size, learning_rate, weight_decay, lr_schedule: the recipe (see
      `make_optimizer`).
    flip, max_shift: augmentation (left-right flip; translation in pixels).
    eval_split: optional split evaluated every `eval_every` steps.
    log_every: steps between progress lines (steps/s, loss, accuracy).
    checkpointer: where periodic checkpoints go and resume comes from.
    ckpt_every: steps between checkpoints (0: only at the end).
    ckpt_meta: JSON-serialisable record saved beside every checkpoint.
    on_metrics: called with each logged metrics dict (e.g. a jsonl writer).
    mesh: the ``data`` mesh the batch is split over (`make_train_step`);
      default every device. The state and the data set are replicated.

  Returns:
    The final `TrainState` and the last logged metrics.
  """
  checks.check_floating_images(train_split["image"], "train_split['image']")
  if eval_split is not None:
    checks.check_floating_images(eval_split["image"], "eval_split['image']")
  tx = make_optimizer(
    learning_rate=learning_rate,
    weight_decay=weight_decay,
    schedule=lr_schedule,
    steps=steps,
  )
  state = init_state(fm, tx)
  if checkpointer is not None:
    restored = checkpointer.restore(state)
    if restored is not None:
      step0, state, _ = restored
      logging.info("Resumed training from step %d of %d.", step0, steps)
  # The step donates its input state: copy it so the caller's arrays (e.g.
  # `fm.params`) are not deleted by the first step.
  mesh = parallel.make_mesh() if mesh is None else mesh
  state = parallel.replicate(jax.tree.map(jnp.copy, state), mesh)
  start = int(state.step)
  step_fn = jax.jit(
    make_train_step(
      fm,
      tx,
      key,
      batch_size=batch_size,
      flip=flip,
      max_shift=max_shift,
      mesh=mesh,
    ),
    donate_argnums=(0,),
  )
  evaluate = make_eval_fn(fm) if eval_split is not None else None
  data = parallel.replicate(
    {"image": train_split["image"], "label": train_split["label"]}, mesh
  )
  last: dict[str, Any] = {"step": start}
  t0, s0 = time.perf_counter(), start
  # XLA:CPU runs the device parts of queued programs on one shared thread
  # pool: with several (fake) CPU devices, a step's all-reduce can wait
  # forever for a part queued behind the next step (it deadlocked on 2
  # cores). One step in flight at a time avoids that; accelerators queue.
  one_at_a_time = (
    jax.default_backend() == "cpu" and parallel.num_shards(mesh) > 1
  )
  for step in range(start + 1, steps + 1):
    state, metrics = step_fn(state, data)
    if one_at_a_time:
      jax.block_until_ready(state)
    if step % log_every == 0 or step == steps:
      metrics = {k: float(v) for k, v in metrics.items()}
      now = time.perf_counter()
      last = {"step": step, "steps_per_s": (step - s0) / (now - t0), **metrics}
      t0, s0 = now, step
      if (
        evaluate is not None
        and eval_every
        and (step % eval_every == 0 or step == steps)
      ):
        val = evaluate(state.params, state.model_state, eval_split)
        last.update({f"val_{k}": v for k, v in val.items()})
      logging.info(
        "train step %d/%d: %s",
        step,
        steps,
        ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step"),
      )
      if on_metrics is not None:
        on_metrics(last)
    if checkpointer is not None and (
      (ckpt_every and step % ckpt_every == 0) or step == steps
    ):
      checkpointer.save(step, state, ckpt_meta or {})
  # The step this run resumed from (a damaged newer checkpoint is skipped).
  return state, {**last, "resumed_from_step": start}


# ----------------------------------------------------------------------------
# Finishing phase: full-batch L-BFGS to a stationary point.


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
  t_start = time.perf_counter()
  leaves, treedef = jax.tree.flatten(params)
  flags = (
    [True] * len(leaves)
    if mask is None
    else [bool(f) for f in jax.tree.leaves(mask)]
  )
  opt_idx = [i for i, f in enumerate(flags) if f]
  shapes = [leaves[i].shape for i in opt_idx]
  sizes = [int(np.prod(sh)) for sh in shapes]
  n = len(labels)
  images = checks.host_float32_images(images, "images")
  labels = np.asarray(labels, np.int32)
  chunk_size = parallel.balanced_chunk(n, chunk_size)

  def merge(opt, frozen):
    out, it_o, it_f = [], iter(opt), iter(frozen)
    for f in flags:
      out.append(next(it_o) if f else next(it_f))
    return jax.tree.unflatten(treedef, out)

  @jax.jit
  def chunk_vg(opt, frozen, xc, yc, wc):
    def total(o):
      logits = apply_fn(merge(o, frozen), xc)
      return jnp.sum(
        wc * optax.softmax_cross_entropy_with_integer_labels(logits, yc)
      )

    return jax.value_and_grad(total)(opt)

  def flat(arrays):
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in arrays])

  def unflat(vec):
    out, start = [], 0
    for sh, size in zip(shapes, sizes, strict=True):
      out.append(
        jnp.asarray(vec[start : start + size].reshape(sh), jnp.float32)
      )
      start += size
    return out

  frozen = [leaves[i] for i, f in enumerate(flags) if not f]
  frozen_sq = sum(float(np.vdot(a, a)) for a in frozen)

  def value_grad(v):
    """F and grad F over the optimised leaves at flat point v (float64)."""
    opt = unflat(v)
    ce, grad = 0.0, np.zeros_like(v)
    for start in range(0, n, chunk_size):
      stop = min(start + chunk_size, n)
      pad = chunk_size - (stop - start)
      xc, yc = images[start:stop], labels[start:stop]
      wc = np.ones(chunk_size, np.float32)
      if pad:  # Repeat the last row with weight 0: one compiled shape.
        xc = np.concatenate([xc, np.repeat(xc[-1:], pad, 0)])
        yc = np.concatenate([yc, np.repeat(yc[-1:], pad, 0)])
        wc[stop - start :] = 0
      val, g = chunk_vg(opt, frozen, xc, yc, wc)
      ce += float(val)
      grad += flat(g)
    sq = float(v @ v)
    value = ce / n + 0.5 * weight_decay * (sq + frozen_sq)
    return value, grad / n + weight_decay * v

  def rel_grad(v, g):
    return float(
      np.linalg.norm(g) / (weight_decay * max(np.linalg.norm(v), 1e-30))
    )

  p_r = sum(sizes)
  state = FinishState(
    step=jnp.int32(0),
    params=params,
    s_hist=jnp.zeros((memory, p_r), jnp.float32),
    y_hist=jnp.zeros((memory, p_r), jnp.float32),
    count=jnp.int32(0),
  )
  if checkpointer is not None:
    restored = checkpointer.restore(state)
    if restored is not None:
      state = restored[1]
      logging.info(
        "Resumed the finishing phase from iteration %d.", restored[0]
      )
  v = flat([jax.tree.leaves(state.params)[i] for i in opt_idx])
  s_hist = np.asarray(state.s_hist, np.float64)
  y_hist = np.asarray(state.y_hist, np.float64)
  count, step = int(state.count), int(state.step)
  value, grad = value_grad(v)
  first = rel_grad(v, grad)
  reason = "steps"
  history = []
  while True:
    rel = rel_grad(v, grad)
    if rel <= tol:
      reason = "tol"
      break
    if step >= steps:
      break
    d = _lbfgs_direction(grad, s_hist, y_hist, count)
    slope = float(grad @ d)
    if slope >= 0 or not count:
      # No curvature yet (or a bad one): a gradient step moving theta by
      # 1% of its norm, then let the line search adjust it.
      count = 0
      d = -grad * (0.01 * np.linalg.norm(v) / max(np.linalg.norm(grad), 1e-30))
      slope = float(grad @ d)
    alpha, accepted = 1.0, False
    for _ in range(30):
      # The parameters are float32 (as evaluated and checkpointed).
      v_new = (v + alpha * d).astype(np.float32).astype(np.float64)
      value_new, grad_new = value_grad(v_new)
      if value_new <= value + 1e-4 * alpha * slope:
        accepted = True
        break
      alpha *= 0.5
    if not accepted:
      reason = "line search (float32 precision reached)"
      break
    s_vec, y_vec = v_new - v, grad_new - grad
    if float(s_vec @ y_vec) > 1e-12 * float(y_vec @ y_vec):
      slot = count % memory
      # Kept at the checkpoint's float32, so a resumed run continues with
      # exactly the state an uninterrupted one has.
      s_hist[slot] = s_vec.astype(np.float32)
      y_hist[slot] = y_vec.astype(np.float32)
      count += 1
    v, value, grad = v_new, value_new, grad_new
    step += 1
    row = {
      "step": step,
      "objective": value,
      "rel_grad": rel_grad(v, grad),
      "alpha": alpha,
    }
    history.append(row)
    if step % log_every == 0:
      logging.info(
        "finish iteration %d/%d: objective %.6g, relative gradient %.4g "
        "(target %.3g), step %.3g",
        step,
        steps,
        value,
        row["rel_grad"],
        tol,
        alpha,
      )
      if on_metrics is not None:
        on_metrics(row)
    if checkpointer is not None and ckpt_every and step % ckpt_every == 0:
      checkpointer.save(
        step,
        FinishState(
          jnp.int32(step),
          merge(unflat(v), frozen),
          jnp.asarray(s_hist, jnp.float32),
          jnp.asarray(y_hist, jnp.float32),
          jnp.int32(count),
        ),
        ckpt_meta or {},
      )
  out = merge(unflat(v), frozen)
  if checkpointer is not None:
    checkpointer.save(
      step,
      FinishState(
        jnp.int32(step),
        out,
        jnp.asarray(s_hist, jnp.float32),
        jnp.asarray(y_hist, jnp.float32),
        jnp.int32(count),
      ),
      ckpt_meta or {},
    )
  info = {
    "iterations": step,
    "rel_grad_before": first,
    "rel_grad_after": rel_grad(v, grad),
    "objective": value,
    "stopped": reason,
    "optimised_scalars": p_r,
    "time_s": time.perf_counter() - t_start,
  }
  logging.info("Finishing phase done: %s", info)
  return out, info


__all__ = [
  "FinishState",
  "SCHEDULES",
  "TrainState",
  "UNHEALTHY_ENTROPY_FRACTION",
  "batch_indices",
  "health_warning",
  "init_state",
  "make_eval_fn",
  "make_optimizer",
  "finish_full_batch",
  "make_train_step",
  "train_classifier",
]
