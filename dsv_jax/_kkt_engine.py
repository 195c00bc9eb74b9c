"""The machinery under `dsv_jax.kkt`: per-sample loss, distances, the
lambda-weighted gradient and the custom-VJP DeepKKT terms.

Private: `dsv_jax.kkt` is the interface (and holds the documentation and
examples). The custom VJP differentiates the DeepKKT loss
forward-over-reverse (see `dsv_jax.kkt` for the derivation); the
plain reverse-over-reverse formulation is `_kkt_reverse`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from dsv_jax._kkt_chunks import chunk_plan, from_chunks, to_chunks
from dsv_jax.types import ApplyFn, Params, PyTree


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`dsv_jax.kkt.cross_entropy`."""
  # written out: importing optax imports absl.logging and absl.flags, which
  # this module's import must not.
  if targets.ndim == 1:
    label_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - label_logits[:, 0]
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def weighted_grad_and_logits(
  apply_fn: ApplyFn,
  params: Params,
  x: jax.Array,
  targets: jax.Array,
  lambdas: jax.Array,
  chunk_size: int | None,
) -> tuple[Params, jax.Array]:
  """``grad_theta sum_i lambda_i L_i`` and the logits of the same forward."""

  def one_pass(xc, tc, lc):
    def weighted_loss(p):
      logits = apply_fn(p, xc)
      return jnp.sum(lc * cross_entropy(logits, tc)), logits

    return jax.grad(weighted_loss, has_aux=True)(params)

  plan = chunk_plan(x.shape[0], chunk_size)
  if plan is None:
    return one_pass(x, targets, lambdas)
  xs = (
    to_chunks(x, plan, zero=False),
    to_chunks(targets, plan, zero=False),
    to_chunks(lambdas, plan, zero=True),
  )

  def body(acc, xs_c):
    g, logits = one_pass(*xs_c)
    return tree_add(acc, g), logits

  zeros = jax.tree.map(jnp.zeros_like, params)
  g, logits = jax.lax.scan(body, zeros, xs)
  return g, from_chunks(logits, plan)


def num_scalars(tree: PyTree) -> int:
  """P, the number of scalars in a pytree (``l1_mean`` averages over it)."""
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _l1_mean(params: Params, g: Params) -> jax.Array:
  # Mean over all P scalars of the flattened vector, not a mean of per-leaf
  # means (the two differ as soon as leaves differ in size).
  sums = jax.tree.map(lambda p, q: jnp.sum(jnp.abs(p + q)), params, g)
  return sum(jax.tree.leaves(sums)) / num_scalars(params)


def _l2_sq(params: Params, g: Params) -> jax.Array:
  sums = jax.tree.map(lambda p, q: jnp.sum(jnp.square(p + q)), params, g)
  return sum(jax.tree.leaves(sums))


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jax.tree.leaves(jax.tree.map(jnp.vdot, a, b)))


def _cosine(params: Params, g: Params) -> jax.Array:
  # 1 - cos(theta*, -g): scale-free, 0 when -g is parallel to theta*. The
  # floor keeps the value and the gradient finite at g = 0.
  tiny = jnp.finfo(jnp.result_type(*jax.tree.leaves(params))).tiny
  norms = jnp.sqrt(jnp.maximum(_vdot(params, params) * _vdot(g, g), tiny))
  return 1.0 + _vdot(params, g) / norms


DISTANCE_FNS: dict[str, Callable[[Params, Params], jax.Array]] = {
  "l1_mean": _l1_mean,
  "l2_sq": _l2_sq,
  "cosine": _cosine,
}


def target_labels(targets: jax.Array) -> jax.Array:
  return targets if targets.ndim == 1 else jnp.argmax(targets, axis=-1)


def gated_primal_loss(logits, targets, *, gated, active):
  losses = cross_entropy(logits, targets)
  if gated:
    correct = jnp.argmax(logits, axis=-1) == target_labels(targets)
    losses = jnp.where(correct, 0.0, losses)
  if active is None:
    return jnp.mean(losses)
  count = jnp.maximum(jnp.sum(active), 1)
  return jnp.sum(jnp.where(active, losses, 0.0)) / count


class _Static(NamedTuple):
  """Non-differentiable configuration of the custom-VJP DeepKKT loss.

  ``apply_fn`` is ``(params, x, consts) -> logits``: the model with every
  value it closes over that may carry a derivative hoisted into ``consts``
  (`_hoist_closure`), so that the custom VJP sees them as inputs.
  ``gated`` configures the primal term; None leaves it out (the
  stationarity loss alone).
  """

  apply_fn: Callable[[Params, jax.Array, list[jax.Array]], jax.Array]
  treedef: Any
  distance: str
  chunk_size: int | None
  gated: bool | None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Perturbed:
  """Which inputs are being differentiated (a leafless residual)."""

  params: tuple[bool, ...]
  consts: tuple[bool, ...]
  x: bool
  targets: bool
  lambdas: bool
  betas: bool


