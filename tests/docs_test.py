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


def test_no_file_cites_a_document_the_repository_lacks():
  # The repository is self-contained: every *.md a tracked file names is
  # in it (by path from the root, or as a file name somewhere in it).
  import subprocess

  root = os.path.dirname(DOC)[: -len("/docs")]
  tracked = subprocess.run(
    ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
  ).stdout.split()
  # report.md is what the report stage writes into a workdir.
  names = {os.path.basename(p) for p in tracked} | {"report.md"}
  missing = []
  for path in tracked:
    if not path.endswith((".py", ".md", ".ipynb", ".toml", ".sh", ".txt")):
      continue
    if path.startswith("tests/"):
      continue  # Tests name missing files on purpose.
    with open(os.path.join(root, path), errors="ignore") as f:
      text = f.read()
    for ref in re.findall(r"(?<![\w/:.-])([\w./-]*[A-Za-z0-9_]\.md)\b", text):
      if "://" in ref:
        continue
      if not (
        os.path.exists(os.path.join(root, ref))
        or os.path.basename(ref) in names
      ):
        missing.append(f"{path}: {ref}")
  assert not missing, missing
