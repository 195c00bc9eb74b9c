"""Synthesis of Deep Support Vectors (Lee et al., NeurIPS 2024, Sec. 4, Alg. 1).

Given a frozen classifier ``apply_fn(params, x) -> logits``, candidates ``x``
(one fixed target each) and multipliers ``lambda`` are optimised with

  L_total = L_kkt(X) + eta * L_kkt(A(X)) + beta_tv * L_tv(X)
            + beta_norm * L_norm(X),     L_kkt = L_stat + beta_primal * L_primal

(the paper's Eq. 9 with Algorithm 1's weighting), by gradient
*descent* on X and lambda, each with its own optimiser, clipping X to the
dataset's valid pixel range after every step.

`make_synthesizer` is an optax-style factory returning pure functions over a
`SynthState` pytree (jit, shard and checkpoint it as-is):

  synth = make_synthesizer(apply_fn, pixel_min=info.pixel_min, ...)
  state = synth.init_fn(key, params, x0, targets)    # validates inputs
  for _ in range(steps):
    state, metrics = synth.step(state, params, targets, key)

The classifier's parameters are an argument of every function, never
closed over: a closed-over array is a constant of the compiled program
(slow compiles, one program per classifier, no effect of placing it on
devices, an error for arrays spanning hosts). ``synth.step`` is
``jax.jit(synth.step_fn, donate_argnums=(0,))``, built once per
synthesizer, so every run of it, for any classifier of the architecture,
reuses its compiled programs. Step t draws its augmentation from
``fold_in(key, t)``.

``x0`` is floating point, in the dataset's normalised space
(``DatasetInfo.normalize``; integer pixels raise a ``ValueError``). Every
array of the state ``init_fn`` returns is a fresh buffer, never the
caller's ``x0`` or ``active``, so donating the state deletes nothing the
caller holds; `synthesize` copies a ``state`` it is given for the same
reason.

Dual feasibility (lambda >= 0), two ways (``dual``):
  * ``"mask"`` (the paper's): lambda is a free scalar; a candidate whose
    lambda falls below 0 is disqualified: its `active` flag goes False, it
    leaves every loss term and is frozen (shapes never change).
  * ``"softplus"``: lambda = softplus(s) with s free; lambda stays positive,
    so no candidate is ever removed.

Initialisation helpers (`noise_init`, `real_init`, `other_init`,
`check_images`), targets (`one_hot`, `blend_targets`), a plain loop
(`synthesize`), and ready editing / interpolation functions (`edit`,
`interpolate`) are provided too. All randomness is derived from keys: the
augmentation of step t uses ``fold_in(key, t)``, so a run resumed from a
checkpoint reproduces an uninterrupted one.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv_jax import checks, kkt
from dsv_jax.types import ApplyFn, Params

Dual = Literal["mask", "softplus"]
DUALS: tuple[Dual, ...] = get_args(Dual)

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


class SynthState(NamedTuple):
  """Everything a synthesis run needs to continue (a checkpointable pytree).

  Attributes:
    step: int32 scalar, optimiser steps taken.
    x: ``[N, H, W, C]`` candidates in the dataset's normalised space.
    lambda_param: ``[N]`` free lambda variable (lambda itself for
      ``dual="mask"``, s with lambda = softplus(s) for ``"softplus"``).
    active: ``bool[N]`` dual-feasibility mask.
    opt_x: optimiser state of x.
    opt_lambda: optimiser state of lambda_param.
  """

  step: jax.Array
  x: jax.Array
  lambda_param: jax.Array
  active: jax.Array
  opt_x: optax.OptState
  opt_lambda: optax.OptState


class Synthesizer(NamedTuple):
  """Pure functions of a synthesis run (see `make_synthesizer`).

  Attributes:
    init_fn: ``(key, params, x0[N, H, W, C], targets, active=None) ->
      SynthState``; draws the initial lambdas from ``key`` and checks the
      inputs against the model (``x0`` floating, normalised). ``active``
      (``bool[N]``, default all True) marks rows that take part (e.g.
      False on padding rows added for sharding). The state holds copies of
      ``x0`` and ``active``, so donating it leaves the caller's arrays
      alone.
    step_fn: ``(state, params, targets, key) -> (state, metrics)``; one
      optimiser step. Metrics are scalars computed at the state before the
      update, except ``num_active`` and ``survival`` (after it).
    lambdas_fn: ``state -> float[N]`` multipliers lambda.
    loss_fn: ``(params, x, lambda_param, active, targets, key) -> (total,
      aux)``, the objective at step key ``key`` (already folded with the
      step).
    step: ``step_fn`` jitted once, donating the state (see the module
      docstring).
  """

  init_fn: Callable[..., SynthState]
  step_fn: Callable[..., tuple[SynthState, dict[str, jax.Array]]]
  lambdas_fn: Callable[[SynthState], jax.Array]
  loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  step: Callable[..., tuple[SynthState, dict[str, jax.Array]]]


def synthesizer(init_fn, step_fn, lambdas_fn, loss_fn) -> Synthesizer:
  """A `Synthesizer` of these pure functions, with its jitted step."""
  step = jax.jit(step_fn, donate_argnums=(0,))
  return Synthesizer(init_fn, step_fn, lambdas_fn, loss_fn, step)


# ----------------------------------------------------------------------------
# Image priors (OURS: the paper names them but gives no formula).


def _masked_mean(per_image: jax.Array, active: jax.Array | None) -> jax.Array:
  if active is None:
    return jnp.mean(per_image)
  count = jnp.maximum(jnp.sum(active), 1)
  return jnp.sum(jnp.where(active, per_image, 0.0)) / count


def tv_prior(x: jax.Array, active: jax.Array | None = None) -> jax.Array:
  """Squared-L2 total variation (DeepInversion's L2 TV), mean per image.

  ``mean_i [mean (x[h+1, w] - x[h, w])^2 + mean (x[h, w+1] - x[h, w])^2]``
  over the active images ``i`` of ``x[N, H, W, C]``.
  """
  dh = jnp.mean(jnp.square(x[:, 1:] - x[:, :-1]), axis=(1, 2, 3))
  dw = jnp.mean(jnp.square(x[:, :, 1:] - x[:, :, :-1]), axis=(1, 2, 3))
  return _masked_mean(dh + dw, active)


def norm_prior(
  x: jax.Array,
  active: jax.Array | None = None,
  center: jax.typing.ArrayLike = 0.0,
) -> jax.Array:
  """Per-image squared distance per pixel to ``center``,
  ``mean_i mean_p (x_ip - center)^2``.

  In normalised space 0 is the dataset mean, so by default this pulls
  candidates towards the mean image (DeepInversion's L2 prior, scaled per
  pixel); ``center = pixel_min`` pulls the pixels the classifier does not
  use towards the darkest value, the background of digit and clothing
  images.
  """
  d = x - jnp.asarray(center, x.dtype)
  return _masked_mean(jnp.mean(jnp.square(d), axis=(1, 2, 3)), active)


# ----------------------------------------------------------------------------
# Inputs.


def one_hot(labels: jax.typing.ArrayLike, num_classes: int) -> jax.Array:
  """Int labels ``[N]`` to one-hot float32 ``[N, C]``."""
  return jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)


def blend_targets(
  labels_a: jax.typing.ArrayLike,
  labels_b: jax.typing.ArrayLike,
  delta: jax.typing.ArrayLike,
  num_classes: int,
) -> jax.Array:
  """Soft targets ``(1 - delta) y_a + delta y_b`` (labels as latents, Sec. 5.2).

  Args:
    labels_a: int ``[N]`` first classes.
    labels_b: int ``[N]`` second classes.
    delta: scalar or ``[N]`` blend weights in [0, 1] (paper: 0.6).
    num_classes: C.

  Returns:
    float32 ``[N, C]`` rows summing to 1.
  """
  delta = jnp.asarray(delta, jnp.float32)
  if delta.ndim == 0:
    delta = jnp.full(jnp.shape(labels_a), delta)
  if not isinstance(delta, jax.core.Tracer) and (
    float(jnp.min(delta)) < 0 or float(jnp.max(delta)) > 1
  ):
    raise ValueError(f"delta must lie in [0, 1], got {np.asarray(delta)}.")
  ya, yb = one_hot(labels_a, num_classes), one_hot(labels_b, num_classes)
  return (1.0 - delta)[:, None] * ya + delta[:, None] * yb


def target_labels(targets: jax.typing.ArrayLike) -> jax.Array:
  """Int labels of targets: the labels, or the argmax of soft targets."""
  targets = jnp.asarray(targets)
  return targets if targets.ndim == 1 else jnp.argmax(targets, axis=-1)


def check_images(
  x: Any, image_shape: Sequence[int] | None = None, *, name: str = "x0"
) -> None:
  """Checks candidate images; raises a clear `ValueError`.

  Checks rank 4, the per-image shape (if given), a floating dtype (images
  normalised as ``DatasetInfo.normalize`` does: integer pixels are never
  converted silently) and that every pixel is finite. Tracers (inside jit)
  get the shape and dtype checks only.
  """
  if checks.is_concrete(x):
    x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"{name} must be images [N, H, W, C], got {x.shape}.")
  if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
    raise ValueError(
      f"{name} has images of shape {tuple(x.shape[1:])}; the model expects "
      f"{tuple(image_shape)}."
    )
  checks.check_floating_images(x, name)
  if not checks.is_concrete(x):
    return
  finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(
      f"{name} contains NaN or Inf in {bad.size} image(s), first at index "
      f"{bad[0]}."
    )


def noise_init(
  key: jax.Array, num: int, image_shape: Sequence[int], *, scale: float = 1.0
) -> jax.Array:
  """``num`` images of N(0, scale^2) noise in normalised space (Alg. 1)."""
  return scale * jax.random.normal(key, (num, *image_shape), jnp.float32)


def class_targets(num_per_class: int, num_classes: int) -> np.ndarray:
  """int32 ``[num_per_class * C]`` labels, class-major (0,0,..,1,1,..)."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), num_per_class)


def real_init(
  key: jax.Array, split: dict, labels: jax.typing.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
  """Real images of the requested classes (k-shot initialisation).

  For each class, distinct images of that class are drawn without
  replacement (a permutation from ``key``), in order of ``labels``.

  Args:
    key: PRNG key of the draw.
    split: ``{"image": [M, H, W, C], "label": [M]}``, e.g. the training split.
    labels: int ``[N]`` classes wanted.

  Returns:
    ``(images[N, H, W, C], indices[N])`` into ``split``.

  Raises:
    ValueError: a class has fewer images than requested.
  """
  labels = np.asarray(labels)
  split_labels = np.asarray(split["label"])
  order = np.asarray(jax.random.permutation(key, len(split_labels)))
  idx = np.empty(len(labels), np.int32)
  for c in np.unique(labels):
    pool = order[split_labels[order] == c]
    want = np.flatnonzero(labels == c)
    if len(pool) < len(want):
      raise ValueError(
        f"class {c}: {len(want)} real images requested, only {len(pool)} "
        "available."
      )
    idx[want] = pool[: len(want)]
  return np.asarray(split["image"])[idx], idx


def other_init(
  key: jax.Array,
  images: jax.typing.ArrayLike,
  num: int,
  *,
  src_info: Any,
  dst_info: Any,
) -> tuple[np.ndarray, np.ndarray]:
  """Images of another dataset mapped into this one (the 0-shot rows).

  Draws ``num`` images (without replacement) from ``images`` (normalised
  with ``src_info``), maps them to raw pixels, resizes them (bilinear,
  antialiased) to ``dst_info.image_shape``, converts channels (mean over
  channels to go to grey, repetition to go to colour) and normalises them
  with ``dst_info``.

  Returns:
    ``(images[num, H, W, C], indices[num])`` into ``images``.
  """
  images = np.asarray(images)
  checks.check_floating_images(images, "images")
  if num > len(images):
    raise ValueError(f"{num} images requested, {len(images)} available.")
  idx = np.asarray(jax.random.permutation(key, len(images)))[:num]
  raw = jnp.asarray(src_info.denormalize(images[idx]))
  h, w, c = dst_info.image_shape
  raw = jax.image.resize(raw, (num, h, w, raw.shape[-1]), "linear")
  if raw.shape[-1] != c:
    raw = jnp.mean(raw, axis=-1, keepdims=True)
    raw = jnp.repeat(raw, c, axis=-1)
  out = dst_info.normalize(np.asarray(jnp.clip(raw, 0.0, 1.0)))
  return out.astype(np.float32), idx.astype(np.int32)


def check_candidates(
  apply_fn: ApplyFn, params: Params, x0: jax.Array, targets: jax.Array
) -> None:
  """Raises ValueError unless candidates fit the model and their targets.

  ``x0`` must be images ``[N, H, W, C]`` the model accepts; ``targets``
  int labels ``[N]`` or soft targets ``float[N, C]`` matching the logits
  (label range and soft-row sums checked when concrete).
  """
  x0 = jnp.asarray(x0)
  targets = jnp.asarray(targets)
  check_images(x0)
  if x0.ndim != 4:
    raise ValueError(f"x0 must be images [N, H, W, C], got {x0.shape}.")
  try:
    out = jax.eval_shape(apply_fn, params, x0)
  except Exception as e:  # noqa: BLE001 -- reported, with e as the cause.
    raise ValueError(
      f"x0 of shape {x0.shape} does not fit the model "
      f"({checks.error_summary(e)})."
    ) from e
  if targets.ndim not in (1, 2) or targets.shape[0] != x0.shape[0]:
    raise ValueError(
      f"targets of shape {targets.shape} do not match the {x0.shape[0]} "
      "candidates of x0 (need int [N] or soft float [N, C])."
    )
  kkt.primal_loss(jnp.zeros(out.shape, jnp.float32), targets)


def initial_state(
  x: jax.Array,
  lambda_param: jax.Array,
  active: jax.Array | None,
  *,
  x_tx: optax.GradientTransformation,
  lambda_tx: optax.GradientTransformation,
) -> SynthState:
  """A step-0 `SynthState` (all candidates active unless ``active``).

  Every array is a fresh buffer: the state is meant to be donated to the
  jitted step, which must not delete the caller's ``x`` or ``active``.
  """
  n = x.shape[0]
  x, lambda_param = jnp.copy(x), jnp.copy(lambda_param)
  return SynthState(
    step=jnp.zeros((), jnp.int32),
    x=x,
    lambda_param=lambda_param,
    active=(
      jnp.ones((n,), jnp.bool_)
      if active is None
      else jnp.array(active, jnp.bool_, copy=True)
    ),
    opt_x=x_tx.init(x),
    opt_lambda=lambda_tx.init(lambda_param),
  )


def describe(
  apply_fn: ApplyFn, params: Params, x: jax.Array, targets: jax.Array
) -> dict[str, jax.Array]:
  """Source-model diagnostics of candidates: float32 ``[N]`` each.

  ``confidence``: softmax probability of the target class (argmax of a soft
  target); ``entropy``: predictive entropy; ``margin``: target logit minus
  the largest other logit; ``prediction``: int32 argmax.
  """
  return describe_logits(apply_fn(params, x), targets)


def describe_logits(
  logits: jax.Array, targets: jax.Array
) -> dict[str, jax.Array]:
  """`describe` from logits ``[N, C]`` already computed."""
  labels = target_labels(targets)
  logp = jax.nn.log_softmax(logits)
  conf = jnp.exp(jnp.take_along_axis(logp, labels[:, None], -1)[:, 0])
  target_logit = jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1]), -jnp.inf, logits)
  return {
    "confidence": conf,
    "entropy": -jnp.sum(jnp.exp(logp) * logp, axis=-1),
    "margin": target_logit - jnp.max(others, axis=-1),
    "prediction": jnp.argmax(logits, -1).astype(jnp.int32),
  }


