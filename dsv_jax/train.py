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
from dsv_jax.batches import padded_batches
from dsv_jax.finish import FinishState, finish_full_batch
from dsv_jax.logits import logit_stats
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
    stats = logit_stats(logits, labels)
    per_sample = (
      loss,
      correct,
      stats.entropy,
      stats.margin,
      jnp.std(logits, -1),
    )
    return [jnp.sum(v * mask) for v in per_sample]

  def evaluate(params, model_state, split: dict) -> dict[str, float]:
    images, labels = np.asarray(split["image"]), np.asarray(split["label"])
    n = labels.shape[0]
    if n == 0:
      raise ValueError("Cannot evaluate on an empty split.")
    totals = np.zeros(5)
    for (xb, yb), real in padded_batches([images, labels], batch_size):
      mask = (np.arange(batch_size) < real).astype(np.float64)
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
