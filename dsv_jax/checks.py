"""Argument checks shared by the library's public functions.

Every public function of `dsv_jax.kkt`, `dsv_jax.select`,
`dsv_jax.synthesize` and `dsv_jax.retrain` validates its arguments at the
edge with these, so one argument gets one message wherever it is passed.
Shapes and dtypes are checked at trace time (they work on tracers); values
(label ranges, soft-row sums, the sign of multipliers) only for concrete
arrays, so the checks cost nothing inside ``jit``, ``grad`` or ``vmap``.
Every failure is a ``ValueError`` naming the argument, what it must be and
what it got.

Images are floating point everywhere, in the normalised space the model
was trained in (`dsv_jax.data.DatasetInfo.normalize`). Integer pixels are
rejected rather than converted: 8-bit pixels lie in [0, 255], two orders
of magnitude outside that space, and a silent ``astype(float32)`` would
let every loss run on them without a word.

Non-finite values (NaN, inf) are checked where data enters a whole run,
once, on concrete arrays: `select.fit_lambdas` (images ``x`` and the
classifier's ``params``) and `synthesize.synthesize` (its starting images,
through `synthesize.check_images`, and ``params``; `synthesize.edit` and
`synthesize.interpolate` run it too) raise a `ValueError` naming the
argument. The DeepKKT functions of `dsv_jax.kkt` and a `Synthesizer`'s
step do not: they are the pieces those runs call inside ``jit`` and
``grad``, where no value can be looked at, and like any JAX function they
return NaN for NaN inputs. Check your own inputs with `check_finite` when
calling them directly.

Hand-written rather than chex assertions: chex raises ``AssertionError``
with a generic message ("input 0 has rank 3"), where these name the
argument and the expected layout (``[N, C]``, the sample count of ``x``),
and importing chex loads ``absl.app`` (this module imports jax only).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv_jax.types import ApplyFn, Params

# Soft targets are accepted when every row sums to 1 within this tolerance
# (or 8 machine epsilons of their dtype, whichever is larger: bf16 rows).
SOFT_TARGET_ATOL = 1e-4


def is_concrete(a: Any) -> bool:
  """Whether ``a`` holds values (not a tracer inside a transformation)."""
  return not isinstance(a, jax.core.Tracer)


def error_summary(error: BaseException, *, max_chars: int = 300) -> str:
  """``"Type: first line of the message"``, for a one-line error report,
  cut to `max_chars` (tensorstore's first line holds whole JSON specs).

  Pair it with ``raise ... from error``: the summary says what failed, the
  chained cause keeps the whole message and traceback.

  Examples:
    >>> from dsv_jax import checks
    >>> checks.error_summary(ZeroDivisionError("division by zero\\nmore"))
    'ZeroDivisionError: division by zero'
  """
  lines = str(error).strip().splitlines()
  name = type(error).__name__
  text = f"{name}: {lines[0]}" if lines else name
  return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises unless ``value`` is one of ``choices``.

  Examples:
    >>> from dsv_jax import checks
    >>> checks.check_choice("distance", "l3", ("l1_mean", "cosine"))
    Traceback (most recent call last):
    ...
    ValueError: distance must be one of ('l1_mean', 'cosine'), got 'l3'.
  """
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_chunk_size(chunk_size: int | None) -> None:
  """Raises unless ``chunk_size`` is a positive int or None."""
  if chunk_size is not None and (
    not isinstance(chunk_size, int) or chunk_size < 1
  ):
    raise ValueError(
      f"chunk_size must be a positive int or None, got {chunk_size!r}."
    )


def check_targets_shape(targets: jax.Array, n: int | None) -> None:
  """Int labels ``[N]`` or floating soft targets ``[N, C]``, N = ``n``."""
  if targets.ndim == 1:
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise ValueError(
        f"1-D targets must be integer labels, got dtype {targets.dtype}."
      )
  elif targets.ndim == 2:
    if not jnp.issubdtype(targets.dtype, jnp.floating):
      raise ValueError(
        f"2-D (soft) targets must be floating, got dtype {targets.dtype}."
      )
  else:
    raise ValueError(
      "targets must be int labels [N] or soft targets float[N, C], got shape "
      f"{targets.shape}."
    )
  if n is not None and targets.shape[0] != n:
    raise ValueError(
      f"targets has {targets.shape[0]} rows but x has {n} samples."
    )


def check_logits_vs_targets(
  logits_shape: Sequence[int], targets: jax.Array, what: str
) -> int:
  """Checks ``[N, C]`` logits (named ``what``) against targets; returns C."""
  if len(logits_shape) != 2:
    raise ValueError(
      f"{what} must be logits of shape [N, C], got shape {tuple(logits_shape)}."
    )
  n, c = logits_shape
  if n != targets.shape[0]:
    raise ValueError(f"{what} has {n} rows but targets has {targets.shape[0]}.")
  if targets.ndim == 2 and targets.shape[1] != c:
    raise ValueError(
      f"soft targets have {targets.shape[1]} classes but {what} has {c}."
    )
  return c


def check_target_values(targets: Any, num_classes: int) -> None:
  """Labels in ``[0, num_classes)``, soft rows non-negative summing to 1.

  Skipped under tracing (jit, grad, vmap).
  """
  if not is_concrete(targets):
    return
  # On the host: jnp reductions would be traced when a concrete array is
  # closed over by a jitted function.
  targets = jax.device_get(targets)
  if targets.ndim == 1:
    if targets.size and (
      int(targets.min()) < 0 or int(targets.max()) >= num_classes
    ):
      raise ValueError(
        f"int targets must lie in [0, {num_classes}), got values in "
        f"[{int(targets.min())}, {int(targets.max())}]."
      )
  else:
    eps = float(jnp.finfo(targets.dtype).eps)
    atol = max(SOFT_TARGET_ATOL, 8 * eps)
    row_sums = targets.sum(axis=-1)
    if (targets < 0).any() or (abs(row_sums - 1) > atol).any():
      raise ValueError(
        "soft targets must be non-negative rows summing to 1 (atol "
        f"{atol:g}); row sums lie in [{float(row_sums.min()):g}, "
        f"{float(row_sums.max()):g}] and the minimum entry is "
        f"{float(targets.min()):g}."
      )


def check_class_sizes(
  sizes: Sequence[int], k: int, purpose: str, *, what: str = "samples"
) -> None:
  """Raises a ValueError naming the first class with fewer than ``k``
  ``what``: "class 3 has 2 samples, fewer than the 5 ``purpose``"."""
  for c, size in enumerate(sizes):
    if size < k:
      raise ValueError(
        f"class {c} has {size} {what}, fewer than the {k} {purpose}."
      )


def check_floating_images(x: Any, name: str = "x") -> None:
  """Raises unless ``x`` is floating point (works on tracers: dtype only).

  Examples:
    >>> import numpy as np
    >>> from dsv_jax import checks
    >>> checks.check_floating_images(np.zeros((2, 8, 8, 1), np.uint8))
    Traceback (most recent call last):
    ...
    ValueError: x must be floating point, normalised as ... got uint8; ...
  """
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"{name} must be floating point, normalised as DatasetInfo.normalize "
      "does (raw pixels in [0, 1] map to [DatasetInfo.pixel_min, "
      f"DatasetInfo.pixel_max]), got {dtype}; convert 8-bit images with "
      "info.normalize(images / 255)."
    )


