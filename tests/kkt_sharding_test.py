"""Chunked DeepKKT terms on candidates sharded over 4 (fake CPU) devices.

A chunk must stay split over the devices: the sum over candidates is then a
local sum plus an all-reduce of a parameter-sized pytree, and no device
sees another's candidates. Checked on the compiled programs' collectives
and on the values (4 devices against 1, chunked against unchunked, and the
chunk layout against its definition).

tests/conftest.py forces 4 host devices before JAX starts.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import _kkt_chunks, kkt, parallel

NUM_DEVICES = 4
C = 3


def conv_apply(params, x):
  h = jax.lax.conv_general_dilated(
    x,
    params["conv"],
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  h = jax.nn.softplus(h).mean(axis=(1, 2))
  return h @ params["dense"] + params["bias"]


def make_problem(n, dtype=np.float64, seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "conv": rng.standard_normal((3, 3, 2, 4)) / 3.0,
    "dense": rng.standard_normal((4, C)),
    "bias": 0.1 * rng.standard_normal(C),
  }
  params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
  x = jnp.asarray(rng.standard_normal((n, 5, 5, 2)), dtype)
  targets = jnp.asarray(rng.integers(0, C, n))
  lambdas = jnp.asarray(rng.uniform(0.1, 1.0, n), dtype)
  return params, x, targets, lambdas


def functions(chunk_size):
  """Each DeepKKT path that chunks, as a jittable function of the data."""

  def grad(method):
    def loss(params, x, targets, lambdas, active):
      return kkt.deepkkt_loss(
        conv_apply,
        params,
        x,
        targets,
        lambdas,
        active=active,
        distance="l2_sq",
        method=method,
        chunk_size=chunk_size,
      )

    return jax.value_and_grad(loss, argnums=(1, 3), has_aux=True)

  def residual(params, x, targets, lambdas, active):
    del active
    return kkt.stationarity_residual(
      conv_apply, params, x, targets, lambdas, chunk_size=chunk_size
    )

  def dots(params, x, targets, lambdas, active):
    del lambdas, active
    return kkt.per_sample_grad_dots(
      conv_apply, params, x, targets, params, chunk_size=chunk_size
    )

  return {
    "fast": grad("fast"),
    "reverse": grad("reverse"),
    "residual": residual,
    "dots": dots,
  }


def sharded(params, x, targets, lambdas, active):
  mesh = parallel.make_mesh(NUM_DEVICES)
  batch = parallel.shard_batch((x, targets, lambdas, active), mesh)
  return parallel.replicate(params, mesh), *batch


def collectives(hlo: str) -> dict[str, int]:
  ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute")
  return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in ops}


# (N, chunk_size): unchunked; chunks of whole stripes (16 = 4 x 4); and
# 20 = 4 stripes of 5 samples in chunks of 2 per stripe, the last one
# padded.
LAYOUTS = [(16, None), (16, 8), (20, 8)]


@pytest.mark.parametrize("n,chunk_size", LAYOUTS)
@pytest.mark.parametrize("name", ["fast", "reverse", "residual", "dots"])
def test_chunks_stay_within_shards(name, n, chunk_size):
  # Before chunks were striped, chunk_size=8 compiled the x- and lambda-
  # gradient with all-gathers of x, targets and lambdas and no all-reduce:
  # every device computed every chunk.
  fn = functions(chunk_size)[name]
  args = sharded(*make_problem(n, np.float32), jnp.arange(n) % 5 != 2)
  counts = collectives(jax.jit(fn).lower(*args).compile().as_text())
  assert counts["all-gather"] == 0, counts
  assert counts["all-to-all"] == counts["collective-permute"] == 0, counts
  if name != "dots":  # G^T v needs no sum over candidates.
    assert counts["all-reduce"] >= 1, counts


@pytest.mark.parametrize("n,chunk_size", LAYOUTS)
def test_four_devices_equal_one(n, chunk_size):
  with jax.enable_x64(True):
    params, x, targets, lambdas = make_problem(n)
    args = (params, x, targets, lambdas, jnp.arange(n) % 5 != 2)
    reference = functions(None)
    for name, fn in functions(chunk_size).items():
      one = jax.jit(fn)(*args)
      four = jax.jit(fn)(*sharded(*args))
      unchunked = jax.jit(reference[name])(*args)
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
        (four, one),
        (one, unchunked),
      )


@pytest.mark.parametrize(
  "n,chunk_size",
  [(16, 8), (20, 8), (7, 3), (12, 9), (30, 12), (9, 8)],
)
def test_chunk_layout(n, chunk_size):
  plan = _kkt_chunks.chunk_plan(n, chunk_size)
  assert plan.chunk == chunk_size
  assert plan.stripes == np.gcd(n, chunk_size)
  ids = np.arange(n)
  chunks = np.asarray(_kkt_chunks.to_chunks(jnp.asarray(ids), plan, zero=False))
  weights = np.asarray(_kkt_chunks.to_chunks(jnp.ones(n), plan, zero=True))
  assert chunks.shape == weights.shape == (plan.num_chunks, chunk_size)
  # Every sample exactly once with weight 1; padding repeats a sample of
  # the same stripe, with weight 0.
  np.testing.assert_array_equal(np.sort(chunks[weights == 1]), ids)
  run = n // plan.stripes
  stripe_of_row = np.repeat(np.arange(plan.stripes), plan.per_stripe)
  np.testing.assert_array_equal(
    chunks // run, np.broadcast_to(stripe_of_row, chunks.shape)
  )
  assert weights.sum() == n
  back = _kkt_chunks.from_chunks(jnp.asarray(chunks), plan)
  np.testing.assert_array_equal(back, ids)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((n, 2, 3)))
  np.testing.assert_array_equal(
    _kkt_chunks.from_chunks(
      _kkt_chunks.to_chunks(images, plan, zero=False), plan
    ),
    images,
  )
