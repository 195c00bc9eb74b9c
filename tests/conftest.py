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


import importlib.util  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HAVE_TORCH = all(
  importlib.util.find_spec(m) is not None for m in ("torch", "torchvision")
)


@pytest.fixture(
  scope="session"
)  # Module fixtures that build torch models need it.
def torch_required():
  """Skips a test without torch/torchvision (the [torch] extra), except
  where DSV_REQUIRE_TORCH=1 (`.ci/run` sets it): there a missing torch is
  a failure, so CI can never pass by skipping the torch tests."""
  if _HAVE_TORCH:
    return
  if os.environ.get("DSV_REQUIRE_TORCH") == "1":
    pytest.fail("DSV_REQUIRE_TORCH=1 but torch/torchvision are not installed.")
  pytest.skip("torch/torchvision (the [torch] extra) are not installed")


@pytest.fixture(scope="session")
def repo_module():
  """Loads a repository file outside the package (a benchmark script, a
  config under configs/) as a module: ``repo_module("benchmarks",
  "reconstruct.py")``. Each call executes the file afresh."""

  def load(*parts: str):
    name = os.path.splitext("_".join(parts))[0]
    spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, *parts)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  return load