def _flagged(flags: tuple[bool, ...]) -> list[int]:
  return [i for i, f in enumerate(flags) if f]


def _primal_term(static, logits, targets, active):
  if static.gated is None:
    return jnp.zeros((), logits.dtype)
  return gated_primal_loss(logits, targets, gated=static.gated, active=active)


def _static_weighted_grad(static, params, consts, x, targets, lambdas):
  """`weighted_grad_and_logits` of the converted model, in chunks."""
  return weighted_grad_and_logits(
    lambda p, xc: static.apply_fn(p, xc, consts),
    params,
    x,
    targets,
    lambdas,
    static.chunk_size,
  )


def _kkt_reverse(
  static: _Static,
  param_leaves: list[jax.Array],
  consts: list[jax.Array],
  x: jax.Array,
  targets: jax.Array,
  lambdas: jax.Array,
  active: jax.Array | None,
  betas: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """``(total, (stationarity, primal, logits))``; autodiff through it is
  reverse-over-reverse. ``total = betas[0] * stationarity + betas[1] *
  primal``; ``lambdas`` are the effective (masked) multipliers."""
  params = jax.tree.unflatten(static.treedef, param_leaves)
  g, logits = _static_weighted_grad(static, params, consts, x, targets, lambdas)
  stationarity = DISTANCE_FNS[static.distance](params, g)
  primal = _primal_term(static, logits, targets, active)
  total = betas[0] * stationarity + betas[1] * primal
  return total, (stationarity, primal, logits)


_kkt_fast = jax.custom_vjp(_kkt_reverse, nondiff_argnums=(0,))


def _gradient_map(static, perturbed, consts, x, targets, lambdas, with_theta):
  """``K(theta_leaves, c)`` for the forward-over-reverse derivative.

  ``K`` returns ``(grad_theta, grads, (per_sample, logits))``: the gradients
  of ``sum_i lambda_i L_i + <c, logits>`` with respect to theta (None
  unless ``with_theta``) and to the perturbed constants, x and targets, in
  that order (``grads``, a list), with the per-sample losses and logits.
  ``c`` None leaves its term out.
  """
  const_idx = _flagged(perturbed.consts)
  diff = [consts[i] for i in const_idx]
  diff += [x] if perturbed.x else []
  diff += [targets] if perturbed.targets else []

  def f(theta_leaves, diff_values, c):
    cs = list(consts)
    for i, value in zip(const_idx, diff_values[: len(const_idx)], strict=True):
      cs[i] = value
    rest = iter(diff_values[len(const_idx) :])
    xx = next(rest) if perturbed.x else x
    tt = next(rest) if perturbed.targets else targets
    params = jax.tree.unflatten(static.treedef, theta_leaves)
    logits = static.apply_fn(params, xx, cs)
    per_sample = cross_entropy(logits, tt)
    value = jnp.sum(lambdas * per_sample)
    if c is not None:
      value = value + jnp.sum(c * logits)
    return value, (per_sample, logits)

  def K(theta_leaves, c):
    if with_theta:
      (g_theta, grads), aux = jax.grad(f, (0, 1), has_aux=True)(
        theta_leaves, diff, c
      )
    elif diff:
      g_theta = None
      grads, aux = jax.grad(f, 1, has_aux=True)(theta_leaves, diff, c)
    else:  # Only lambdas: a forward pass (its jvp), no reverse pass.
      g_theta, grads = None, []
      aux = f(theta_leaves, diff, c)[1]
    return g_theta, grads, aux

  return K


def _kkt_fast_fwd(
  static, param_leaves, consts, x, targets, lambdas, active, betas
):
  perturbed = _Perturbed(
    params=tuple(leaf.perturbed for leaf in param_leaves),
    consts=tuple(c.perturbed for c in consts),
    x=x.perturbed,
    targets=targets.perturbed,
    lambdas=lambdas.perturbed,
    betas=betas.perturbed,
  )
  param_leaves = [leaf.value for leaf in param_leaves]
  consts = [c.value for c in consts]
  x, targets, lambdas = x.value, targets.value, lambdas.value
  active = None if active is None else active.value
  betas = betas.value
  params = jax.tree.unflatten(static.treedef, param_leaves)
  with_c = static.gated is not None
  plan = chunk_plan(x.shape[0], static.chunk_size)
  if plan is None:
    # One linearisation of K serves both passes: its primal gives g (and
    # the logits), its tangent along (u, dprimal/dlogits), chosen from that
    # primal, gives every cotangent; the forward and the weighted backward
    # pass run once.
    K = _gradient_map(
      static, perturbed, consts, x, targets, lambdas, with_theta=True
    )
    if with_c:
      logits_shape = jax.eval_shape(static.apply_fn, params, x, consts)
      c0 = jnp.zeros(logits_shape.shape, logits_shape.dtype)
      (g_leaves, _, (_, logits)), lin = jax.linearize(K, param_leaves, c0)
    else:
      (g_leaves, _, (_, logits)), lin = jax.linearize(
        lambda th: K(th, None), param_leaves
      )
    g = jax.tree.unflatten(static.treedef, g_leaves)
  else:
    g, logits = _static_weighted_grad(
      static, params, consts, x, targets, lambdas
    )
  stationarity, distance_vjp = jax.vjp(DISTANCE_FNS[static.distance], params, g)
  # u_theta = dD/dtheta* (direct), u = dD/dg: the stationarity term's
  # direction; its gradient is <u, d g> along the perturbation.
  u_theta, u = distance_vjp(jnp.ones_like(stationarity))
  dir_theta = [betas[0] * a for a in jax.tree.leaves(u)]
  primal, primal_vjp = jax.vjp(
    lambda z, t: _primal_term(static, z, t, active), logits, targets
  )
  dir_c, d_primal_targets = primal_vjp(jnp.ones_like(primal))
  dir_c = betas[1] * dir_c
  total = betas[0] * stationarity + betas[1] * primal

  # The gradient of the total along a perturbation of the inputs (at fixed
  # lambda) is the tangent of K's gradients along theta-direction
  # beta_stat * u and logits-direction beta_primal * dprimal/dlogits
  # (forward-over-reverse: d/de grad F(theta + e u) = grad <u, grad_theta
  # F>); the lambda-gradient is the tangent of the per-sample losses,
  # beta_stat * <u, grad_theta L_i>.
  with_theta = any(perturbed.params)
  if plan is None:
    tangents = lin(dir_theta, dir_c) if with_c else lin(dir_theta)
    t_theta, t_grads, (t_per_sample, _) = tangents
  else:
    xs = (
      to_chunks(x, plan, zero=False),
      to_chunks(targets, plan, zero=False),
      to_chunks(lambdas, plan, zero=True),
      to_chunks(dir_c, plan, zero=True) if with_c else None,
    )
    num_shared = sum(perturbed.consts)

    def body(acc, xs_c):
      xc, tc, lc, cc = xs_c
      K = _gradient_map(static, perturbed, consts, xc, tc, lc, with_theta)
      c0 = None if cc is None else jnp.zeros_like(cc)
      _, (t_theta, t_grads, (t_ps, _)) = jax.jvp(
        K, (param_leaves, c0), (dir_theta, cc)
      )
      shared = ([] if t_theta is None else t_theta) + t_grads[:num_shared]
      acc = [a + s for a, s in zip(acc, shared, strict=True)]
      return acc, (t_grads[num_shared:], t_ps)

    init = [jnp.zeros_like(a) for a in param_leaves] if with_theta else []
    init += [jnp.zeros_like(consts[i]) for i in _flagged(perturbed.consts)]
    acc, (data, t_per_sample) = jax.lax.scan(body, init, xs)
    t_theta = acc[: len(param_leaves)] if with_theta else None
    t_grads = acc[len(t_theta or []) :] + [from_chunks(d, plan) for d in data]
    t_per_sample = from_chunks(t_per_sample, plan)

  # The cotangents of a unit cotangent on the total: the backward rule
  # only scales them.
  t_grads = iter(t_grads)
  unit_params = [None] * len(param_leaves)
  for i, direct in enumerate(jax.tree.leaves(u_theta)):
    if perturbed.params[i]:
      unit_params[i] = t_theta[i] + betas[0] * direct
  unit_consts = [next(t_grads) if p else None for p in perturbed.consts]
  unit_x = next(t_grads) if perturbed.x else None
  unit_targets = None
  if perturbed.targets:
    unit_targets = next(t_grads) + betas[1] * d_primal_targets
  unit_lambdas = (
    t_per_sample.astype(lambdas.dtype) if perturbed.lambdas else None
  )
  unit_betas = jnp.stack([stationarity, primal]) if perturbed.betas else None
  units = (unit_params, unit_consts, unit_x, unit_targets, unit_lambdas)
  aux = (stationarity, primal, logits)
  return (total, aux), (*units, unit_betas)


def _kkt_fast_bwd(static, units, cotangents):
  # The aux outputs reach callers through stop_gradient (`kkt_terms`):
  # their cotangents are zero.
  ct_total, _ = cotangents
  if isinstance(ct_total, SymbolicZero):
    ct_total = jnp.zeros(ct_total.shape, ct_total.dtype)
  unit_params, unit_consts, unit_x, unit_targets, unit_lambdas, unit_betas = (
    units
  )
  scale = lambda a: None if a is None else ct_total * a
  return (
    [scale(a) for a in unit_params],
    [scale(a) for a in unit_consts],
    scale(unit_x),
    scale(unit_targets),
    scale(unit_lambdas),
    None,
    scale(unit_betas),
  )


# The forward rule, which does all the work, is traced inside the public
# functions' `full_precision`; the backward rule only scales.
_kkt_fast.defvjp(_kkt_fast_fwd, _kkt_fast_bwd, symbolic_zeros=True)


def kkt_terms(
  apply_fn,
  params,
  x,
  targets,
  lambdas,
  active,
  betas,
  *,
  gated,
  distance,
  method,
  chunk_size,
):
  """``(total, (stationarity, primal, logits))``, the aux without gradient.

  ``lambdas`` are the effective multipliers (zero where not ``active``);
  ``betas = (beta_stationarity, beta_primal)``; ``gated`` None: no primal
  term.
  """
  dtype = jnp.result_type(lambdas, *jax.tree.leaves(params))
  betas = jnp.stack([jnp.asarray(b, dtype) for b in betas])
  # Parameters enter as a flat list of leaves: the custom VJP's symbolic-zero
  # protocol would otherwise have to unflatten arbitrary custom pytree nodes
  # (e.g. nnx.State) around its CustomVJPPrimal records.
  leaves, treedef = jax.tree.flatten(params)
  if method == "reverse":
    static = _Static(
      lambda p, xc, _: apply_fn(p, xc), treedef, distance, chunk_size, gated
    )
    total, aux = _kkt_reverse(
      static, leaves, [], x, targets, lambdas, active, betas
    )
    return total, jax.lax.stop_gradient(aux)
  # A custom VJP must not close over values that are being differentiated
  # (an outer jax.grad over something apply_fn closes over: bilevel and
  # meta-learning uses): hoist them into explicit inputs. The converted
  # function is traced for the shape it is called with, one chunk.
  plan = chunk_plan(x.shape[0], chunk_size)
  rows = x.shape[0] if plan is None else plan.chunk
  example_x = jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype)
  converted, consts = _hoist_closure(apply_fn, params, example_x)
  static = _Static(converted, treedef, distance, chunk_size, gated)
  total, aux = _kkt_fast(
    static, leaves, consts, x, targets, lambdas, active, betas
  )
  return total, jax.lax.stop_gradient(aux)