# ----------------------------------------------------------------------------
# The factory.


def make_synthesizer(
  apply_fn: ApplyFn,
  *,
  x_tx: optax.GradientTransformation | None = None,
  lambda_tx: optax.GradientTransformation | None = None,
  eta: float = 5.0,
  beta_primal: float = 1.0,
  beta_stationarity: float = 1.0,
  beta_tv: float = 0.0,
  beta_norm: float = 0.0,
  norm_center: jax.typing.ArrayLike = 0.0,
  gated: bool = True,
  distance: kkt.Distance = kkt.DEFAULT_DISTANCE,
  dual: Dual = "softplus",
  lambda_init: tuple[float, float] = (0.5, 1.0),
  augment_fn: AugmentFn | None = None,
  pixel_min: jax.typing.ArrayLike | None = None,
  pixel_max: jax.typing.ArrayLike | None = None,
  method: kkt.Method = "fast",
  chunk_size: int | None = None,
) -> Synthesizer:
  """Builds the pure functions of DSV synthesis (Algorithm 1).

  Args:
    apply_fn: ``(params, x[B, H, W, C]) -> logits[B, C]``, eval mode.
    params: the frozen trained theta* (closed over, never updated).
    x_tx: optimiser of the images (default ``optax.adam(0.01)``).
    lambda_tx: optimiser of the lambda variable (default
      ``optax.adam(0.05)``).
    eta: weight of the augmented DeepKKT term (paper: 5). 0 skips it.
    beta_primal: weight beta1 of the primal term inside L_kkt.
    beta_stationarity: weight of the stationarity term (1 in the paper);
      0 gives the primal-only (cross-entropy) ablation, which skips the
      stationarity computation entirely.
    beta_tv: weight beta2 of `tv_prior`.
    beta_norm: weight beta3 of `norm_prior`.
    norm_center: the image `norm_prior` pulls towards (a scalar or one
      value per channel, normalised space): 0 the dataset mean, ``pixel_min``
      a dark background.
    gated: gated primal cross-entropy (Eq. 7); False: plain mean CE.
    distance: stationarity distance, one of `kkt.DISTANCES`. Default
      `kkt.DEFAULT_DISTANCE` (``"cosine"``, measured: see there); the
      paper's is ``"l1_mean"``.
    dual: ``"softplus"`` (default, measured) or ``"mask"`` (the paper's);
      see the module docstring.
    lambda_init: ``(low, high)``: initial lambdas are uniform in it.

  Defaults (measured on digits, noise init, 10 candidates per class, 300
  steps; agreement of an independently trained classifier with the
  targets): the distance is `kkt.DEFAULT_DISTANCE` (cosine; the numbers
  are there). ``dual="softplus"`` keeps every candidate (survival 1.0) at
  equal or better agreement than ``"mask"``, which lost every candidate in
  3 of 4 runs under the L1 distance. See the synthesis section of the
  README for the numbers and commands.
    augment_fn: ``augment(key, x) -> A(x)`` (e.g. from
      `dsv_jax.augment.make_augment`); None: A is the identity.
    pixel_min, pixel_max: per-channel ``[C]`` (or scalar) bounds x is
      clipped to after every step (``DatasetInfo.pixel_min/pixel_max``);
      None: no clipping.
    method, chunk_size: passed to `kkt.deepkkt_loss`.

  Returns:
    A `Synthesizer`. Nothing is jitted: the caller jits ``step_fn`` (with
    ``donate_argnums=(0,)`` and shardings at the edge).

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 6-9, Algorithm 1.
  """
  checks.check_choice("dual", dual, DUALS)
  checks.check_choice("distance", distance, kkt.DISTANCES)
  checks.check_choice("method", method, kkt.METHODS)
  checks.check_chunk_size(chunk_size)
  low, high = map(float, lambda_init)
  if not low <= high:
    raise ValueError(f"lambda_init must be (low, high), got {lambda_init}.")
  if dual == "softplus" and low <= 0:
    raise ValueError(
      f"dual='softplus' needs lambda_init low > 0, got {lambda_init}."
    )
  for name, v in [
    ("eta", eta),
    ("beta_primal", beta_primal),
    ("beta_stationarity", beta_stationarity),
    ("beta_tv", beta_tv),
    ("beta_norm", beta_norm),
  ]:
    if v < 0:
      raise ValueError(f"{name} must be >= 0, got {v}.")
  x_tx = optax.adam(0.01) if x_tx is None else x_tx
  lambda_tx = optax.adam(0.05) if lambda_tx is None else lambda_tx
  lo = None if pixel_min is None else jnp.asarray(pixel_min, jnp.float32)
  hi = None if pixel_max is None else jnp.asarray(pixel_max, jnp.float32)
  kkt_kw = {
    "beta_stationarity": beta_stationarity,
    "beta_primal": beta_primal,
    "gated": gated,
    "distance": distance,
    "method": method,
    "chunk_size": chunk_size,
  }

  def to_lambda(lambda_param):
    if dual == "softplus":
      return jax.nn.softplus(lambda_param)
    return lambda_param

  def from_lambda(lam):
    if dual == "softplus":
      # Inverse softplus, stable for large lambda: s = lam + log(-expm1(-lam)).
      return lam + jnp.log(-jnp.expm1(-lam))
    return lam

  def clip(x):
    if lo is None and hi is None:
      return x
    return jnp.clip(x, lo, hi)

  def init_fn(key, params, x0, targets, active=None) -> SynthState:
    check_candidates(apply_fn, params, x0, targets)
    lam = jax.random.uniform(key, (x0.shape[0],), jnp.float32, low, high)
    return initial_state(
      clip(jnp.asarray(x0, jnp.float32)),
      from_lambda(lam),
      active,
      x_tx=x_tx,
      lambda_tx=lambda_tx,
    )

  def kkt_term(params, x, lam, active, targets):
    if beta_stationarity == 0:
      logits = apply_fn(params, x)
      primal = kkt.primal_loss(logits, targets, gated=gated, active=active)
      aux = describe_logits(logits, targets)
      aux["stationarity"] = jnp.zeros(())
      aux["correct"] = aux["prediction"] == target_labels(targets)
      return beta_primal * primal, {**aux, "primal": primal}
    return kkt.deepkkt_loss(
      apply_fn, params, x, targets, lam, active=active, **kkt_kw
    )

  def loss_fn(params, x, lambda_param, active, targets, key):
    lam = to_lambda(lambda_param)
    clean, aux_c = kkt_term(params, x, lam, active, targets)
    total = clean
    aux = {
      "kkt": clean,
      "stationarity": aux_c["stationarity"],
      "primal": aux_c["primal"],
      "entropy": _masked_mean(aux_c["entropy"], active),
      "accuracy": _masked_mean(aux_c["correct"].astype(jnp.float32), active),
    }
    if eta > 0:
      xa = x if augment_fn is None else augment_fn(key, x)
      aug, aux_a = kkt_term(params, xa, lam, active, targets)
      total = total + eta * aug
      aux.update(
        kkt_aug=aug,
        stationarity_aug=aux_a["stationarity"],
        primal_aug=aux_a["primal"],
      )
    if beta_tv > 0:
      tv = tv_prior(x, active)
      total = total + beta_tv * tv
      aux["tv"] = tv
    if beta_norm > 0:
      nrm = norm_prior(x, active, norm_center)
      total = total + beta_norm * nrm
      aux["norm"] = nrm
    aux["total"] = total
    aux = jax.tree.map(jax.lax.stop_gradient, aux)
    return total, aux

  def step_fn(state: SynthState, params, targets, key):
    targets = jnp.asarray(targets)
    step_key = jax.random.fold_in(key, state.step)
    grad_fn = jax.grad(loss_fn, argnums=(1, 2), has_aux=True)
    (gx, gl), aux = grad_fn(
      params, state.x, state.lambda_param, state.active, targets, step_key
    )
    ux, opt_x = x_tx.update(gx, state.opt_x, state.x)
    ul, opt_lambda = lambda_tx.update(gl, state.opt_lambda, state.lambda_param)
    # Disqualified candidates are frozen: the optimiser's momentum must not
    # keep moving them after their gradient became zero.
    act = state.active
    ux = jnp.where(act.reshape(-1, *([1] * (ux.ndim - 1))), ux, 0.0)
    ul = jnp.where(act, ul, 0.0)
    x = clip(state.x + ux)
    lambda_param = state.lambda_param + ul
    active = act
    if dual == "mask":
      active = act & (lambda_param >= 0)
    lam = to_lambda(lambda_param)
    new = SynthState(state.step + 1, x, lambda_param, active, opt_x, opt_lambda)
    n_active = jnp.sum(active, dtype=jnp.int32)
    aux.update(
      num_active=n_active,
      survival=n_active / active.shape[0],
      lambda_mean=_masked_mean(lam, active),
      lambda_min=jnp.min(jnp.where(active, lam, jnp.inf)),
    )
    return new, aux

  def lambdas_fn(state: SynthState) -> jax.Array:
    return to_lambda(state.lambda_param)

  return synthesizer(init_fn, step_fn, lambdas_fn, loss_fn)


