"""Every argument a public docstring documents exists (issue 29).

A stale ``Args:`` entry is a trap: ``make_synthesizer`` once documented a
``params`` argument it no longer had, and callers who passed it got a
``TypeError``. This inspects every public function of every dsv_jax module
against the names its Google-style ``Args:`` section lists.
"""

import importlib
import inspect
import pkgutil
import re

import pytest

import dsv_jax

# An entry of an Args section: "  name: ...", "  a, b: ..." or "  **kw: ...".
_ENTRY = re.compile(r"^(\s+)(\*{0,2}[A-Za-z_][\w, *]*):(\s|$)")


def documented_args(doc: str | None) -> list[str]:
  """The argument names of a docstring's ``Args:`` section."""
  if not doc:
    return []
  lines = inspect.cleandoc(doc).splitlines()
  try:
    start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
  except StopIteration:
    return []
  names, indent = [], None
  for line in lines[start + 1 :]:
    if not line.strip():
      continue
    depth = len(line) - len(line.lstrip())
    if depth == 0:
      break  # The next section.
    match = _ENTRY.match(line)
    if indent is None and match:
      indent = depth
    if match and depth == indent:
      names += [n.strip().lstrip("*") for n in match.group(2).split(",")]
  return names


def missing_args(fn) -> list[str]:
  """Documented arguments ``fn`` does not take."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return []
  return [n for n in documented_args(fn.__doc__) if n not in params]


def _public_functions():
  for mod in pkgutil.walk_packages(dsv_jax.__path__, "dsv_jax."):
    try:
      module = importlib.import_module(mod.name)
    except ImportError:  # An optional dependency (e.g. torch) is absent.
      continue
    for name, obj in vars(module).items():
      if name.startswith("_") or not inspect.isfunction(obj):
        continue
      if obj.__module__ == module.__name__:
        yield f"{module.__name__}.{name}", obj


def test_every_documented_argument_exists():
  found = list(_public_functions())
  assert len(found) > 100  # Every module was inspected.
  stale = {name: m for name, fn in found if (m := missing_args(fn))}
  assert not stale, stale


def test_a_stale_entry_is_reported():
  def make(apply_fn, *, x_tx=None, **kwargs):
    """Builds.

    Args:
      apply_fn: the classifier.
      params: theta* (no longer an argument).
      x_tx, lambda_tx: optimisers.
      **kwargs: passed on.

    Returns:
      Something.
    """

  assert documented_args(make.__doc__) == [
    "apply_fn",
    "params",
    "x_tx",
    "lambda_tx",
    "kwargs",
  ]
  assert missing_args(make) == ["params", "lambda_tx"]


@pytest.mark.parametrize("doc", [None, "No sections.", "Returns:\n  x: y."])
def test_docstrings_without_args_list_nothing(doc):
  assert documented_args(doc) == []