def host_float32_images(x: Any, name: str = "x") -> np.ndarray:
  """``x`` as a float32 host array, after `check_floating_images` (integer
  pixels are never converted silently)."""
  x = np.asarray(x)
  check_floating_images(x, name)
  return x.astype(np.float32, copy=False)


def check_nonnegative_lambdas(lambdas: Any, active: Any = None) -> None:
  """Dual feasibility: raises if a multiplier (of an active row) is < 0.

  Rows with ``active[i]`` False are not checked: a disqualified candidate
  takes no part, whatever its lambda. Skipped under tracing (jit, grad,
  vmap), where the values are unknown.

  Examples:
    >>> import numpy as np
    >>> from dsv_jax import checks
    >>> lambdas = np.array([0.5, -0.25, 1.0])
    >>> active = np.array([True, False, True])
    >>> checks.check_nonnegative_lambdas(lambdas, active)  # lambdas[1] is off
    >>> checks.check_nonnegative_lambdas(lambdas)
    Traceback (most recent call last):
    ...
    ValueError: lambdas must be >= 0 (dual feasibility), got lambdas[1] = ...
  """
  if not is_concrete(lambdas) or not is_concrete(active):
    return
  # On the host, as in `check_target_values`.
  values = np.asarray(jax.device_get(lambdas))
  negative = values < 0
  if active is not None:
    negative &= np.asarray(jax.device_get(active), bool)
  if negative.any():
    first = int(negative.argmax())
    rows = " active" if active is not None else ""
    raise ValueError(
      f"lambdas must be >= 0 (dual feasibility), got lambdas[{first}] = "
      f"{float(values[first]):g} ({int(negative.sum())} negative{rows})."
    )


