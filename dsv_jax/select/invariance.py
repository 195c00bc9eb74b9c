"""Which parameters a lambda fit can represent at all.

Weights followed by a normalisation layer are scale-invariant: every
per-sample gradient is orthogonal to them, so no lambda represents them
(see `represented_leaves`). The fit runs on the other leaves.
"""

from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

from dsv_jax import checks, kkt
from dsv_jax.batches import padded_batches
from dsv_jax.select.operator import prob_residual
from dsv_jax.types import ApplyFn, Params, PyTree

Wrt = Literal["auto", "all"]
WRT: tuple[Wrt, ...] = get_args(Wrt)
# Leaves (or sibling groups) whose scaling leaves every probed loss
# unchanged, |sum_i <theta_S, g_i,S>| <= tol * sum_i ||theta_S|| ||g_i,S||
# (aggregated over probes), cannot be represented by any lambda.
DEFAULT_INVARIANCE_TOL = 1e-3
DEFAULT_NUM_PROBE = 64


class Represented(NamedTuple):
  """Which parameters a lambda fit can represent (`represented_leaves`).

  Attributes:
    mask: a pytree like ``params`` of Python bools, True for the leaves
      that take part in the fit.
    excluded: ``/``-joined paths of the excluded leaves.
    groups: paths of the invariant groups found: a leaf, or a subtree
      (e.g. a normalisation layer's scale and bias together) whose joint
      scaling leaves every probed per-sample loss unchanged, or whose
      per-sample gradients are all zero.
    excluded_share: share of ``||theta*||^2`` held by the excluded leaves.
    ratios: ``{group path: |sum_i <theta_S, g_i,S>| / sum_i ||theta_S||
      ||g_i,S||}`` (aggregated over probes) of every excluded group; the
      invariance measured, for the record.
  """

  mask: PyTree
  excluded: tuple[str, ...]
  groups: tuple[str, ...]
  excluded_share: float
  ratios: dict[str, float]


def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


@partial(jax.jit, static_argnums=0)
def _leaf_dots_and_norms(apply_fn, params, x, targets):
  """Per-sample, per-leaf ``<theta_l, g_i,l>`` and ``||g_i,l||``, ``[M, L]``.

  One sample at a time (memory O(P)); ``g_i = J_i^T (p_i - y_i)`` with the
  residual formed without cancellation, as in `dsv_jax.select.operator`,
  and scaled to unit norm: both outputs scale with it, their ratio does
  not, and a confident sample's ``||g_i||^2`` would underflow float32.
  """
  leaves = jax.tree.leaves(params)

  def one(args):
    xi, ti = args
    logits, vjp = jax.vjp(lambda p: apply_fn(p, xi[None]), params)
    r = jax.lax.stop_gradient(prob_residual(logits, ti[None]))
    r = r / jnp.maximum(jnp.max(jnp.abs(r)), jnp.finfo(r.dtype).tiny)
    g = jax.tree.leaves(vjp(r)[0])
    dots = jnp.stack([jnp.vdot(a, b) for a, b in zip(leaves, g, strict=True)])
    norms = jnp.stack([jnp.sqrt(jnp.vdot(b, b)) for b in g])
    return dots, norms

  return jax.lax.map(one, (x, targets), batch_size=8)


@partial(jax.jit, static_argnums=0)
def _residual_norms_chunk(apply_fn, params, x, targets):
  r = prob_residual(apply_fn(params, x), targets)
  return jnp.sqrt(jnp.sum(r * r, -1))


def _residual_norms(apply_fn, params, x, targets, chunk=1024) -> np.ndarray:
  """``||p_i - y_i||`` of every sample (one chunked forward pass)."""
  out = []
  # One compiled shape for every chunk (a set smaller than one: its own).
  for (xc, tc), real in padded_batches([x, targets], min(chunk, len(x))):
    norms = _residual_norms_chunk(apply_fn, params, xc, tc)
    out.append(np.asarray(norms)[:real])
  return np.concatenate(out)


