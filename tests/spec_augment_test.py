"""Specification tests of `dsv_jax.augment` on constructed images whose
pixel values encode their own coordinates, so the geometry of every output
can be read off: crop-resize zooms IN to a window inside the image, whose
side fraction and position span their documented ranges; translation is a
zero-padded shift over the whole range [-max_shift, max_shift]^2.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import augment

H = W = 16
B = 200


def coordinate_images(b=B):
  """Channel 0 holds the row index, channel 1 the column index."""
  r = np.arange(H, dtype=np.float32)
  img = np.stack(np.meshgrid(r, r, indexing="ij"), -1)
  return jnp.asarray(np.broadcast_to(img, (b, H, W, 2)).copy())


def _window(out):
  """(side fraction, origin) of one resized window along each axis.

  Output pixel o of a window of side f * H at continuous origin c0 reads
  the input's pixel coordinate c0 + (o + 0.5) f - 0.5; bilinear
  interpolation reproduces a coordinate ramp exactly away from the
  borders, so the interior gives f (slope) and c0.
  """
  inner = np.arange(2, H - 2)
  rows = out[inner, W // 2, 0]
  cols = out[H // 2, inner, 1]
  res = []
  for ramp in (rows, cols):
    f, b0 = np.polyfit(inner, ramp, 1)
    np.testing.assert_allclose(ramp, f * inner + b0, atol=1e-3)  # linear
    res.append((f, b0 + 0.5 - 0.5 * f))
  return res


@pytest.fixture(scope="module")
def cropped():
  scale = 0.3
  x = coordinate_images()
  out = augment.random_crop_resize(jax.random.key(0), x, scale=scale)
  return scale, np.asarray(out)


def test_crop_resize_zooms_in_to_a_square_window_inside_the_image(cropped):
  scale, out = cropped
  fracs, rooms = [], []
  for img in out:
    (f_r, c_r), (f_c, c_c) = _window(img)
    # Each row of channel 0 is constant along columns (and vice versa):
    # no rotation, no mixing of axes.
    np.testing.assert_allclose(img[2:-2, :, 0].std(1), 0, atol=1e-4)
    np.testing.assert_allclose(img[:, 2:-2, 1].std(0), 0, atol=1e-4)
    np.testing.assert_allclose(f_r, f_c, atol=1e-4)  # square window
    # Zoom in: the window's side is a fraction in [1 - scale, 1] of the
    # image's, and the window lies inside the image.
    assert 1 - scale - 1e-4 <= f_r <= 1 + 1e-4
    for c0 in (c_r, c_c):
      assert -1e-3 <= c0 <= H * (1 - f_r) + 1e-3
      rooms.append((f_r, c0 / (H * (1 - f_r))))
    fracs.append(f_r)
  # Uniform draws: the side fraction spans its range, and the origin is
  # uniform over the free room whatever the side (so small windows, too,
  # reach both far edges).
  fracs = np.array(fracs)
  assert fracs.min() < 1 - 0.9 * scale and fracs.max() > 1 - 0.1 * scale
  small = [r for f, r in rooms if f < 1 - scale / 2]
  assert len(small) > B // 2
  assert min(small) < 0.1 and max(small) > 0.9
  assert abs(np.mean([r for _, r in rooms]) - 0.5) < 0.05
  # The two axes draw their positions independently.
  by_axis = np.array([r for _, r in rooms]).reshape(B, 2)
  assert abs(np.corrcoef(by_axis.T)[0, 1]) < 0.3
  # Images get independent windows.
  assert len(np.unique(np.round(fracs, 4))) > B // 2


def test_crop_resize_scale_zero_is_identity():
  x = coordinate_images(4).astype(jnp.bfloat16)
  out = augment.random_crop_resize(jax.random.key(1), x, scale=0.0)
  assert out.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def _shifts(x, out, max_shift):
  """The (dy, dx) with out[i, j] = x[i + dy, j + dx] (0 outside)."""
  found = []
  for img, src in zip(out, x, strict=True):
    hits = []
    for dy, dx in itertools.product(
      range(-max_shift - 1, max_shift + 2), repeat=2
    ):
      pad = max_shift + 1
      p = np.pad(src, ((pad, pad), (pad, pad), (0, 0)))
      want = p[pad + dy : pad + dy + H, pad + dx : pad + dx + W]
      if np.array_equal(img, want):
        hits.append((dy, dx))
    assert len(hits) == 1, hits
    found.append(hits[0])
  return found


@pytest.mark.parametrize("max_shift", [1, 2])
def test_translate_is_a_zero_padded_shift_over_the_full_range(max_shift):
  # Distinct positive values: a shift is identified uniquely.
  x = np.arange(B * H * W, dtype=np.float32).reshape(B, H, W, 1) + 1
  out = np.asarray(
    augment.random_translate(
      jax.random.key(2), jnp.asarray(x), max_shift=max_shift
    )
  )
  found = _shifts(x, out, max_shift)
  full = set(itertools.product(range(-max_shift, max_shift + 1), repeat=2))
  assert set(found) == full


def test_make_augment_translate_fraction_rounds_to_pixels():
  # translate=0.125 of a 16-pixel side: shifts up to 2 pixels, all of them.
  aug = augment.make_augment(translate=0.125, crop=0, flip=0, cutout=0, noise=0)
  x = np.arange(B * H * W, dtype=np.float32).reshape(B, H, W, 1) + 1
  out = np.asarray(jax.jit(aug)(jax.random.key(3), jnp.asarray(x)))
  found = set(_shifts(x, out, 2))
  assert found == set(itertools.product(range(-2, 3), repeat=2))


def test_flip_is_left_right_at_the_given_rate_per_image():
  x = np.arange(B * H * W, dtype=np.float32).reshape(B, H, W, 1)
  out = np.asarray(
    augment.random_flip(jax.random.key(4), jnp.asarray(x), prob=0.2)
  )
  flipped = np.array(
    [np.array_equal(o, s[:, ::-1]) for o, s in zip(out, x, strict=True)]
  )
  kept = np.array([np.array_equal(o, s) for o, s in zip(out, x, strict=True)])
  assert np.all(flipped ^ kept)
  # Binomial(200, 0.2): mean 40, sd 5.7.
  assert 20 < flipped.sum() < 60


def test_cutout_zeroes_one_square_of_the_documented_side():
  x = jnp.ones((B, H, W, 2))
  out = np.asarray(augment.random_cutout(jax.random.key(5), x, size=0.25))
  side = 4  # round(0.25 * 16)
  covered = np.zeros((H, W), bool)
  for img in out:
    hole = img[..., 0] == 0
    np.testing.assert_array_equal(hole, img[..., 1] == 0)  # all channels
    rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
    # A rectangle, clipped at the border, of side at most 4; exactly 4x4
    # when it does not touch a border.
    assert hole.sum() == len(rows) * len(cols)
    assert 1 <= len(rows) <= side and 1 <= len(cols) <= side
    if 0 < rows[0] and rows[-1] < H - 1 and 0 < cols[0] and cols[-1] < W - 1:
      assert len(rows) == len(cols) == side
    covered |= hole
  assert covered.all()  # the centre is uniform over the image


def test_gaussian_noise_has_the_given_std():
  x = jnp.zeros((B, H, W, 1))
  out = np.asarray(augment.gaussian_noise(jax.random.key(6), x, std=0.3))
  assert abs(out.std() - 0.3) < 0.01 and abs(out.mean()) < 0.01


def test_make_augment_applies_each_strength():
  x = np.arange(4 * H * W, dtype=np.float32).reshape(4, H, W, 1) + 1
  key = jax.random.key(7)
  off = dict(translate=0, crop=0, flip=0, cutout=0, noise=0)
  # All off: the identity.
  out = augment.make_augment(**off)(key, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(out), x)
  # Flip probability 1: every image flipped left-right.
  out = augment.make_augment(**{**off, "flip": 1.0})(key, jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(out), x[:, :, ::-1])
  # Noise only: x plus noise of that std.
  out = augment.make_augment(**{**off, "noise": 0.5})(key, jnp.asarray(x))
  assert abs(float(np.std(np.asarray(out) - x)) - 0.5) < 0.05
  for bad in (dict(crop=1.0), dict(flip=1.5), dict(noise=-0.1)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      augment.make_augment(**bad)
