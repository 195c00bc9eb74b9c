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

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv_jax import checks, kkt
from dsv_jax.candidate_init import (
  check_candidates,
  check_images,
  class_targets,
  noise_init,
  other_init,
  real_init,
)
from dsv_jax.candidate_opt import (
  MASK,
  SOFTPLUS,
  Synthesizer,
  SynthState,
  check_lambda_init,
  initial_state,
  make_candidate_optimizer,
  masked_mean,
  synthesizer,
)
from dsv_jax.logits import logit_stats
from dsv_jax.types import ApplyFn, Params

Dual = Literal["mask", "softplus"]
DUALS: tuple[Dual, ...] = get_args(Dual)

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Image priors (OURS: the paper names them but gives no formula).


def tv_prior(x: jax.Array, active: jax.Array | None = None) -> jax.Array:
  """Squared-L2 total variation (DeepInversion's L2 TV), mean per image.

  ``mean_i [mean (x[h+1, w] - x[h, w])^2 + mean (x[h, w+1] - x[h, w])^2]``
  over the active images ``i`` of ``x[N, H, W, C]``.
  """
  dh = jnp.mean(jnp.square(x[:, 1:] - x[:, :-1]), axis=(1, 2, 3))
  dw = jnp.mean(jnp.square(x[:, :, 1:] - x[:, :, :-1]), axis=(1, 2, 3))
  return masked_mean(dh + dw, active)


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
  return masked_mean(jnp.mean(jnp.square(d), axis=(1, 2, 3)), active)


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
  stats = logit_stats(logits, labels)
  logp = stats.log_probs
  conf = jnp.exp(jnp.take_along_axis(logp, labels[:, None], -1)[:, 0])
  return {
    "confidence": conf,
    "entropy": stats.entropy,
    "margin": stats.margin,
    "prediction": jnp.argmax(logits, -1).astype(jnp.int32),
  }


# ----------------------------------------------------------------------------
# The objective (Eq. 9) and the factory.


def _kkt_term(apply_fn, params, x, lam, active, targets, *, deepkkt, only):
  """``L_kkt`` (``deepkkt``, `kkt.make_deepkkt_loss`) and its aux; with
  ``only = (gated, beta_primal)``, the primal term alone, without any
  stationarity computation (``beta_stationarity == 0``)."""
  if only is not None:
    gated, beta_primal = only
    logits = apply_fn(params, x)
    primal = kkt.primal_loss(logits, targets, gated=gated, active=active)
    aux = describe_logits(logits, targets)
    aux["stationarity"] = jnp.zeros(())
    aux["correct"] = aux["prediction"] == target_labels(targets)
    return beta_primal * primal, {**aux, "primal": primal}
  return deepkkt(params, x, targets, lam, active)


