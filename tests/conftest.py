"""Test-session setup shared by every test module.

Runs at import time of conftest, before any test module imports JAX:
  * four fake CPU devices, so sharding tests can build a real `data` mesh;
  * `jax_disable_most_optimizations`: tests use tiny models whose run time is
    dominated by XLA compilation, and skipping the optimisation passes makes
    the suite about 3x faster on CI's 2 cores (measured on
    tests/models_test.py: 63 s -> 23 s). Numerics stay IEEE-exact per op, so
    comparisons against references are unaffected in substance.
Both are environment variables, so subprocesses started by tests (CLI runs)
inherit them.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
