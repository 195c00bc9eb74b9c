"""Default experiment configs, importable after `pip install dsv_jax`.

`get_config(name, arg=None)` returns the ml_collections config of a dataset
(`digits`, `fashion_mnist`, `mnist`, `cifar10`, `cifar100`,
`imagenet`); the files in the
repository's top-level `configs/` directory are thin wrappers around these,
for `--config configs/<name>.py[:arg]` on the command line.
"""

import importlib

import ml_collections

CONFIGS = (
  "digits",
  "fashion_mnist",
  "mnist",
  "cifar10",
  "cifar100",
  "imagenet",
)


def get_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config of dataset `name`, with variant `arg` (e.g. "tiny")."""
  if name not in CONFIGS:
    raise ValueError(f"Unknown config {name!r}; known configs: {CONFIGS}.")
  return importlib.import_module(f"dsv_jax.configs.{name}").get_config(arg)


__all__ = ["CONFIGS", "get_config"]