# ----------------------------------------------------------------------------
# Loops and ready-made uses.


def synthesize(
  synth: Synthesizer,
  params: Params,
  key: jax.Array,
  x0: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  *,
  steps: int,
  state: SynthState | None = None,
  callback: Callable[[int, dict], None] | None = None,
  log_every: int = 0,
) -> SynthState:
  """Runs ``steps`` steps of ``synth`` from ``x0`` (or from ``state``).

  The lambda initialisation uses ``fold_in(key, 0)``; step t uses
  ``fold_in(fold_in(key, 1), t)``. ``callback(step, metrics)`` gets host
  floats every ``log_every`` steps (and at the last step). The steps
  donate only the library's own buffers: ``x0``, ``targets`` and a given
  ``state`` stay usable.

  Returns:
    The final `SynthState`.

  Raises:
    ValueError: non-finite ``params`` (NaN weights would make every
      image NaN, silently); `check_images` checks ``x0``.
  """
  checks.check_finite("params", params)
  targets = jnp.asarray(targets)
  if state is None:
    state = synth.init_fn(jax.random.fold_in(key, 0), params, x0, targets)
  else:
    # The step donates its input state: copy the caller's (e.g. a state
    # returned by an earlier call, resumed here) so it is not deleted.
    state = jax.tree.map(jnp.copy, state)
  step_key = jax.random.fold_in(key, 1)
  start = int(state.step)
  for t in range(start + 1, steps + 1):
    state, metrics = synth.step(state, params, targets, step_key)
    if callback is not None and (
      (log_every and t % log_every == 0) or t == steps
    ):
      callback(t, {k: float(v) for k, v in metrics.items()})
  return state


