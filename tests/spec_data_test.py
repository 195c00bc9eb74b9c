"""Specification test of `data.load_dataset`'s normalisation on 3-channel
data whose channels differ: mean and std are per channel, exact over the
training split after the validation carve and before any ``max_*``
subset, and every split is normalised with them.

The raw data is built here and served through the TFDS reader's seam
(`tfds_source.load_tfds`), so nothing is read from disk.
"""

import numpy as np
import pytest

from dsv_jax import data
from dsv_jax.data import tfds_source

N_TRAIN, N_TEST, C = 60, 12, 3


def _raw():
  rng = np.random.default_rng(0)

  def images(n):
    # Channel 0 dark and narrow, channel 1 bright, channel 2 the full
    # range: three different means and stds.
    return np.stack(
      [
        rng.integers(0, 40, (n, 4, 5)),
        rng.integers(150, 256, (n, 4, 5)),
        rng.integers(0, 256, (n, 4, 5)),
      ],
      -1,
    ).astype(np.uint8)

  labels = lambda n: (np.arange(n) % 3).astype(np.int32)
  # The test split is brighter: normalising it with its own statistics
  # would differ from normalising it with the training split's.
  test = np.minimum(images(N_TEST).astype(int) + 30, 255).astype(np.uint8)
  return {
    "train": (images(N_TRAIN), labels(N_TRAIN)),
    "test": (test, labels(N_TEST)),
  }


@pytest.fixture
def served(monkeypatch):
  raw = _raw()
  monkeypatch.setattr(
    tfds_source, "load_tfds", lambda name, data_dir: (raw, ("a", "b", "c"))
  )
  return raw


def _match(normalised, raw_images):
  """Index of the raw image each normalised one was made from.

  Normalisation is affine per channel with a positive scale, so the right
  raw image is the one correlated 1 with it on every channel (found
  without assuming any statistics).
  """
  out = []
  for z in normalised:
    corr = [
      min(
        np.corrcoef(z[..., c].ravel(), r[..., c].ravel().astype(float))[0, 1]
        for c in range(C)
      )
      for r in raw_images
    ]
    assert max(corr) > 1 - 1e-5
    out.append(int(np.argmax(corr)))
  return np.array(out)


def test_statistics_are_per_channel_over_the_carved_training_split(served):
  ds = data.load_dataset("cifar10")
  raw_train = served["train"][0]
  rows = _match(ds.train["image"], raw_train)
  val_rows = _match(ds.validation["image"], raw_train)
  # Train and validation partition the raw training split.
  assert sorted([*rows, *val_rows]) == list(range(N_TRAIN))
  assert len(val_rows) == 6  # 10% held out
  pixels = raw_train[rows].astype(np.float64) / 255
  want_mean = pixels.mean(axis=(0, 1, 2))
  want_std = pixels.std(axis=(0, 1, 2))
  assert np.ptp(want_mean) > 0.3 and np.ptp(want_std) > 0.05
  np.testing.assert_allclose(ds.info.mean, want_mean, rtol=1e-12)
  np.testing.assert_allclose(ds.info.std, want_std, rtol=1e-12)
  # Each split is (x / 255 - mean_c) / std_c with the training statistics.
  for split, source, idx in [
    (ds.train, raw_train, rows),
    (ds.validation, raw_train, val_rows),
    (ds.test, served["test"][0], np.arange(N_TEST)),
  ]:
    want = (source[idx] / 255 - want_mean) / want_std
    np.testing.assert_allclose(split["image"], want, rtol=1e-5, atol=1e-5)
  # The normalised training split has mean 0 and std 1 on every channel.
  np.testing.assert_allclose(ds.train["image"].mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(ds.train["image"].std((0, 1, 2)), 1, atol=1e-5)
  np.testing.assert_allclose(
    ds.info.pixel_min, -want_mean / want_std, rtol=1e-6
  )
  np.testing.assert_allclose(
    ds.info.pixel_max, (1 - want_mean) / want_std, rtol=1e-6
  )


def test_subsets_do_not_change_the_statistics(served):
  del served
  full = data.load_dataset("cifar10").info
  small = data.load_dataset("cifar10", max_train=9, seed=3).info
  assert small.mean == full.mean and small.std == full.std
