"""Tests for dsv_jax.parallel: the data mesh, sharding helpers, and DeepKKT
losses on candidates really sharded over 4 (fake CPU) devices.

tests/conftest.py forces 4 host devices before JAX starts.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from dsv_jax import kkt, parallel

NUM_DEVICES = 4


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def mlp_apply(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"]


def make_problem(n, seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(rng.standard_normal((5, 6)) / 2.0),
    "b1": jnp.asarray(0.1 * rng.standard_normal(6)),
    "w2": jnp.asarray(rng.standard_normal((6, 3))),
  }
  x = jnp.asarray(rng.standard_normal((n, 5)))
  targets = jnp.asarray(rng.integers(0, 3, n))
  lambdas = jnp.asarray(rng.uniform(0.1, 1.0, n))
  return params, x, targets, lambdas


def test_has_four_devices():
  assert jax.device_count() == NUM_DEVICES, "tests/conftest.py sets 4"


def test_make_mesh():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.DATA_AXIS,)
  assert parallel.num_shards(mesh) == NUM_DEVICES
  assert mesh.axis_types == (AxisType.Auto,)
  assert parallel.num_shards(parallel.make_mesh(2)) == 2
  for bad in (0, NUM_DEVICES + 1):
    with pytest.raises(ValueError, match="num_devices must lie in"):
      parallel.make_mesh(bad)


def test_shard_batch_and_replicate_specs():
  mesh = parallel.make_mesh()
  x, targets = parallel.shard_batch((jnp.ones((8, 3)), jnp.arange(8)), mesh)
  for a in (x, targets):
    assert a.sharding.spec == PartitionSpec(parallel.DATA_AXIS)
    assert len(a.sharding.device_set) == NUM_DEVICES
    assert {s.data.shape[0] for s in a.addressable_shards} == {2}
  params = parallel.replicate({"w": jnp.ones((3, 2))}, mesh)
  assert params["w"].sharding.spec == PartitionSpec()
  assert params["w"].sharding.is_fully_replicated


def test_shard_batch_errors():
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    parallel.shard_batch({"x": jnp.ones((6, 2))}, mesh)
  with pytest.raises(ValueError, match="scalar"):
    parallel.shard_batch(jnp.float32(1.0), mesh)


def test_pad_to_multiple():
  tree = {"x": jnp.arange(10.0).reshape(5, 2), "y": jnp.arange(5)}
  padded, valid = parallel.pad_to_multiple(tree, 4)
  np.testing.assert_array_equal(padded["y"], [0, 1, 2, 3, 4, 4, 4, 4])
  np.testing.assert_array_equal(padded["x"][5:], [[8.0, 9.0]] * 3)
  np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)
  same, valid = parallel.pad_to_multiple(tree, 5)
  assert same["x"].shape == (5, 2) and bool(valid.all())
  with pytest.raises(ValueError, match="share the leading batch size"):
    parallel.pad_to_multiple({"a": jnp.ones(3), "b": jnp.ones(4)}, 2)


def _grad_fn(method):
  def loss(params, x, targets, lambdas, active):
    return kkt.deepkkt_loss(
      mlp_apply, params, x, targets, lambdas, active=active, method=method
    )

  return jax.jit(
    jax.value_and_grad(loss, argnums=(1, 3), has_aux=True),
  )


@pytest.mark.parametrize("method", kkt.METHODS)
def test_sharded_deepkkt_equals_single_device(x64, method):
  params, x, targets, lambdas = make_problem(8)
  active = jnp.arange(8) != 5
  grad_fn = _grad_fn(method)
  (value, aux), (gx, gl) = grad_fn(params, x, targets, lambdas, active)

  mesh = parallel.make_mesh()
  batch = parallel.shard_batch((x, targets, lambdas, active), mesh)
  for a in batch:
    assert a.sharding.spec == PartitionSpec(parallel.DATA_AXIS)
    assert len(a.sharding.device_set) == NUM_DEVICES
  sharded_params = parallel.replicate(params, mesh)
  (s_value, s_aux), (s_gx, s_gl) = grad_fn(sharded_params, *batch)

  assert len(s_gx.sharding.device_set) == NUM_DEVICES
  np.testing.assert_allclose(s_value, value, rtol=1e-12)
  np.testing.assert_allclose(s_gx, gx, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(s_gl, gl, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(s_aux["entropy"], aux["entropy"], rtol=1e-12)
  assert int(s_aux["num_active"]) == 7


def test_sharded_padded_batch_equals_unpadded(x64):
  # 6 candidates on 4 devices: pad to 8 and mask the padding as inactive.
  params, x, targets, lambdas = make_problem(6, seed=1)
  grad_fn = _grad_fn("fast")
  (value, _), (gx, gl) = grad_fn(params, x, targets, lambdas, None)

  mesh = parallel.make_mesh()
  padded, valid = parallel.pad_to_multiple(
    (x, targets, lambdas), parallel.num_shards(mesh)
  )
  batch = parallel.shard_batch((*padded, valid), mesh)
  (p_value, p_aux), (p_gx, p_gl) = grad_fn(
    parallel.replicate(params, mesh), *batch
  )
  np.testing.assert_allclose(p_value, value, rtol=1e-12)
  np.testing.assert_allclose(p_gx[:6], gx, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(p_gl[:6], gl, rtol=1e-10, atol=1e-14)
  assert float(jnp.abs(p_gx[6:]).max()) == 0.0
  assert float(jnp.abs(p_gl[6:]).max()) == 0.0
  assert int(p_aux["num_active"]) == 6


def test_doctests():
  result = doctest.testmod(parallel)
  assert result.attempted > 0
  assert result.failed == 0


def test_balanced_chunk():
  assert parallel.balanced_chunk(1132, 1024) == 566
  assert parallel.balanced_chunk(2048, 1024) == 1024
  assert parallel.balanced_chunk(100, 1024) == 100
  for n in (1, 7, 999, 1025, 54000):
    for size in (1, 3, 64, 1024):
      chunk = parallel.balanced_chunk(n, size)
      count = -(-n // chunk)
      assert chunk <= size and count == -(-n // size)  # As few chunks.
      assert count * chunk - n < count  # Padding below one row per chunk.
  with pytest.raises(ValueError, match="chunk_size >= 1"):
    parallel.balanced_chunk(10, 0)
