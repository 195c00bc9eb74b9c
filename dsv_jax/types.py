"""Shared type aliases for dsv_jax.

The whole DeepKKT core is written against `ApplyFn`: a pure function
`(params, images[B, H, W, C]) -> logits[B, K]` in evaluation mode. Anything
non-trainable (batch statistics, frozen layers) is closed over by the adapter
that built it (see `dsv_jax.models`).
"""

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
Params = PyTree
ApplyFn = Callable[[Params, jax.Array], jax.Array]

__all__ = ["ApplyFn", "Params", "PyTree"]
