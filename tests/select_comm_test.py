"""Selection's communication: O(P) per iteration, never O(N) (issue 17).

Single process over the 4 fake CPU devices of tests/conftest.py: the
collectives XLA compiles into the per-iteration programs are those a run
over several processes executes; an N-vector gathered anywhere shows up as
an all-gather that grows with N.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import parallel, select
from dsv_jax.select.layout import make_layout
from dsv_jax.select.operator import make_operator


def _mlp(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]


def _problem(n):
  k = jax.random.split(jax.random.key(0), 4)
  params = {
    "w1": jax.random.normal(k[0], (4, 3)),
    "w2": jax.random.normal(k[1], (3, 3)),
    "b": 0.1 * jax.random.normal(k[2], (3,)),
  }
  x = np.asarray(jax.random.normal(k[3], (n, 4)))
  return params, x, np.arange(n, dtype=np.int32) % 3


def _bytes_per_iteration(n, strategy, chunk_size=128):
  """{collective: bytes per device} of one matvec and one rmatvec."""
  params, x, labels = _problem(n)
  mesh = parallel.make_mesh(4)
  layout = make_layout(n, chunk_size, mesh, jax.process_index())
  op = make_operator(
    _mlp, params, x, labels, layout=layout, mesh=mesh, strategy=strategy
  )
  total = {}
  for text, calls in op.programs().values():
    for kind, size in parallel.collective_bytes(text).items():
      total[kind] = total.get(kind, 0) + size * calls
  return total


@pytest.mark.parametrize("strategy", ["host", "device"])
def test_per_iteration_collectives_are_one_p_sized_all_reduce(strategy):
  p_bytes = 4 * sum(a.size for a in jax.tree.leaves(_problem(1)[0]))
  # 4 and 8 chunks of 128: neither the chunk count nor N changes the bytes.
  small = _bytes_per_iteration(500, strategy)
  large = _bytes_per_iteration(1000, strategy)
  assert small == large == {"all-reduce": p_bytes}


def test_collective_bytes_sees_a_gathered_n_vector():
  # The counter itself: replicating an N-vector split over the devices is
  # an all-gather of N floats (the regression the test above would catch).
  mesh = parallel.make_mesh(4)
  gather = jax.jit(
    lambda v: v, out_shardings=parallel.replicated_sharding(mesh)
  )
  vec = jax.ShapeDtypeStruct(
    (1000,), jnp.float32, sharding=parallel.batch_sharding(mesh)
  )
  text = gather.lower(vec).compile().as_text()
  assert parallel.collective_bytes(text) == {"all-gather": 4000}


def test_iterations_gather_nothing(monkeypatch):
  """No per-sample vector is gathered to the host between iterations."""
  params, x, labels = _problem(200)
  gathered = []
  iterating = []
  to_host = parallel.to_host

  def spy(tree):
    if iterating:
      gathered.append(jax.tree.map(np.shape, tree))
    return to_host(tree)

  monkeypatch.setattr(parallel, "to_host", spy)
  _, info = select.fit_lambdas(
    _mlp,
    params,
    x,
    labels,
    max_iters=3,
    tol=0.0,
    chunk_size=64,
    on_state=lambda state: iterating.append(int(state.step)),
  )
  assert info.iterations == 3 and iterating == [1, 2, 3]
  assert gathered == []


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


class _Mesh:
  """The parts of a 2-process x 2-device mesh `make_layout` reads."""

  shape = {parallel.DATA_AXIS: 4}
  devices = np.array([_Device(0), _Device(0), _Device(1), _Device(1)])


def test_process_rows_split_the_set_by_device_not_by_process():
  n, chunk_size = 30, 8  # Chunks of 8, 2 rows per device; 2 rows padding.
  one = make_layout(n, chunk_size, parallel.make_mesh(4), 0)
  np.testing.assert_array_equal(one.rows, np.arange(n))
  first, second = (make_layout(n, chunk_size, _Mesh(), p) for p in (0, 1))
  # Process 0 takes the first half of every chunk (its 2 devices).
  np.testing.assert_array_equal(first.rows[:6], [0, 1, 2, 3, 8, 9])
  np.testing.assert_array_equal(
    np.sort(np.concatenate([first.rows, second.rows])), np.arange(n)
  )
  # The padded slots (rows 30, 31: process 1, last chunk) repeat its last
  # real row, 29.
  last = second.index[-1]
  assert second.rows[last[~second.real[-1]]].tolist() == [29, 29]
  # Every device takes the same rows (and padding) as with one process.
  per_device = [lay.rows[lay.index] for lay in (first, second)]
  np.testing.assert_array_equal(
    np.concatenate(per_device, 1), one.rows[one.index]
  )