def edit(
  apply_fn: ApplyFn,
  params: Params,
  images: jax.typing.ArrayLike,
  new_targets: jax.typing.ArrayLike,
  key: jax.Array,
  *,
  steps: int,
  **synth_kwargs: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Edits real images towards new targets with the DSV objective (Sec. 5.2).

  Args:
    apply_fn, params: the frozen classifier.
    images: floating ``[N, H, W, C]`` starting images (normalised).
    new_targets: int ``[N]`` or soft ``[N, C]`` targets to move them to.
    key: PRNG key.
    steps: optimisation steps.
    **synth_kwargs: keyword arguments of `make_synthesizer`.

  Returns:
    ``(edited[N, H, W, C], lambdas[N], active[N])``.
  """
  check_images(images, name="images")
  synth = make_synthesizer(apply_fn, **synth_kwargs)
  state = synthesize(synth, params, key, images, new_targets, steps=steps)
  return state.x, synth.lambdas_fn(state), state.active


def interpolate(
  apply_fn: ApplyFn,
  params: Params,
  x0: jax.typing.ArrayLike,
  class_a: int,
  class_b: int,
  deltas: Sequence[float],
  key: jax.Array,
  *,
  steps: int,
  num_classes: int,
  **synth_kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
  """Sweeps soft targets ``(1 - delta) y_a + delta y_b`` from one start.

  Every delta gets its own candidate, all starting from the same image
  ``x0`` (``[H, W, C]``, e.g. a real image of class a or noise) and
  optimised together in one batch.

  Returns:
    ``(images[len(deltas), H, W, C], targets[len(deltas), C])``.
  """
  x0 = jnp.asarray(x0)
  if x0.ndim != 3:
    raise ValueError(f"x0 must be one image [H, W, C], got {x0.shape}.")
  checks.check_floating_images(x0, "x0")
  k = len(deltas)
  targets = blend_targets(
    jnp.full((k,), class_a, jnp.int32),
    jnp.full((k,), class_b, jnp.int32),
    jnp.asarray(deltas, jnp.float32),
    num_classes,
  )
  x = jnp.broadcast_to(x0, (k, *x0.shape))
  synth = make_synthesizer(apply_fn, **synth_kwargs)
  state = synthesize(synth, params, key, x, targets, steps=steps)
  return state.x, targets


__all__ = [
  "DUALS",
  "Dual",
  "SynthState",
  "Synthesizer",
  "blend_targets",
  "check_images",
  "class_targets",
  "describe",
  "describe_logits",
  "edit",
  "interpolate",
  "make_synthesizer",
  "noise_init",
  "norm_prior",
  "one_hot",
  "other_init",
  "real_init",
  "synthesize",
  "synthesizer",
  "target_labels",
  "tv_prior",
]
