"""docs/method.md: every code reference resolves to a real name."""

import importlib
import os
import re

DOC = os.path.join(
  os.path.dirname(os.path.dirname(__file__)), "docs", "method.md"
)


def _references() -> list[str]:
  with open(DOC) as f:
    return sorted(set(re.findall(r"`(dsv_jax(?:\.\w+)+)`", f.read())))


def _resolve(dotted: str):
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ModuleNotFoundError(dotted)


def test_every_code_reference_in_the_method_doc_exists():
  refs = _references()
  assert len(refs) >= 20  # The page points to code throughout.
  missing = []
  for ref in refs:
    try:
      _resolve(ref)
    except (AttributeError, ModuleNotFoundError):
      missing.append(ref)
  assert not missing, missing
