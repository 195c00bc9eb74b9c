"""Retraining fresh models on a small set (DSVs, a coreset, random images).

The paper's evidence that DSVs carry the classifier's knowledge is that a
fresh model trained on a handful of them generalises (Lee et al., NeurIPS
2024, Tables 1-2). `retrain` trains K fresh models of
one architecture with different seeds on the same small set, all K in ONE
jitted step over stacked parameter and optimiser pytrees (`jax.vmap`, or K
unrolled copies, which XLA:CPU runs faster), and evaluates each on a real
split:

  model_fn = lambda s: models.functional(models.build_model(..., key=key(s)))
  result = retrain(model_fn, dsv.images, dsv.targets, test["image"],
                   test["label"], steps=1000, batch_size=256,
                   weight_decay=5e-3, flip=False, max_shift=1, seed=0)
  result.mean, result.std          # test accuracy over the K models

The recipe is the paper's retraining recipe -- Adam, lr 1e-4 -- with the
classifier's coupled L2 weight decay (`train.make_optimizer`) and its
flip/shift augmentation (`augment.flip_and_translate`); steps, batch size,
weight decay and augmentation are the caller's (tuned on validation data).

Randomness, all derived from ``key = jax.random.key(seed)``:
  * model k is initialised by ``model_fn(int(init_seeds[k]))`` with
    ``init_seeds = model_seeds(seed, K)``;
  * model k's batches and augmentations come from
    ``data_key, aug_key = split(fold_in(fold_in(key, 1), k))``: the batch
    of step t is `train`'s epoch-permutation batch of ``(data_key, t)``
    and its augmentation key is ``fold_in(aug_key, t)`` (the classifier's
    scheme), so each model sees its own batch order and augmentations and
    model k's run does not depend on K.
"""

import collections
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from dsv_jax import augment, checks, distributed, kkt, parallel, train
from dsv_jax.batches import padded_batches
from dsv_jax.models import FunctionalModel
from dsv_jax.synthesize import check_images
from dsv_jax.types import Params, PyTree

ModelFn = Callable[[int], FunctionalModel]
Vectorize = Literal["auto", "vmap", "unroll"]
VECTORIZE: tuple[Vectorize, ...] = get_args(Vectorize)


class RetrainResult(NamedTuple):
  """What `retrain` measured.

  Attributes:
    accuracies: float64 ``[K]`` accuracy of each model on the eval split.
    mean: mean of `accuracies`.
    std: standard deviation of `accuracies` (population, ddof=0).
    steps: optimiser steps each model took.
    time_s: wall time of training and evaluation.
    final_losses: float64 ``[K]`` training loss of each model's last batch.
    params: the K trained parameter pytrees, stacked on a leading axis.
    model_state: the K non-trainable states (e.g. BatchNorm), stacked.
  """

  accuracies: np.ndarray
  mean: float
  std: float
  steps: int
  time_s: float
  final_losses: np.ndarray
  params: Params
  model_state: PyTree


def model_seeds(seed: int, num_models: int) -> np.ndarray:
  """int ``[num_models]`` initialisation seeds of the K models of `seed`."""
  key = jax.random.fold_in(jax.random.key(seed), 0)
  return np.asarray(
    jax.random.randint(key, (num_models,), 0, np.iinfo(np.int32).max)
  )


