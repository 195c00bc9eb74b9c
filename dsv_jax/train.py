"""Base-classifier training: a pure jitted step and a resumable loop.

The recipe defaults to the paper's: Adam (lr 1e-3) with *coupled* L2 weight
decay 5e-3 (the decay term is added to the gradient before Adam, as PyTorch's
`Adam(weight_decay=...)` does). Coupled decay matters for DeepKKT: at a
stationary point theta* = -sum_i grad L_i / (N wd) (METHOD.md section 3).

Every random choice of a step (which samples form the batch, the
augmentation) is derived from `fold_in(key, step)` or `fold_in(key, epoch)`,
so no RNG state is saved and a run resumed from a checkpoint at step s
computes exactly the same steps s+1, ... as an uninterrupted run.
"""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dsv_jax import augment
from dsv_jax.checkpoints import RunCheckpointer
from dsv_jax.models import FunctionalModel
from dsv_jax.types import Params, PyTree


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


def _batch_indices(key, step, *, num_examples: int, batch_size: int):
  """Indices of the batch at `step`: epochs are seeded permutations."""
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
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `step(state, data) -> (state, metrics)`; not jitted (caller's job).

  `data` is the whole training split on device, `{"image", "label"}`; the
  step picks its batch from it, so no host-side input pipeline is needed
  for the in-memory datasets this project uses.
  """
  data_key, aug_key = jax.random.split(key)

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
    idx = _batch_indices(
      data_key, state.step, num_examples=num_examples, batch_size=batch_size
    )
    images = data["image"][idx]
    images = augment.flip_and_translate(
      jax.random.fold_in(aug_key, state.step),
      images,
      flip=flip,
      max_shift=max_shift,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (model_state, acc)), grads = grad_fn(
      state.params, state.model_state, images, data["label"][idx]
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, params, model_state, opt_state)
    return new_state, {"loss": loss, "accuracy": acc}

  return step


def make_eval_fn(fm: FunctionalModel, *, batch_size: int = 1000):
  """Builds `evaluate(params, model_state, split) -> {"loss", "accuracy"}`.

  Runs a jitted forward pass over fixed-size batches (the last one padded and
  masked), so one compilation serves any split size.
  """

  @jax.jit
  def batch_stats(params, model_state, images, labels, mask):
    logits = fm.eval_apply(params, model_state, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(loss * mask), jnp.sum(correct * mask)

  def evaluate(params, model_state, split: dict) -> dict[str, float]:
    images, labels = np.asarray(split["image"]), np.asarray(split["label"])
    n = labels.shape[0]
    if n == 0:
      raise ValueError("Cannot evaluate on an empty split.")
    total_loss, total_correct = 0.0, 0.0
    for start in range(0, n, batch_size):
      xb, yb = (
        images[start : start + batch_size],
        labels[start : start + batch_size],
      )
      pad = batch_size - yb.shape[0]
      mask = np.concatenate([np.ones(yb.shape[0]), np.zeros(pad)])
      xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
      loss, correct = batch_stats(params, model_state, xb, yb, mask)
      total_loss += float(loss)
      total_correct += float(correct)
    return {"loss": total_loss / n, "accuracy": total_correct / n}

  return evaluate


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
  checkpointer: RunCheckpointer | None = None,
  ckpt_every: int = 0,
  ckpt_meta: dict[str, Any] | None = None,
  on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainState, dict[str, float]]:
  """Trains `fm` for `steps` steps, resuming from `checkpointer` if it has one.

  Args:
    fm: the model as pure functions (see `dsv_jax.models.functional`).
    train_split: `{"image": f32[N, H, W, C], "label": i32[N]}`.
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

  Returns:
    The final `TrainState` and the last logged metrics.
  """
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
  state = jax.tree.map(jnp.copy, state)
  start = int(state.step)
  step_fn = jax.jit(
    make_train_step(
      fm, tx, key, batch_size=batch_size, flip=flip, max_shift=max_shift
    ),
    donate_argnums=(0,),
  )
  evaluate = make_eval_fn(fm) if eval_split is not None else None
  data = jax.device_put(
    {"image": train_split["image"], "label": train_split["label"]}
  )
  last: dict[str, Any] = {"step": start}
  t0, s0 = time.perf_counter(), start
  for step in range(start + 1, steps + 1):
    state, metrics = step_fn(state, data)
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
  return state, last


__all__ = [
  "SCHEDULES",
  "TrainState",
  "init_state",
  "make_eval_fn",
  "make_optimizer",
  "make_train_step",
  "train_classifier",
]
