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


__all__ = ["flip_and_translate", "random_flip", "random_translate"]
