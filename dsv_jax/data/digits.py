"""scikit-learn's bundled 8x8 handwritten digits: the offline default."""

import numpy as np

# `load_digits` pixels are counts of set pixels in 4x4 blocks: 0..16.
DIGITS_MAX_VALUE = 16


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as ``(uint8[1797, 8, 8, 1] in 0..16, int32[1797])``."""
  # Imported here so that `import dsv_jax.data` does not pay for sklearn.
  from sklearn.datasets import load_digits

  bunch = load_digits()
  images = bunch.images.astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int32)
