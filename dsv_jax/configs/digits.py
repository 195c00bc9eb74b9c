"""scikit-learn's bundled 8x8 digits: the offline default (runs anywhere).

Usage: `--config configs/digits.py` (full) or `configs/digits.py:tiny`.
"""

from dsv_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, tiny=False)
  c = common.base_config()
  c.data.name = "digits"
  c.model.width = 64
  c.model.depth = 3
  c.train.steps = 800
  c.train.batch_size = 64
  # Digits are not left-right symmetric; a one-pixel shift is the only
  # augmentation that keeps an 8x8 digit recognisable.
  c.train.flip = False
  c.train.max_shift = 1
  c.train.eval_every = 200
  c.train.ckpt_every = 200
  # Synthesis: no flip in A(x), for the same reason (the classifier never
  # saw flipped digits); the other strengths are METHOD.md's.
  c.synth.aug_flip = 0.0
  if args.tiny:
    common.apply_tiny(c)
  return c
