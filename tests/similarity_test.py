"""SSIM and best-match search against an explicit loop-over-windows SSIM."""

import numpy as np
import pytest

from dsv_jax import similarity


def reference_ssim(a, b, *, win=7, sigma=1.5, data_range=1.0):
  """Wang et al. 2004 written out: loops over channels and window positions,
  float64, weighted moments straight from their definitions."""
  r = np.arange(win) - win // 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  w = np.outer(g, g)
  w /= w.sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  h, wd, ch = a.shape
  vals = []
  for c in range(ch):
    for i in range(h - win + 1):
      for j in range(wd - win + 1):
        x = a[i : i + win, j : j + win, c].astype(np.float64)
        y = b[i : i + win, j : j + win, c].astype(np.float64)
        mx, my = np.sum(w * x), np.sum(w * y)
        vx = np.sum(w * (x - mx) ** 2)
        vy = np.sum(w * (y - my) ** 2)
        cxy = np.sum(w * (x - mx) * (y - my))
        vals.append(
          (2 * mx * my + c1)
          * (2 * cxy + c2)
          / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        )
  return float(np.mean(vals))


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return rng.uniform(size=(12, 9, 10, 2)).astype(np.float32)


def test_ssim_matches_the_explicit_formula(images):
  a, b = images[:6], images[6:]
  got = np.asarray(similarity.ssim(a, b))
  want = [reference_ssim(x, y) for x, y in zip(a, b, strict=True)]
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_ssim_window_and_range_options(images):
  a, b = images[0] * 2.0, images[1] * 2.0
  got = similarity.ssim(a, b, win_size=5, sigma=1.0, data_range=2.0)
  np.testing.assert_allclose(
    got, reference_ssim(a, b, win=5, sigma=1.0, data_range=2.0), atol=2e-6
  )


def test_ssim_properties(images):
  a, b = images[0], images[1]
  np.testing.assert_allclose(similarity.ssim(a, a), 1.0, atol=1e-6)
  np.testing.assert_allclose(
    similarity.ssim(a, b), similarity.ssim(b, a), atol=1e-7
  )
  assert similarity.ssim(a, b) < 0.5  # independent noise
  # A smooth image: luminance shift and contrast loss each lower SSIM.
  yy, xx = np.mgrid[0:9, 0:10] / 9.0
  s = (0.5 + 0.4 * np.sin(3 * xx + 2 * yy))[..., None].astype(np.float32)
  shifted = np.clip(s + 0.3, 0, 1)
  flat = 0.5 + 0.3 * (s - 0.5)
  assert 0 < similarity.ssim(s, shifted) < 0.99
  assert 0 < similarity.ssim(s, flat) < 0.99
  assert similarity.ssim(s, 1.0 - s) < 0  # anti-correlated structure
  every = similarity.ssim(images[:, None], images[None, :])
  assert np.all(np.asarray(every) <= 1.0 + 1e-6)


def test_best_match_is_the_argmax_of_pairwise_ssim(images):
  rng = np.random.default_rng(1)
  refs = images
  # Noisy copies of references 3, 7, 1, 3 and two fresh noise images.
  q = np.concatenate(
    [
      np.clip(refs[[3, 7, 1, 3]] + rng.normal(0, 0.05, (4, 9, 10, 2)), 0, 1),
      rng.uniform(size=(2, 9, 10, 2)),
    ]
  ).astype(np.float32)
  full = np.array([[reference_ssim(x, y) for y in refs] for x in q])
  # block_elements small enough to force several blocks and a padded one.
  idx, val = similarity.best_match(q, refs, block_elements=3 * 12 * 24)
  np.testing.assert_array_equal(idx, full.argmax(1))
  np.testing.assert_array_equal(idx[:4], [3, 7, 1, 3])
  np.testing.assert_allclose(val, full.max(1), atol=2e-6)


def test_bad_inputs_raise_one_line_errors(images):
  with pytest.raises(ValueError, match="smaller than the 7x7"):
    similarity.ssim(np.zeros((6, 6, 1)), np.zeros((6, 6, 1)))
  with pytest.raises(ValueError, match="one shape"):
    similarity.ssim(images[0], images[0, :8])
  with pytest.raises(ValueError, match="one image shape"):
    similarity.best_match(images, images[:, :8])
  with pytest.raises(ValueError, match="empty"):
    similarity.best_match(images, images[:0])
  with pytest.raises(ValueError, match="odd"):
    similarity.ssim(images[0], images[1], win_size=4)


def test_matches_scikit_image_with_wangs_window():
  metrics = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(2)
  a = rng.uniform(size=(24, 20, 3))
  b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
  want = metrics.structural_similarity(
    a,
    b,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
    data_range=1.0,
    channel_axis=-1,
  )
  got = similarity.ssim(a.astype(np.float32), b.astype(np.float32), win_size=11)
  np.testing.assert_allclose(got, want, atol=1e-5)