def _hoist_closure(
  apply_fn: ApplyFn, params: Params, example_x: jax.ShapeDtypeStruct
) -> tuple[Callable[[Params, jax.Array, list], jax.Array], list[jax.Array]]:
  """``apply_fn`` with the tracers it closes over as explicit inputs.

  Returns ``(converted, consts)`` with ``converted(params, x, consts) ==
  apply_fn(params, x)`` for ``x`` of the shape and dtype of ``example_x``;
  ``consts`` are the tracers of enclosing transformations that
  ``apply_fn`` closes over (concrete arrays stay closed over). What
  ``jax.closure_convert`` does, without its cache: that cache holds every
  converted function, and with it every array its closure captured, alive
  (measured: an eager loop of 5 steps kept all 5 of its 4 MB closed-over
  arrays).
  """
  closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(
    params, example_x
  )
  num_args = len(jax.tree.leaves((params, example_x)))
  if len(closed.jaxpr.invars) != num_args:
    raise NotImplementedError(
      "this JAX version traces closures differently: use method='reverse'."
    )
  is_tracer = [isinstance(c, jax.core.Tracer) for c in closed.consts]
  kept = [
    None if t else c for c, t in zip(closed.consts, is_tracer, strict=True)
  ]
  hoisted = [c for c, t in zip(closed.consts, is_tracer, strict=True) if t]
  out_tree = jax.tree.structure(out_shape)

  def converted(p, xx, consts):
    given = iter(consts)
    all_consts = [
      next(given) if t else c for c, t in zip(kept, is_tracer, strict=True)
    ]
    flat = jax.tree.leaves((p, xx))
    out = jax.core.eval_jaxpr(closed.jaxpr, all_consts, *flat)
    return jax.tree.unflatten(out_tree, out)

  return converted, hoisted
