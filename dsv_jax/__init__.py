"""dsv_jax: Deep Support Vectors (Lee et al., NeurIPS 2024) in JAX."""

__version__ = "0.1.0"
