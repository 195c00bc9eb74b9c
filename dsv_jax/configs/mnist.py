"""MNIST (28x28 grey, 10 classes): IDX files in `data.data_dir`, or TFDS."""

from dsv_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, tiny=False)
  c = common.base_config()
  c.data.name = "mnist"
  c.model.width = 64
  c.train.steps = 3000
  c.train.flip = False  # Digits are not left-right symmetric.
  c.train.max_shift = 2
  c.train.eval_every = 1000
  c.train.ckpt_every = 500
  if args.tiny:
    common.apply_tiny(c)
  return c