@kkt.full_precision
def represented_leaves(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  *,
  num_probe: int = DEFAULT_NUM_PROBE,
  tol: float = DEFAULT_INVARIANCE_TOL,
) -> Represented:
  """Finds the parameters no lambda can represent, from a few probe samples.

  A weight followed by a normalisation layer is scale-invariant: the loss
  does not change when it is scaled, so ``<theta_S, g_i,S> = 0`` for every
  sample and every per-sample gradient is orthogonal to ``theta_S``. No
  combination ``-sum_i lambda_i g_i`` can then reproduce ``theta_S``: the
  residual of any fit is at least its share of ``||theta*||``, and a fit
  over all parameters ranks samples by how they fit the rest only through
  that floor. The same holds for a group of leaves scaled together (an
  instance norm's scale and bias, when the next block is normalised too)
  and for leaves whose gradient is zero (a conv bias removed by the next
  instance norm's mean subtraction).

  Every leaf and every subtree of ``params`` is tested on ``num_probe``
  samples spread over ``x``: a group S is invariant when
  ``||[sum_{l in S} <theta_l, g_i,l>]_i|| <= tol *
  ||[sum_{l in S} ||theta_l|| ||g_i,l||]_i||`` (norms over the probes), i.e.
  the per-sample gradients are orthogonal to ``theta_S`` up to float32
  round-off (measured 1e-6 to 1e-4 on instance-norm ConvNets, against
  1e-2 and more for other leaves). Invariant groups are excluded.

  Args:
    apply_fn: ``(params, x[B, ...]) -> logits[B, C]``, evaluation mode.
    params: the trained parameter pytree theta*.
    x: ``[N, ...]`` floating samples (e.g. the training set, normalised).
    targets: int labels ``[N]`` or soft targets ``float[N, C]``.
    num_probe: samples probed (evenly spaced over ``x``).
    tol: the invariance threshold above.

  Returns:
    A `Represented`.
  """
  if num_probe < 1:
    raise ValueError(f"num_probe must be >= 1, got {num_probe}.")
  if not 0 < tol < 1:
    raise ValueError(f"tol must lie in (0, 1), got {tol}.")
  x, targets = checks.host_float32_images(x), np.asarray(targets)
  # Probes are spread over the samples whose gradient is not exactly zero
  # (a float32 softmax saturates on very confident samples: they carry no
  # information about invariance).
  live = np.flatnonzero(_residual_norms(apply_fn, params, x, targets) > 0)
  if not len(live):
    raise ValueError(
      "every sample has a zero loss gradient in float32 (the classifier is "
      "saturated): nothing can be represented."
    )
  pick = np.linspace(0, len(live) - 1, min(num_probe, len(live))).round()
  idx = live[np.unique(pick).astype(int)]
  dots, norms = _leaf_dots_and_norms(
    apply_fn, params, jnp.asarray(x[idx]), jnp.asarray(targets[idx])
  )
  dots, norms = np.asarray(dots, np.float64), np.asarray(norms, np.float64)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path for path, _ in flat]
  sq = np.array([float(np.vdot(v, v)) for _, v in flat], np.float64)
  scale = norms * np.sqrt(sq)[None]
  # A gradient this small next to the largest leaf's is zero (round-off).
  zero_grad = norms.max(0) <= 1e-6 * max(norms.max(), 1e-30)
  groups: dict[tuple, list[int]] = {}
  for i, path in enumerate(paths):
    for depth in range(1, len(path) + 1):
      groups.setdefault(tuple(path[:depth]), []).append(i)
  excluded = np.zeros(len(paths), bool)
  found, ratios = [], {}
  # Outermost first: a group inside an excluded one is already covered.
  for prefix, members in sorted(groups.items(), key=lambda kv: len(kv[0])):
    if excluded[members].all():
      continue
    if zero_grad[members].all():
      ratio = 0.0
    else:
      a = np.linalg.norm(scale[:, members].sum(1))
      if a == 0:  # theta_S = 0: nothing to represent, target zero.
        continue
      ratio = float(np.linalg.norm(dots[:, members].sum(1)) / a)
      if ratio > tol:
        continue
    excluded[members] = True
    name = path_str(prefix)
    found.append(name)
    ratios[name] = ratio
  if excluded.all():
    raise ValueError(
      "every parameter is scale-invariant or has a zero gradient on the "
      "probed samples: no lambda can represent any of theta*."
    )
  mask = jax.tree.unflatten(treedef, [not e for e in excluded])
  total = float(sq.sum())
  return Represented(
    mask=mask,
    excluded=tuple(
      path_str(p) for p, e in zip(paths, excluded, strict=True) if e
    ),
    groups=tuple(found),
    excluded_share=float(sq[excluded].sum() / total) if total else 0.0,
    ratios=ratios,
  )


def resolve_wrt(
  wrt: Wrt | PyTree,
  apply_fn: ApplyFn,
  params: Params,
  x: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
) -> Represented:
  """The `Represented` parameters of ``wrt`` (see `fit_lambdas`).

  ``"auto"`` runs `represented_leaves` on ``x``; ``"all"`` keeps every
  leaf; a pytree of bools like ``params`` is taken as given.
  """
  if isinstance(wrt, str):
    checks.check_choice("wrt", wrt, WRT)
    if wrt == "auto":
      return represented_leaves(apply_fn, params, x, targets)
    wrt = jax.tree.map(lambda _: True, params)
  try:
    mask = jax.tree.map(lambda m, _: bool(m), wrt, params)
  except ValueError as e:
    raise ValueError(
      "wrt must be 'auto', 'all' or a pytree of bools with the structure "
      f"of params ({e})."
    ) from None
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = [not f for f in jax.tree.leaves(mask)]
  if all(out):
    raise ValueError("wrt excludes every parameter: nothing to fit.")
  sq = np.array([float(np.vdot(v, v)) for _, v in flat])
  names = tuple(path_str(p) for (p, _), e in zip(flat, out, strict=True) if e)
  return Represented(
    mask=mask,
    excluded=names,
    groups=names,
    excluded_share=float(sq[out].sum() / max(sq.sum(), 1e-30)),
    ratios={},
  )


def masker(mask: PyTree) -> Callable[[PyTree], PyTree]:
  """``tree -> tree`` with the excluded leaves set to zero."""
  flags = jax.tree.leaves(mask)

  def apply(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
      treedef,
      [
        a if f else jnp.zeros_like(a)
        for a, f in zip(leaves, flags, strict=True)
      ],
    )

  return apply
