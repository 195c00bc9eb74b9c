"""README.md's Python example: at most 10 lines, and it runs as shown."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def _example() -> str:
  with open(README) as f:
    text = f.read()
  section = text[text.index("## In Python") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_ten_lines_and_runs():
  code = _example()
  lines = [ln for ln in code.splitlines() if ln.strip()]
  assert len(lines) <= 10, lines
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
  sel, dsvs, labels = scope["sel"], scope["dsvs"], scope["labels"]
  # Two selected DSVs per class, each of the class it is listed under.
  assert sel.indices.shape == (20,)
  np.testing.assert_array_equal(
    labels[sel.indices], np.repeat(np.arange(10), 2)
  )
  # Ten synthesised images of the training images' shape, all finite.
  assert dsvs.x.shape == (10, 8, 8, 1) and np.isfinite(dsvs.x).all()
  assert int(dsvs.step) == 20