def check_finite(name: str, tree: Any) -> None:
  """Raises unless every value of every array of ``tree`` is finite.

  Skipped for tracers (inside jit, grad, vmap), where values are unknown.

  Examples:
    >>> import numpy as np
    >>> from dsv_jax import checks
    >>> checks.check_finite("params", {"w": np.array([1.0, np.nan])})
    Traceback (most recent call last):
    ...
    ValueError: params contains NaN or inf values (leaf ['w']: 1 of 2).
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not is_concrete(leaf):
      continue
    values = np.asarray(jax.device_get(leaf))
    if not jnp.issubdtype(values.dtype, jnp.inexact):
      continue
    bad = int(values.size - np.isfinite(values).sum())
    if bad:
      where = jax.tree_util.keystr(path)
      leaf_name = f"leaf {where}: " if where else ""
      raise ValueError(
        f"{name} contains NaN or inf values ({leaf_name}{bad} of "
        f"{values.size})."
      )


def check_active(active: jax.Array, n: int) -> None:
  """A dual-feasibility mask must be ``bool[n]``."""
  if active.shape != (n,) or active.dtype != jnp.bool_:
    raise ValueError(
      f"active must be bool[N] = bool[{n}], got {active.dtype}"
      f"{list(active.shape)}."
    )


def check_kkt_inputs(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.Array,
  targets: jax.Array,
  lambdas: jax.Array | None = None,
  active: jax.Array | None = None,
) -> int:
  """Checks the arguments of a DeepKKT function (`dsv_jax.kkt`); returns C.

  ``x`` needs a leading sample axis N and a floating dtype; ``targets``
  must fit it and the logits of ``apply_fn(params, x)`` (evaluated
  abstractly: no FLOPs, and it works on tracers); ``lambdas`` must be
  ``float[N]``, non-negative where concrete (on the active rows), and
  ``active`` ``bool[N]`` when given.
  """
  if x.ndim < 1:
    raise ValueError("x must have a leading sample axis [N, ...].")
  check_floating_images(x)
  n = x.shape[0]
  check_targets_shape(targets, n)
  if lambdas is not None:
    if lambdas.shape != (n,):
      raise ValueError(
        f"lambdas must have shape [N] = ({n},), got {lambdas.shape}."
      )
    if not jnp.issubdtype(lambdas.dtype, jnp.floating):
      raise ValueError(f"lambdas must be floating, got {lambdas.dtype}.")
  if active is not None:
    check_active(active, n)
  if lambdas is not None:
    check_nonnegative_lambdas(lambdas, active)
  # Abstract evaluation: no FLOPs, and it works on tracers too.
  out = jax.eval_shape(apply_fn, params, x)
  if not hasattr(out, "shape"):
    raise ValueError(
      f"apply_fn must return one logits array [N, C], got {type(out)}."
    )
  num_classes = check_logits_vs_targets(out.shape, targets, "apply_fn output")
  check_target_values(targets, num_classes)
  return num_classes


__all__ = [
  "SOFT_TARGET_ATOL",
  "check_active",
  "check_choice",
  "check_chunk_size",
  "check_finite",
  "check_floating_images",
  "check_kkt_inputs",
  "check_logits_vs_targets",
  "check_nonnegative_lambdas",
  "check_target_values",
  "check_targets_shape",
  "error_summary",
  "host_float32_images",
  "is_concrete",
]
