"""Which rows of the training set each process holds during a fit.

The set is cut into chunks of consecutive rows, each chunk split over the
``data`` devices of the mesh; a process holds the rows of its own devices.
The split depends on the device count, never on the process count, so a
fit resumes on another number of processes.
"""

from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from dsv_jax import parallel

if TYPE_CHECKING:
  from dsv_jax.select.fista import SolverState


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Layout(NamedTuple):
  """Which rows of the set a process holds, and where they go.

  The set is cut into chunks of ``chunk`` consecutive rows, each split
  over the ``data`` devices (``shard`` rows each; the last chunk padded):
  a process holds the rows of its devices, chunk by chunk -- a split that
  depends on the device count, never on the process count.
  """

  chunk: int
  shard: int
  devices: tuple[jax.Device, ...]  # the process's devices, in mesh order
  rows: np.ndarray  # int [M]: global index of each local row
  # int [num_chunks, len(devices), shard]: the local row each device's
  # slot takes (padding: the last real local row before it).
  index: np.ndarray
  real: np.ndarray  # bool, like index: the slot holds a real row


def make_layout(n: int, chunk_size: int, mesh: Mesh, process: int) -> Layout:
  """The `Layout` of ``process`` for ``n`` rows in chunks of about
  ``chunk_size`` over the devices of ``mesh``."""
  shards = parallel.num_shards(mesh)
  chunk = _round_up(parallel.balanced_chunk(n, chunk_size), shards)
  shard = chunk // shards
  devices = list(mesh.devices.reshape(-1))
  mine = [i for i, d in enumerate(devices) if d.process_index == process]
  starts = np.arange(-(-n // chunk))[:, None] * chunk
  grid = (starts + np.array(mine)[None] * shard)[..., None] + np.arange(shard)
  real = grid < n
  rows = grid[real]
  if not rows.size:
    raise ValueError(
      f"x has {n} samples: too few for {shards} devices, process {process} "
      "gets none."
    )
  local = np.cumsum(real.reshape(len(grid), -1).sum(1)) - 1
  index = np.broadcast_to(local[:, None, None], grid.shape).copy()
  index[real] = np.arange(rows.size)
  return Layout(
    chunk,
    shard,
    tuple(devices[i] for i in mine),
    rows,
    np.maximum(index, 0),
    real,
  )


def process_rows(n: int, *, chunk_size: int, mesh: Mesh) -> np.ndarray:
  """Indices of the samples this process holds in `fit_lambdas`.

  The rows its devices take in every chunk of ``chunk_size`` (as rounded
  by `fit_lambdas`), in the order the solver keeps them: pass
  ``x[rows]``, ``targets[rows]`` and ``num_samples=n`` to `fit_lambdas`
  to stream only them. Depends on the devices of ``mesh``, not on the
  number of processes; with one process, ``arange(n)``.
  """
  return make_layout(n, chunk_size, mesh, jax.process_index()).rows


def gather_rows(
  local: np.ndarray, n: int, *, chunk_size: int, mesh: Mesh
) -> np.ndarray:
  """The ``[n, ...]`` vector of every process's `process_rows` values.

  A collective (every process calls it); with one process ``local``.
  """
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  layouts = [
    make_layout(n, chunk_size, mesh, p) for p in range(jax.process_count())
  ]
  size = max(len(lay.rows) for lay in layouts)
  padded = np.zeros((size, *local.shape[1:]), local.dtype)
  padded[: len(local)] = local
  every = np.asarray(multihost_utils.process_allgather(padded))
  out = np.zeros((n, *local.shape[1:]), local.dtype)
  for lay, values in zip(layouts, every, strict=True):
    out[lay.rows] = values[: len(lay.rows)]
  return out


def gather_state(
  state: "SolverState", n: int, *, chunk_size: int, mesh: Mesh
) -> "SolverState":
  """The state with every sample's values (e.g. to checkpoint), from the
  per-process state `fit_lambdas` passes its callback. A collective."""
  if jax.process_count() == 1:
    return state
  kw = dict(chunk_size=chunk_size, mesh=mesh)
  return state._replace(
    contributions=gather_rows(np.asarray(state.contributions), n, **kw),
    contributions_prev=gather_rows(
      np.asarray(state.contributions_prev), n, **kw
    ),
  )
