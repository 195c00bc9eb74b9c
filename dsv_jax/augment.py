"""Pure-JAX, per-sample random image augmentations on batches [B, H, W, C].

Each function takes `key` first and draws independent randomness for every
image of the batch, so one call augments a whole (sharded) batch and the
result depends only on the key: training and synthesis derive that key from
`fold_in(key, step)`, which makes resumed runs reproduce uninterrupted ones.
"""

import jax
import jax.numpy as jnp


def random_flip(key: jax.Array, x: jax.Array, *, prob: float = 0.5):
  """Flips each image left-right with probability `prob`."""
  flip = jax.random.bernoulli(key, prob, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def random_translate(key: jax.Array, x: jax.Array, *, max_shift: int):
  """Shifts each image by up to `max_shift` pixels in each direction.

  The standard "pad and random crop" augmentation: the image is zero-padded
  by `max_shift` on every side (zero is the dataset mean in normalised
  space, so the padding carries no signal) and a crop of the original size
  is taken at a random offset.
  """
  if max_shift <= 0:
    return x
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def flip_and_translate(
  key: jax.Array, x: jax.Array, *, flip: bool, max_shift: int
) -> jax.Array:
  """The classifier-training augmentation: optional flip, then translation."""
  flip_key, shift_key = jax.random.split(key)
  if flip:
    x = random_flip(flip_key, x)
  return random_translate(shift_key, x, max_shift=max_shift)


def random_crop_resize(key: jax.Array, x: jax.Array, *, scale: float):
  """Crops a random square window and resizes it back to the image size.

  Each image gets a window whose side is a fraction drawn uniformly from
  ``[1 - scale, 1]`` of the image side, at a uniform random position; the
  window is resized (bilinear, differentiable in ``x``) to ``[H, W]``.
  ``scale=0`` is the identity (the paper's "crop 0.2" is ``scale=0.2``).
  """
  if scale <= 0:
    return x
  b, h, w, c = x.shape
  side_key, pos_key = jax.random.split(key)
  frac = jax.random.uniform(side_key, (b,), minval=1.0 - scale, maxval=1.0)
  # Window origin as a fraction of the free room (1 - frac) on each axis.
  pos = jax.random.uniform(pos_key, (b, 2)) * (1.0 - frac)[:, None]

  def one(img, f, p):
    s = 1.0 / f
    # Output pixel o samples input coordinate (o + 0.5 - t) / s - 0.5, so
    # t = -p * size * s maps output 0 to the window origin p * size.
    t = jnp.stack([-p[0] * h * s, -p[1] * w * s])
    return jax.image.scale_and_translate(
      img,
      (h, w, c),
      (0, 1),
      jnp.stack([s, s]),
      t,
      method="linear",
      antialias=False,
    )

  return jax.vmap(one)(x, frac, pos).astype(x.dtype)


def random_cutout(key: jax.Array, x: jax.Array, *, size: float):
  """Sets a random square of side ``size * H`` (rounded) to 0 per image.

  Zero is the dataset mean in normalised space, so the hole carries no
  signal. The square's centre is uniform over the image and the square is
  clipped at the borders (DeVries and Taylor's cutout).
  """
  b, h, w, _ = x.shape
  side = int(round(size * min(h, w)))
  if side <= 0:
    return x
  centre = jax.random.randint(key, (b, 2), 0, jnp.array([h, w]))
  top = centre[:, 0] - side // 2
  left = centre[:, 1] - side // 2
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
  in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
  hole = in_rows[:, :, None] & in_cols[:, None, :]
  return jnp.where(hole[..., None], jnp.zeros((), x.dtype), x)


def gaussian_noise(key: jax.Array, x: jax.Array, *, std: float):
  """Adds independent N(0, std^2) noise to every pixel."""
  if std <= 0:
    return x
  return x + std * jax.random.normal(key, x.shape, x.dtype)


def make_augment(
  *,
  translate: float = 0.125,
  crop: float = 0.2,
  flip: float = 0.5,
  cutout: float = 0.15,
  noise: float = 0.01,
):
  """The DSV manifold augmentation A(x) as one `augment(key, x)` function.

  Applied in the order crop-and-resize, translation, flip, cutout, noise,
  each with its own key split from `key` and independent per image.
  Defaults are the paper's ImageNet strengths (Appendix D): translation
  0.125 of the image side, crop 0.2, flip probability 0.5, cutout 0.15 of
  the side, Gaussian noise std 0.01 (in normalised pixel units). A strength
  of 0 turns that augmentation off.

  Args:
    translate: maximal shift as a fraction of the image side (rounded to
      whole pixels).
    crop: `random_crop_resize` scale.
    flip: probability of a left-right flip.
    cutout: `random_cutout` size.
    noise: `gaussian_noise` standard deviation.

  Returns:
    `augment(key, x[B, H, W, C]) -> x_aug[B, H, W, C]`, pure and jittable.
  """
  for name, v in [
    ("translate", translate),
    ("crop", crop),
    ("flip", flip),
    ("cutout", cutout),
    ("noise", noise),
  ]:
    if not 0 <= v or (name != "noise" and v > 1) or (name == "crop" and v >= 1):
      raise ValueError(f"augmentation strength {name}={v} out of range.")

  def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    k_crop, k_shift, k_flip, k_cut, k_noise = jax.random.split(key, 5)
    x = random_crop_resize(k_crop, x, scale=crop)
    shift = int(round(translate * min(x.shape[1], x.shape[2])))
    x = random_translate(k_shift, x, max_shift=shift)
    if flip > 0:
      x = random_flip(k_flip, x, prob=flip)
    x = random_cutout(k_cut, x, size=cutout)
    return gaussian_noise(k_noise, x, std=noise)

  return augment


__all__ = [
  "flip_and_translate",
  "gaussian_noise",
  "make_augment",
  "random_crop_resize",
  "random_cutout",
  "random_flip",
  "random_translate",
]
