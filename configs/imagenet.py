"""Thin `--config` file wrapping the packaged config of the same name."""

from dsv_jax.configs.imagenet import get_config

__all__ = ["get_config"]
