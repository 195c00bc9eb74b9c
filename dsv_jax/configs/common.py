"""Shared pieces of the dataset configs: the base layout and arg parsing.

A config has the sections `seed, stage, data, model, train`; later stages
add theirs. Every field exists in the base config with its type, so a typo
on the command line (`--config.train.stepz=3`) or a wrong type fails fast
with the key's name (ml_collections' type-safe, locked ConfigDict).
"""

import ml_collections

# Variants every dataset config understands through `:arg`.
VARIANTS = ("tiny",)


def parse_arg(arg: str | None, **defaults):
  """Parses `"a=1,b=foo,flag"` into a ConfigDict over `defaults`.

  Each key must be one of `defaults`; values are converted to the type of
  the default (a bare key sets a bool default to True). Unknown keys raise.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in (arg or "").split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
        f"Unknown config arg {key!r}; expected one of {sorted(defaults)}."
      )
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("", "1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Fields common to every dataset; dataset configs override values."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = "all"

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  # Folder with the dataset (IDX files or prepared TFDS data); "" = default.
  c.data.data_dir = ""
  # Stratified subset sizes for quick runs; 0 = the whole split.
  c.data.max_train = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "convnet"
  c.model.width = 64
  c.model.depth = 3
  c.model.norm = "instance"
  c.model.pool = "avg"

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 128
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 5e-3
  c.train.flip = False
  c.train.max_shift = 1
  c.train.eval_every = 250
  c.train.log_every = 100
  c.train.ckpt_every = 250
  return c


def apply_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to seconds of work for smoke tests."""
  c.data.max_train = 200
  c.model.width = 8
  c.model.depth = 2
  c.train.steps = 6
  c.train.batch_size = 32
  c.train.eval_every = 3
  c.train.log_every = 2
  c.train.ckpt_every = 3
  return c
