"""The code stays in small pieces: function, module and README limits.

Issue 29's acceptance, measured with `ast`: no function in dsv_jax/
longer than 150 lines (docstring included), no module over 800 lines,
README.md at most 300 lines (the front door; details live in docs/).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_FUNCTION = 150
MAX_MODULE = 800
MAX_README = 300


def function_lengths(root: pathlib.Path) -> list[tuple[int, str]]:
  """``(lines, "path:name")`` of every function under ``root``, longest
  first."""
  out = []
  for path in sorted(root.rglob("*.py")):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        span = node.end_lineno - node.lineno + 1
        out.append((span, f"{path.relative_to(ROOT)}:{node.name}"))
  return sorted(out, reverse=True)


def module_lengths(root: pathlib.Path) -> list[tuple[int, str]]:
  out = [
    (len(p.read_text().splitlines()), str(p.relative_to(ROOT)))
    for p in root.rglob("*.py")
  ]
  return sorted(out, reverse=True)


def test_no_function_longer_than_the_limit():
  long = [f for f in function_lengths(ROOT / "dsv_jax") if f[0] > MAX_FUNCTION]
  assert not long, long


def test_no_module_longer_than_the_limit():
  long = [m for m in module_lengths(ROOT / "dsv_jax") if m[0] > MAX_MODULE]
  assert not long, long


def test_readme_is_a_front_door():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= MAX_README, len(lines)


def test_the_measure_sees_a_long_function(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_FUNCTION))
  (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
  (tmp_path / "short.py").write_text("def g():\n  return 1\n")
  global ROOT
  saved, ROOT = ROOT, tmp_path
  try:
    lengths = function_lengths(tmp_path)
  finally:
    ROOT = saved
  assert lengths == [(MAX_FUNCTION + 1, "long.py:f"), (2, "short.py:g")]
