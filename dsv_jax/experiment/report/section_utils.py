"""Helpers the report's sections share."""

import os
from typing import Any

import numpy as np
from etils import epath

from dsv_jax import (
  artifacts,
  synthesize,
)


def pct(row: dict | None) -> str:
  if row is None:
    return "-"
  return f"{100 * row['mean']:.2f} +- {100 * row['std']:.2f}"


def active_hard(dsv: artifacts.DSVSet) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(synthesize.target_labels(dsv.targets))
  return dsv.images[dsv.active], labels[dsv.active]


def load_selection(workdir: str) -> dict[str, Any]:
  """The `select` stage's lambdas and per-class ranking from `workdir`.

  Returns:
    ``lambdas``, ``scores``, ``labels``, ``rankable`` (``[N]`` over the
    training split) and ``ranking``: per class, the training indices sorted by
    decreasing score.
  """
  path = os.path.join(workdir, "select", "lambdas.npz")
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"No selection at {path}; run --stage=select.")
  with epath.Path(path).open("rb") as f, np.load(f) as z:
    out = {k: z[k] for k in ("lambdas", "scores", "labels", "rankable")}
    order, start = z["order"], z["class_start"]
  out["ranking"] = [
    order[a:b] for a, b in zip(start[:-1], start[1:], strict=True)
  ]
  return out
