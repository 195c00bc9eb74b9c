"""benchmarks/ranking_stability.py: the share of two fits' top k per class."""

import numpy as np
import pytest

from dsv_jax import configs
from dsv_jax.experiment import registry


@pytest.fixture(scope="module")
def script(repo_module):
  return repo_module("benchmarks", "ranking_stability.py")


def test_shared_top_counts_each_class_on_its_own(script):
  labels = np.array([0, 0, 0, 1, 1, 1])
  a = np.array([3.0, 2.0, 1.0, 3.0, 2.0, 1.0])
  # Class 0 keeps its order; class 1 reverses it. b's largest value (9, a
  # class-0 sample) must not displace class 1's own top: ranks are per class.
  b = np.array([9.0, 2.0, 1.0, 1.0, 2.0, 3.0])
  out = script.shared_top(a, b, labels, [1, 2, 3])
  assert out == {1: 0.5, 2: (1.0 + 0.5) / 2, 3: 1.0}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """A tiny digits workdir after `select`: 6 iterations, steps 3 and 6 kept."""
  wd = str(tmp_path_factory.mktemp("ranking"))
  c = configs.get_config("digits", "tiny")
  registry.run(c, wd, "train")
  registry.run(c, wd, "select")
  return wd


def test_the_last_checkpoint_ranks_as_the_finished_fit(script, fitted):
  final = script.load_lambdas(fitted)
  last = script.load_lambdas(f"{fitted}@6")
  np.testing.assert_allclose(last["lambdas"], final["lambdas"], rtol=1e-6)
  same = script.compare(f"{fitted}@6", fitted, [1, 2])
  assert same == {s: {1: 1.0, 2: 1.0} for s in ("contribution", "lambda")}


def test_an_earlier_iterate_is_read_from_its_own_step(script, fitted):
  final = script.load_lambdas(fitted)
  early = script.load_lambdas(f"{fitted}@3")
  assert not np.allclose(early["lambdas"], final["lambdas"])
  assert (early["lambdas"] >= 0).all()


def test_missing_sources_are_named(script, fitted, tmp_path):
  with pytest.raises(SystemExit, match="No selection at"):
    script.load_lambdas(str(tmp_path))
  with pytest.raises(SystemExit, match="No selection checkpoint at"):
    script.load_lambdas(f"{fitted}@5")
