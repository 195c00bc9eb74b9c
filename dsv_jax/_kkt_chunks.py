"""Chunk planning for `dsv_jax.kkt`: N samples as equal, shard-aligned chunks.

Every function of `dsv_jax.kkt` with a ``chunk_size`` streams over the
chunks planned here (``lax.scan``), memory O(P + chunk activations).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ChunkPlan(NamedTuple):
  """How N samples go into equal chunks that stay within every shard.

  The samples are viewed as ``stripes`` contiguous runs of ``n // stripes``
  and every chunk takes ``per_stripe`` consecutive samples from each run:
  chunk k of stripe s holds samples ``s * (n // stripes) + k * per_stripe +
  [0, per_stripe)``. With ``P("data")`` sharding each device holds whole
  runs as long as ``stripes`` is a multiple of the device count, so every
  chunk is split over every device, the sharded axis stays the chunk's
  row axis, and the sum over a chunk is a local sum plus an all-reduce.
  Contiguous chunks (``stripes == 1``) would put the sharded axis on the
  scanned one: every device would then compute every chunk, on all-gathered
  candidates.
  """

  n: int
  stripes: int
  per_stripe: int
  num_chunks: int

  @property
  def chunk(self) -> int:
    return self.stripes * self.per_stripe


def chunk_plan(n: int, chunk_size: int | None) -> ChunkPlan | None:
  """The chunks of a scan over ``n`` samples, or None for a single pass.

  ``stripes = gcd(n, chunk_size)``: a multiple of the device count whenever
  ``n`` and ``chunk_size`` both are (``parallel.pad_to_multiple`` gives
  ``n``). Every chunk holds exactly ``chunk_size`` samples; each stripe's
  last one is padded.
  """
  if chunk_size is None or chunk_size >= n:
    return None
  stripes = math.gcd(n, chunk_size)
  per_stripe = chunk_size // stripes
  num_chunks = -(-(n // stripes) // per_stripe)
  return ChunkPlan(n, stripes, per_stripe, num_chunks)


def to_chunks(a: jax.Array, plan: ChunkPlan, *, zero: bool) -> jax.Array:
  """[N, ...] -> [num_chunks, chunk, ...], padding every stripe's end.

  Data rows are padded by repeating the stripe's last sample (``zero=False``)
  so that the model never sees an out-of-distribution row (which could
  produce inf/NaN and poison a zero-weighted sum); weights are padded with
  zeros. Padding and transposes act on the axes that are not sharded.
  """
  rest = a.shape[1:]
  a = a.reshape(plan.stripes, plan.n // plan.stripes, *rest)
  pad = plan.num_chunks * plan.per_stripe - a.shape[1]
  if pad:
    # Not jnp.pad(mode="edge"): on a mesh its transpose (reverse-mode
    # gradient) compiled to a collective-permute between devices.
    last = jnp.zeros_like(a[:, -1:]) if zero else a[:, -1:]
    a = jnp.concatenate([a, jnp.repeat(last, pad, axis=1)], axis=1)
  a = a.reshape(plan.stripes, plan.num_chunks, plan.per_stripe, *rest)
  return jnp.swapaxes(a, 0, 1).reshape(plan.num_chunks, plan.chunk, *rest)


def from_chunks(a: jax.Array, plan: ChunkPlan) -> jax.Array:
  """The inverse of `to_chunks`: [num_chunks, chunk, ...] -> [N, ...]."""
  rest = a.shape[2:]
  a = a.reshape(plan.num_chunks, plan.stripes, plan.per_stripe, *rest)
  a = jnp.swapaxes(a, 0, 1).reshape(plan.stripes, -1, *rest)
  return a[:, : plan.n // plan.stripes].reshape(plan.n, *rest)
