"""CIFAR-100 through TFDS, with the CIFAR-10 recipe (see cifar10.py)."""

from dsv_jax.configs.cifar10 import cifar_config


def get_config(arg: str | None = None):
  return cifar_config("cifar100", arg)
