"""Thin `--config` file wrapping the packaged config of the same name."""

from dsv_jax.configs.cifar100 import get_config

__all__ = ["get_config"]
