"""benchmarks/mutation_check.py cannot rot: every mutation still applies.

The script itself is slow (it runs tests once per mutation) and stays out
of the suite; this checks only that its anchors match the code exactly once
and that the tests it names exist.
"""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script(repo_module):
  return repo_module("benchmarks", "mutation_check.py")


def test_every_mutation_still_applies(script):
  assert script.problems(REPO) == []
  assert len(script.MUTATIONS) >= 19  # Issue 15's nine and ten more.


def test_a_stale_mutation_is_reported(script, tmp_path):
  (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
  (tmp_path / "a_test.py").write_text("def test_a():\n  pass\n")
  stale = [
    script.Mutation("gone", (("a.py", "y = 2", "y = 3"),), ("a_test.py",)),
    script.Mutation("twice", (("a.py", "x = 1", "x = 2"),), ("a_test.py",)),
    script.Mutation(
      "no test", (("a_test.py", "pass", "return"),), ("a_test.py::test_b",)
    ),
  ]
  found = script.problems(str(tmp_path), stale)
  assert len(found) == 3
  assert "occurs 0 times" in found[0] and "occurs 2 times" in found[1]
  assert "no test a_test.py::test_b" in found[2]
