"""Fixed-shape batches over host arrays: one compiled program for any N."""

from collections.abc import Iterator, Sequence

import numpy as np


def padded_batches(
  arrays: Sequence[np.ndarray], size: int
) -> Iterator[tuple[list[np.ndarray], int]]:
  """Consecutive batches of ``size`` rows of every array, the last padded.

  The last batch is padded by repeating its last row (the model never
  sees an arbitrary input, so padded outputs stay finite and a mask or a
  zero weight removes them exactly): every batch has the same shape, and
  a jitted function over them compiles once.

  Args:
    arrays: host arrays with the same number of rows N >= 1.
    size: rows per batch (>= 1).

  Yields:
    ``(batch, real)``: the batch of every array, and how many of its rows
    are real (the first ``real``; ``size`` for all but the last batch).

  Examples:
    >>> import numpy as np
    >>> from dsv_jax.batches import padded_batches
    >>> for (x,), real in padded_batches([np.arange(5)], 2):
    ...   print(x, real)
    [0 1] 2
    [2 3] 2
    [4 4] 1
  """
  if size < 1:
    raise ValueError(f"batch size must be >= 1, got {size}.")
  n = len(arrays[0])
  for start in range(0, n, size):
    batch = [a[start : start + size] for a in arrays]
    real = len(batch[0])
    if real < size:
      batch = [
        np.concatenate([b, np.repeat(b[-1:], size - real, 0)]) for b in batch
      ]
    yield batch, real


__all__ = ["padded_batches"]
