"""Classical judges: agreement and nearest-real distances vs references."""

import numpy as np
import pytest

from dsv_jax import configs, data, judges
from dsv_jax.experiment import common


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits")


@pytest.fixture(scope="module")
def fitted(digits):
  return judges.fit_classical(
    digits.train["image"], digits.train["label"], digits.info, svm_max_train=600
  )


def test_real_images_agree_and_noise_does_not(digits, fitted):
  val = digits.validation
  real = judges.classical_agreement(
    fitted, val["image"], val["label"], digits.info
  )
  assert set(real) == {*judges.JUDGES, "mean"}
  assert min(real[j] for j in judges.JUDGES) > 0.85
  np.testing.assert_allclose(
    real["mean"], np.mean([real[j] for j in judges.JUDGES])
  )
  rng = np.random.default_rng(0)
  noise = rng.normal(size=(200, 8, 8, 1)).astype(np.float32)
  labels = np.arange(200) % 10
  fake = judges.classical_agreement(fitted, noise, labels, digits.info)
  assert fake["mean"] < 0.3
  # The raw pixels judged are the denormalised ones, clipped to [0, 1].
  raw = np.clip(digits.info.denormalize(val["image"][:5]), 0, 1)
  got = fitted["1nn"].predict(raw.reshape(5, -1))
  np.testing.assert_array_equal(
    got, [fitted["1nn"].predict(raw[i].reshape(1, -1))[0] for i in range(5)]
  )


def test_nearest_real_distance_known_answer(digits):
  # A training image's own distance is 0; a shifted copy is exactly the
  # shift away from it in raw pixels (if nothing nearer).
  info = digits.info
  x, y = digits.train["image"][:50], digits.train["label"][:50]
  out = judges.nearest_real_distance(x[:10], y[:10], x, y, info)
  assert out["pixels"] == pytest.approx(0.0, abs=1e-5)

  def feats(images):
    return np.asarray(images).reshape(len(images), -1)[:, :3]

  out = judges.nearest_real_distance(
    x[:10],
    y[:10],
    x[:40],
    y[:40],
    info,
    reference_images=x[40:],
    reference_labels=y[40:],
    features_fn=feats,
  )
  assert out["features"] == pytest.approx(0.0, abs=1e-5)
  # Reference: brute force over the same-class training images (x[:40]).
  raw = np.clip(info.denormalize(x), 0, 1).reshape(50, -1)
  want = []
  for i in range(40, 50):
    same = [j for j in range(40) if y[j] == y[i]]
    want.append(min(np.linalg.norm(raw[i] - raw[j]) for j in same))
  assert out["pixels_real"] == pytest.approx(np.mean(want), rel=1e-5)
  assert out["pixels_real"] > 0.5


def test_pipeline_judges_are_fitted_once_per_training_split():
  # The report's many synthesis sub-runs share one fit of the judges.
  c = configs.get_config("digits", "tiny")
  ds = common.load_data(c)
  first = common.classical_judges(c, ds)
  assert common.classical_judges(c, ds) is first
  c.data.max_train = 150  # Another training split: its own fit.
  other = common.classical_judges(c, common.load_data(c))
  assert other is not first
  assert len(other["1nn"].classes_) == 10
