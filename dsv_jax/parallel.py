"""Sharding candidates over a one-axis ``data`` mesh.

The only module of dsv_jax that touches ``jax.sharding``. The layout is
the usual data-parallel one: parameters and optimiser state are replicated
(``P()``); candidates, targets, multipliers and masks are split along
their leading axis over the ``data`` axis (``P("data")``). Under
``jax.jit`` XLA then turns the lambda-weighted gradient sum of the
stationarity term into an all-reduce; no ``shard_map`` or ``psum`` is
needed. With ``chunk_size`` (`dsv_jax.kkt`) that holds when the padded N
and ``chunk_size`` are both multiples of `num_shards`: every chunk is then
split over the devices.

The mesh axis uses ``AxisType.Auto`` (``jax.make_mesh`` defaults to Explicit
axis types, which would make sharding part of every array's type).

Typical use::

  mesh = parallel.make_mesh()
  x, targets, lambdas, active = parallel.pad_to_multiple(
      (x, targets, lambdas, active), parallel.num_shards(mesh))
  x, targets, lambdas, active = parallel.shard_batch(
      (x, targets, lambdas, active), mesh)
  params = parallel.replicate(params, mesh)
"""

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv_jax.types import PyTree

DATA_AXIS = "data"


def make_mesh(
  num_devices: int | None = None,
  *,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A one-axis mesh ``("data",)`` with Auto axis type.

  Args:
    num_devices: how many devices to use (the first ones of ``devices``);
      None for all of them.
    devices: the devices to choose from; ``jax.devices()`` if None.

  Returns:
    A ``jax.sharding.Mesh`` with the single axis ``"data"``.

  Examples:
    >>> from dsv_jax import parallel
    >>> mesh = parallel.make_mesh(1)
    >>> mesh.axis_names, parallel.num_shards(mesh)
    (('data',), 1)
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    num_devices = len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(
      f"num_devices must lie in [1, {len(devices)}] (the available devices), "
      f"got {num_devices}."
    )
  return jax.make_mesh(
    (num_devices,),
    (DATA_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices[:num_devices],
  )


def num_shards(mesh: Mesh) -> int:
  """Number of devices along the ``data`` axis."""
  return mesh.shape[DATA_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``data`` (``P("data")``), e.g. for jit."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Fully replicated (``P()``), e.g. for parameters in jit."""
  return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree: PyTree, mesh: Mesh) -> PyTree:
  """Puts every leaf with its leading axis split over ``data``.

  Args:
    tree: a pytree of arrays sharing a leading batch axis ``[N, ...]``.
    mesh: a mesh with a ``data`` axis.

  Returns:
    The same pytree, each leaf sharded as ``P("data")``.

  Raises:
    ValueError: a leaf is a scalar, or N is not divisible by the number of
      devices along ``data`` (pad first with ``pad_to_multiple``).
  """
  shards = num_shards(mesh)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = jnp.shape(leaf)
    where = jax.tree_util.keystr(path) or "the array"
    if not shape:
      raise ValueError(f"{where} is a scalar: it has no batch axis to shard.")
    if shape[0] % shards:
      raise ValueError(
        f"{where} has batch size {shape[0]}, not divisible by the {shards} "
        f"devices of the '{DATA_AXIS}' axis; pad it with "
        "parallel.pad_to_multiple (and mask the padding) first."
      )
  return put(tree, batch_sharding(mesh))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Puts a full copy of every leaf on every device of ``mesh`` (``P()``)."""
  return put(tree, replicated_sharding(mesh))


def put(tree: PyTree, sharding) -> PyTree:
  """`jax.device_put(tree, sharding)` that also works across processes.

  With one process it is `jax.device_put`. With several, a leaf that is
  already a global array is resharded; any other leaf (numpy, or an array
  on this process's devices) must hold the same values on every process:
  each process builds its own shards of the global array from it
  (`jax.make_array_from_callback`), with no cross-process equality check
  (`jax.device_put` would run one, a collective per leaf).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(leaf, s):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, s)
    if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
      # Typed keys have no numpy form: their raw data goes instead.
      data = one(jax.random.key_data(leaf), s)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, s, lambda i: host[i])

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda leaf: one(leaf, sharding), tree)
  return jax.tree.map(one, tree, sharding)


def to_host(tree: PyTree) -> PyTree:
  """Every leaf as a numpy array holding the whole (global) value.

  `np.asarray` of an array sharded over several processes' devices fails
  (no process holds all of it): such leaves are gathered
  (`multihost_utils.process_allgather`), a collective every process must
  call. Other leaves are converted in place.
  """

  def one(leaf):
    if (
      isinstance(leaf, jax.Array)
      and not leaf.is_fully_addressable
      and not leaf.is_fully_replicated
    ):
      from jax.experimental import multihost_utils

      return multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf)

  return jax.tree.map(one, tree)