def model_key(seed: int, index: int) -> jax.Array:
  """The batch-and-augmentation key of model `index` of run `seed`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), index)


def _check_inputs(images, targets, eval_images, eval_labels, num_classes):
  """Eager value and shape checks at the API edge; raises ValueError."""
  check_images(images, name="images")
  targets = np.asarray(targets)
  if targets.shape[:1] != images.shape[:1]:
    raise ValueError(
      f"targets of shape {targets.shape} do not match the {len(images)} "
      "images (need int [N] or soft float [N, C])."
    )
  checks.check_targets_shape(targets, None)
  checks.check_logits_vs_targets(
    (len(images), num_classes), targets, "the model's output"
  )
  checks.check_target_values(targets, num_classes)
  eval_images = np.asarray(eval_images)
  eval_labels = np.asarray(eval_labels)
  if eval_images.ndim != 4 or eval_images.shape[1:] != images.shape[1:]:
    raise ValueError(
      f"eval_images of shape {eval_images.shape} do not match the training "
      f"images {images.shape[1:]}."
    )
  if eval_labels.shape != eval_images.shape[:1] or len(eval_labels) == 0:
    raise ValueError(
      f"eval_labels of shape {eval_labels.shape} must be int [M], M >= 1, "
      f"matching eval_images {eval_images.shape}."
    )
  check_images(eval_images, name="eval_images")
  if not np.issubdtype(eval_labels.dtype, np.integer) or (
    eval_labels.min() < 0 or eval_labels.max() >= num_classes
  ):
    raise ValueError(
      f"eval_labels must be ints in [0, {num_classes}), got dtype "
      f"{eval_labels.dtype} with values in [{eval_labels.min()}, "
      f"{eval_labels.max()}]."
    )


def make_step(
  fm: FunctionalModel,
  tx: optax.GradientTransformation,
  *,
  batch_size: int,
  flip: bool,
  max_shift: int,
) -> Callable:
  """One model's step: ``(params, state, opt, images, targets, key, t)``.

  Returns ``((params, state, opt), loss)``; `key` is the model's key (see
  the module docstring), `t` the 0-based step, `images`/`targets` the whole
  set (the step takes its batch from it). `retrain` vmaps this over models.
  """

  # The pure function only: a closure over `fm` would keep its arrays
  # alive as long as the step is reused.
  train_apply = fm.train_apply

  def loss_fn(params, model_state, x, y):
    logits, new_state = train_apply(params, model_state, x)
    return jnp.mean(kkt.cross_entropy(logits, y)), new_state

  def step(params, model_state, opt_state, images, targets, key, t):
    data_key, aug_key = jax.random.split(key)
    n = images.shape[0]
    idx = train.batch_indices(
      data_key, t, num_examples=n, batch_size=min(batch_size, n)
    )
    x = augment.flip_and_translate(
      jax.random.fold_in(aug_key, t),
      images[idx],
      flip=flip,
      max_shift=max_shift,
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, model_state), grads = grad_fn(params, model_state, x, targets[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, model_state, opt_state), loss

  return step


def _make_eval(fm: FunctionalModel, batch_size: int):
  """``evaluate(params[K], state[K], images, labels) -> accuracies[K]``."""
  eval_apply = fm.eval_apply  # Not `fm`: see `make_step`.

  @jax.jit
  def correct(params, model_state, x, y, mask):
    logits = jax.vmap(eval_apply, in_axes=(0, 0, None))(params, model_state, x)
    hits = (jnp.argmax(logits, -1) == y) & mask
    return jnp.sum(hits, axis=-1)

  def evaluate(params, model_state, images, labels):
    total = 0
    # Fixed-size padded batches: one compilation for any split size.
    for (x, y), real in padded_batches([images, labels], batch_size):
      mask = np.arange(batch_size) < real
      total = total + np.asarray(correct(params, model_state, x, y, mask))
    return total.astype(np.float64) / len(labels)

  return evaluate


# Jitted K-model steps and evaluators, reused by every retraining of the same
# architecture (`FunctionalModel.graph`) and recipe: the report retrains a
# dozen sets of two sizes, and compiling took 12-15 s of each 17-23 s row
# on 2 CPU cores. The functions close over the pure apply functions only,
# which depend on the architecture alone; the least recently used entries
# go once there are `_MAX_REUSED` (a notebook sweeping recipes would
# otherwise keep every compiled program).
_REUSED: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_MAX_REUSED = 16


def _reused(key: tuple, build: Callable[[], Callable]) -> Callable:
  """`build()`, cached under `key` unless the architecture is unknown."""
  if key[1] is None:  # A FunctionalModel without graph: no safe reuse.
    return build()
  if key not in _REUSED:
    _REUSED[key] = build()
    while len(_REUSED) > _MAX_REUSED:
      _REUSED.popitem(last=False)
  _REUSED.move_to_end(key)
  return _REUSED[key]


def resolve_vectorize(vectorize: Vectorize) -> str:
  """``"auto"``: ``"unroll"`` on CPU, ``"vmap"`` on GPU/TPU (see `retrain`)."""
  if vectorize != "auto":
    return vectorize
  return "unroll" if jax.default_backend() == "cpu" else "vmap"


def _batched(
  one: Callable, vectorize: str, num_models: int, per_model: bool
) -> Callable:
  """The K-model step from the one-model step `one` (see `retrain`).

  With ``per_model`` the images and targets carry a leading model axis
  (one training set per model); otherwise all models share them.
  """
  if vectorize == "vmap":
    data_axis = 0 if per_model else None
    return jax.vmap(one, in_axes=(0, 0, 0, data_axis, data_axis, 0, None))

  def unrolled(params, model_state, opt_state, images, targets, keys, t):
    outs = [
      one(
        *jax.tree.map(lambda a, k=k: a[k], (params, model_state, opt_state)),
        images[k] if per_model else images,
        targets[k] if per_model else targets,
        keys[k],
        t,
      )
      for k in range(num_models)
    ]
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)

  return unrolled


def retrain(
  model_fn: ModelFn,
  images: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  eval_images: jax.typing.ArrayLike,
  eval_labels: jax.typing.ArrayLike,
  *,
  num_models: int = 5,
  steps: int,
  learning_rate: float = 1e-4,
  batch_size: int,
  weight_decay: float,
  flip: bool,
  max_shift: int,
  seed: int,
  vectorize: Vectorize = "auto",
  eval_batch_size: int = 500,
  log_every: int = 0,
  mesh: Mesh | None = None,
) -> RetrainResult:
  """Trains `num_models` fresh models on a small set; evaluates each.

  Args:
    model_fn: ``seed -> FunctionalModel``, a freshly initialised model of
      the architecture to retrain (e.g. ``lambda s: models.functional(
      models.build_model(name, key=jax.random.key(s), ...))``). Every call
      must give the same architecture.
    images: ``float[N, H, W, C]`` training images (normalised space),
      shared by the K models, or ``float[K, N, H, W, C]``: one set per
      model (e.g. K different random subsets trained with the same seeds
      as a fixed set).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``
      (cross-entropy against the soft rows); ``[K, N]`` / ``[K, N, C]``
      with per-model sets.
    eval_images: ``float[M, H, W, C]`` images of the evaluation split.
    eval_labels: int ``[M]`` their labels.
    num_models: K, models trained at once (different seeds).
    steps: optimiser steps per model.
    learning_rate: Adam's learning rate (paper: 1e-4).
    batch_size: examples per step; ``>= N`` means full batch.
    weight_decay: coupled L2 coefficient (`train.make_optimizer`).
    flip, max_shift: augmentation (`augment.flip_and_translate`).
    seed: seeds everything (see the module docstring).
    vectorize: how the one jitted step holds the K models: ``"vmap"``
      (stacked pytrees, batched kernels; for accelerators), ``"unroll"``
      (K independent copies of the one-model graph in the same XLA
      program), or ``"auto"`` (the default: unroll on CPU, vmap
      elsewhere). All give the same models. Measured on 2 CPU cores
      (digits ConvNet width 64, 100 images, K=5, full batch): with
      instance norm vmap 0.36 s/step, unroll 0.15; without norm 0.15 vs
      0.09 -- XLA:CPU runs vmapped (grouped) convolutions and the
      per-channel GroupNorm slowly.
    eval_batch_size: evaluation batch size.
    log_every: steps between progress lines (0: only the last step).
    mesh: the ``data`` mesh (`dsv_jax.parallel.make_mesh`; default every
      device). With ``vmap`` and K divisible by its size, the K models are
      split over its devices; otherwise every device holds all of them.

  Returns:
    A `RetrainResult`.

  Raises:
    ValueError: an empty set, integer or NaN/Inf pixels (images are
      normalised floats), labels out of range, soft rows not summing to 1,
      or shapes that do not fit the model.
  """
  checks.check_choice("vectorize", vectorize, VECTORIZE)
  vectorize = resolve_vectorize(vectorize)
  _check_sizes(
    num_models=num_models,
    steps=steps,
    batch_size=batch_size,
    eval_batch_size=eval_batch_size,
  )
  t0 = time.perf_counter()
  fms, images, targets = _models_and_set(
    model_fn, images, targets, eval_images, eval_labels, num_models, seed
  )
  per_model = images.ndim == 5
  fm = fms[0]
  tx = train.make_optimizer(
    learning_rate=learning_rate, weight_decay=weight_decay
  )
  mesh = parallel.make_mesh() if mesh is None else mesh
  split = vectorize == "vmap" and num_models % parallel.num_shards(mesh) == 0
  carry, keys = _stacked(fms, tx, seed, mesh, split)
  step = _reused(
    (
      "step",
      fm.graph,
      learning_rate,
      weight_decay,
      batch_size,
      flip,
      max_shift,
      vectorize,
      num_models,
      per_model,
    ),
    lambda: jax.jit(
      _batched(
        make_step(
          fm, tx, batch_size=batch_size, flip=flip, max_shift=max_shift
        ),
        vectorize,
        num_models,
        per_model,
      ),
      donate_argnums=(0, 1, 2),
    ),
  )
  # Per-model sets go with their models.
  data_x, targets = parallel.put(
    (images, targets),
    parallel.batch_sharding(mesh)
    if split and per_model
    else parallel.replicated_sharding(mesh),
  )
  carry, losses = _train_loop(
    step, carry, (data_x, targets, keys), steps, log_every, num_models
  )
  params, model_state, _ = carry
  if distributed.is_distributed():
    # The models span every process's devices; each process evaluates
    # them whole on its own devices (the host-driven batches of `evaluate`
    # are numpy), so it takes them as numpy.
    params, model_state = parallel.to_host((params, model_state))
  evaluate = _reused(
    ("eval", fm.graph, eval_batch_size),
    lambda: _make_eval(fm, eval_batch_size),
  )
  accs = evaluate(
    params,
    model_state,
    np.asarray(eval_images, np.float32),
    np.asarray(eval_labels),
  )
  return RetrainResult(
    accuracies=accs,
    mean=float(accs.mean()),
    std=float(accs.std()),
    steps=steps,
    time_s=time.perf_counter() - t0,
    final_losses=np.asarray(losses, np.float64),
    params=params,
    model_state=model_state,
  )


def _check_sizes(**sizes: int) -> None:
  for name, v in sizes.items():
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}.")


def _models_and_set(
  model_fn, images, targets, eval_images, eval_labels, num_models, seed
):
  """The K fresh models and the checked training set ``(fms, images,
  targets)``: images float32 on the host, targets a jax array (soft ones
  float32)."""
  images = checks.host_float32_images(images, "images")
  per_model = images.ndim == 5
  if per_model and images.shape[0] != num_models:
    raise ValueError(
      f"per-model images [K, N, H, W, C] need K = num_models = {num_models} "
      f"sets, got {images.shape[0]}."
    )
  one_set = images[0] if per_model else images
  if one_set.ndim != 4 or one_set.shape[0] == 0:
    raise ValueError(
      "retrain needs a non-empty set of images [N, H, W, C] (or [K, N, H, "
      f"W, C]), got shape {images.shape}."
    )
  fms = [model_fn(int(s)) for s in model_seeds(seed, num_models)]
  fm = fms[0]
  try:
    out = jax.eval_shape(fm.eval_apply, fm.params, fm.state, one_set[:1])
  except Exception as e:  # noqa: BLE001 -- reported, with e as the cause.
    raise ValueError(
      f"images of shape {images.shape} do not fit the model "
      f"({checks.error_summary(e)})."
    ) from e
  if per_model:
    targets = np.asarray(targets)
    if targets.shape[:2] != images.shape[:2]:
      raise ValueError(
        f"per-model targets of shape {targets.shape} do not match the "
        f"per-model images {images.shape[:2]}."
      )
    for k in range(num_models):
      _check_inputs(
        images[k], targets[k], eval_images, eval_labels, out.shape[-1]
      )
  else:
    _check_inputs(images, targets, eval_images, eval_labels, out.shape[-1])
  targets = jnp.asarray(targets)
  if targets.ndim == 2 + per_model:  # Soft targets.
    targets = targets.astype(jnp.float32)
  return fms, images, targets


def _stacked(fms, tx, seed, mesh, split):
  """``((params, model_state, opt_state), keys)`` of the K models, stacked
  on a leading axis; split over the devices with ``split``."""
  # Stacked on the host: eager jnp ops would each compile once per shape.
  params = jax.tree.map(lambda *a: np.stack(a), *[m.params for m in fms])
  model_state = jax.tree.map(lambda *a: np.stack(a), *[m.state for m in fms])
  opt_state = jax.tree.map(
    lambda *a: np.stack(a), *[tx.init(m.params) for m in fms]
  )
  keys = jax.vmap(model_key, in_axes=(None, 0))(seed, jnp.arange(len(fms)))
  # The models are independent: split over devices, no step communicates.
  params, model_state, opt_state, keys = parallel.put(
    (params, model_state, opt_state, keys),
    parallel.batch_sharding(mesh)
    if split
    else parallel.replicated_sharding(mesh),
  )
  return (params, model_state, opt_state), keys


def _train_loop(step, carry, data, steps, log_every, num_models):
  """``steps`` K-model steps from ``carry``; ``(carry, last losses)``."""
  data_x, targets, keys = data
  t_log, s_log = time.perf_counter(), 0
  for t in range(steps):
    carry, losses = step(*carry, data_x, targets, keys, t)
    done = t + 1
    if done == steps or (log_every and done % log_every == 0):
      losses = parallel.to_host(losses).astype(np.float64)
      now = time.perf_counter()
      logging.info(
        "retrain step %d/%d (%d models): loss mean %.4g, %.1f steps/s",
        done,
        steps,
        num_models,
        losses.mean(),
        (done - s_log) / max(now - t_log, 1e-9),
      )
      t_log, s_log = now, done
  return carry, losses


__all__ = [
  "ModelFn",
  "RetrainResult",
  "VECTORIZE",
  "Vectorize",
  "make_step",
  "model_key",
  "model_seeds",
  "retrain",
]