def synthesis_loss(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.Array,
  lambdas: jax.Array,
  active: jax.Array,
  targets: jax.Array,
  key: jax.Array,
  *,
  eta: float = 5.0,
  beta_primal: float = 1.0,
  beta_stationarity: float = 1.0,
  beta_tv: float = 0.0,
  beta_norm: float = 0.0,
  norm_center: jax.typing.ArrayLike = 0.0,
  gated: bool = True,
  distance: kkt.Distance = kkt.DEFAULT_DISTANCE,
  augment_fn: AugmentFn | None = None,
  method: kkt.Method = "fast",
  chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The synthesis objective (Eq. 9 with Algorithm 1's weighting).

  ``L_total = L_kkt(X) + eta * L_kkt(A(X)) + beta_tv * L_tv(X) +
  beta_norm * L_norm(X)``, ``L_kkt = beta_stationarity * L_stat +
  beta_primal * L_primal`` (`kkt.deepkkt_loss`), at multipliers
  ``lambdas`` (not their parametrisation) with augmentation key ``key``.
  The arguments are those of `make_synthesizer`.

  Returns:
    ``(total, aux)``: scalar metrics of every term, without gradient.
  """
  kkt_kw = {
    "deepkkt": kkt.make_deepkkt_loss(
      apply_fn,
      beta_stationarity=beta_stationarity,
      beta_primal=beta_primal,
      gated=gated,
      distance=distance,
      method=method,
      chunk_size=chunk_size,
    ),
    "only": (gated, beta_primal) if beta_stationarity == 0 else None,
  }
  clean, aux_c = _kkt_term(
    apply_fn, params, x, lambdas, active, targets, **kkt_kw
  )
  total = clean
  aux = {
    "kkt": clean,
    "stationarity": aux_c["stationarity"],
    "primal": aux_c["primal"],
    "entropy": masked_mean(aux_c["entropy"], active),
    "accuracy": masked_mean(aux_c["correct"].astype(jnp.float32), active),
  }
  if eta > 0:
    xa = x if augment_fn is None else augment_fn(key, x)
    aug, aux_a = _kkt_term(
      apply_fn, params, xa, lambdas, active, targets, **kkt_kw
    )
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

  `synthesis_loss` descended by `candidate_opt.make_candidate_optimizer`.
  The defaults of ``distance`` and ``dual`` are measured choices (docs/
  method.md, choices table).

  Args:
    apply_fn: ``(params, x[B, H, W, C]) -> logits[B, C]``, eval mode; the
      frozen theta* is an argument of the returned functions.
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
      `kkt.DEFAULT_DISTANCE` (``"cosine"``); the paper's is ``"l1_mean"``.
    dual: ``"softplus"`` (default) or ``"mask"`` (the paper's); see the
      module docstring.
    lambda_init: ``(low, high)``: initial lambdas are uniform in it.
    augment_fn: ``augment(key, x) -> A(x)`` (e.g. from
      `dsv_jax.augment.make_augment`); None: A is the identity.
    pixel_min, pixel_max: per-channel ``[C]`` (or scalar) bounds x is
      clipped to after every step (``DatasetInfo.pixel_min/pixel_max``);
      None: no clipping.
    method, chunk_size: passed to `kkt.deepkkt_loss`.

  Returns:
    A `Synthesizer`. ``step`` is ``step_fn`` jitted once (donating the
    state); jit ``step_fn`` yourself for shardings at the edge.

  References:
    Lee et al., "Deep Support Vectors", NeurIPS 2024, Eq. 6-9, Algorithm 1.
  """
  checks.check_choice("dual", dual, DUALS)
  checks.check_choice("distance", distance, kkt.DISTANCES)
  checks.check_choice("method", method, kkt.METHODS)
  checks.check_chunk_size(chunk_size)
  low, _ = check_lambda_init(lambda_init)
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
  objective = functools.partial(
    synthesis_loss,
    apply_fn,
    eta=eta,
    beta_primal=beta_primal,
    beta_stationarity=beta_stationarity,
    beta_tv=beta_tv,
    beta_norm=beta_norm,
    norm_center=norm_center,
    gated=gated,
    distance=distance,
    augment_fn=augment_fn,
    method=method,
    chunk_size=chunk_size,
  )
  return make_candidate_optimizer(
    apply_fn,
    objective,
    lambda_param=SOFTPLUS if dual == "softplus" else MASK,
    x_tx=x_tx,
    lambda_tx=lambda_tx,
    lambda_init=lambda_init,
    pixel_min=pixel_min,
    pixel_max=pixel_max,
  )


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
  on_metrics: Callable[[dict], None] | None = None,
  log_every: int = 0,
  callback: Callable[[int, dict], None] | None = None,
) -> SynthState:
  """Runs ``steps`` steps of ``synth`` from ``x0`` (or from ``state``).

  The lambda initialisation uses ``fold_in(key, 0)``; step t uses
  ``fold_in(fold_in(key, 1), t)``. ``on_metrics(row)`` gets the step's
  metrics as host floats with its ``"step"`` every ``log_every`` steps
  and at the last step, as every loop of the library reports
  (``callback(step, metrics)`` is its deprecated form). The steps donate
  only the library's own buffers: ``x0``, ``targets`` and a given
  ``state`` stay usable.

  Returns:
    The final `SynthState`.

  Raises:
    ValueError: non-finite ``params`` (NaN weights would make every
      image NaN, silently); `check_images` checks ``x0``.
  """
  checks.check_finite("params", params)
  if callback is not None:
    warnings.warn(
      "synthesize(callback=...) is deprecated: use on_metrics=..., which "
      "gets one row with the step under 'step'.",
      DeprecationWarning,
      stacklevel=2,
    )
    on_metrics = _step_and_metrics(callback)
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
    if on_metrics is not None and (
      (log_every and t % log_every == 0) or t == steps
    ):
      on_metrics({"step": t, **{k: float(v) for k, v in metrics.items()}})
  return state


def _step_and_metrics(callback: Callable[[int, dict], None]):
  """The deprecated ``callback(step, metrics)`` as an ``on_metrics``."""

  def on_metrics(row: dict) -> None:
    callback(row["step"], {k: v for k, v in row.items() if k != "step"})

  return on_metrics


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
  "check_candidates",
  "initial_state",
  "synthesis_loss",
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