def from_device_pieces(
  shape: tuple[int, ...],
  sharding: NamedSharding,
  pieces: Sequence[np.ndarray],
  devices: Sequence[jax.Device],
) -> jax.Array:
  """A global array from this process's shards alone, no communication.

  ``pieces[i]`` is the shard of ``devices[i]`` (one of this process's
  devices in ``sharding``); every process passes its own, so none holds
  (or reads) the others' rows.
  """
  arrays = [jax.device_put(p, d) for p, d in zip(pieces, devices, strict=True)]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def local_pieces(array: jax.Array, devices: Sequence[jax.Device]) -> list:
  """The shards of ``array`` on ``devices`` (this process's), as numpy."""
  by_device = {s.device: s.data for s in array.addressable_shards}
  return [np.asarray(by_device[d]) for d in devices]


def process_sum(*values) -> tuple:
  """Each value summed over the processes (float64); as given with one.

  One small gather of ``len(values)`` scalars per process: the way to
  reduce per-process partial sums (dot products, counts) on the host.
  """
  return _process_reduce(values, np.sum)


def process_max(*values) -> tuple:
  """Each value's maximum over the processes; as given with one."""
  return _process_reduce(values, np.max)


def _process_reduce(values: tuple, op) -> tuple:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils

  # As the bits of float64: a jax array of float64 is float32 without x64.
  bits = np.asarray(values, np.float64).view(np.int32)
  every = np.asarray(multihost_utils.process_allgather(bits))
  return tuple(op(every.view(np.float64), 0).tolist())


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes each kind of collective of a compiled program moves per device.

  From ``jax.jit(f).lower(...).compile().as_text()``: the result shapes of
  every all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute (their ``-start`` forms included), summed per kind.
  """
  out = {}
  pattern = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\("
  )
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if m:
      out[m.group(2)] = out.get(m.group(2), 0) + _shape_bytes(m.group(1))
  return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(shapes: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", shapes):
    size = int(np.prod([int(d) for d in dims.split(",") if d]))
    total += size * _DTYPE_BYTES.get(dtype, 4)
  return total


def pad_to_multiple(tree: PyTree, multiple: int) -> tuple[PyTree, jax.Array]:
  """Pads the leading axis of every leaf to a multiple of ``multiple``.

  Padding rows repeat the last row (so a model never sees an arbitrary
  input); the returned ``valid`` mask is False on them. Pass it as the
  ``active`` mask of ``kkt.deepkkt_loss`` (or ``and`` it with one), so padded
  rows contribute nothing to any term and get zero gradients.

  Args:
    tree: a pytree of arrays sharing a leading batch axis ``[N, ...]``.
    multiple: the granule, usually ``num_shards(mesh)``.

  Returns:
    ``(padded_tree, valid)`` with leaves ``[M, ...]``, ``M`` the smallest
    multiple of ``multiple`` that is >= N, and ``valid`` ``bool[M]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from dsv_jax import parallel
    >>> (x,), valid = parallel.pad_to_multiple((jnp.arange(3.0),), 4)
    >>> print(x, valid)
    [0. 1. 2. 2.] [ True  True  True False]
  """
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}.")
  sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(
      "every leaf must share the leading batch size; got sizes "
      f"{sorted(sizes)}."
    )
  (n,) = sizes
  pad = -n % multiple

  def pad_leaf(leaf):
    widths = [(0, pad)] + [(0, 0)] * (jnp.ndim(leaf) - 1)
    return jnp.pad(leaf, widths, mode="edge")

  padded = jax.tree.map(pad_leaf, tree) if pad else tree
  return padded, jnp.arange(n + pad) < n


def balanced_chunk(n: int, chunk_size: int) -> int:
  """The chunk size that covers ``n`` samples in equal chunks.

  As few chunks as ``chunk_size`` allows, all of (nearly) equal size: 1132
  samples with chunk_size 1024 go in two chunks of 566 rather than 1024
  plus a last chunk padded to 1024 (45% of the work wasted on padding).
  """
  if n < 1 or chunk_size < 1:
    raise ValueError(f"need n >= 1 and chunk_size >= 1, got {n}, {chunk_size}.")
  return -(-n // -(-n // chunk_size))


__all__ = [
  "DATA_AXIS",
  "balanced_chunk",
  "batch_sharding",
  "collective_bytes",
  "from_device_pieces",
  "local_pieces",
  "make_mesh",
  "num_shards",
  "pad_to_multiple",
  "process_max",
  "process_sum",
  "put",
  "replicate",
  "replicated_sharding",
  "shard_batch",
  "to_host",
]
