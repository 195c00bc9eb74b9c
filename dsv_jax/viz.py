"""Matplotlib drawings of DSVs written to PNG files (never imported by core).

Figures are drawn with matplotlib's object-oriented API on their own Agg
canvas: importing or calling this module never selects a global backend
nor imports pyplot, so inline figures in a notebook keep working.

* `class_grid`: one row per class, images de-normalised to [0, 1].
* `strip`: one row of images with titles (editing, interpolation).
* `plot_curves`: metric curves over steps (e.g. rows of metrics.jsonl).
"""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float]) -> Figure:
  """A figure on its own Agg canvas (no pyplot, no global backend)."""
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def _to_display(images: Any, info: Any) -> np.ndarray:
  """Normalised ``[N, H, W, C]`` -> displayable ``[N, H, W(, 3)]`` in [0, 1]."""
  raw = np.clip(np.asarray(info.denormalize(np.asarray(images))), 0.0, 1.0)
  return raw[..., 0] if raw.shape[-1] == 1 else raw


def _show(ax, img: np.ndarray) -> None:
  if img.ndim == 2:
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
  else:
    ax.imshow(img, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def class_grid(
  path: str | os.PathLike,
  images: Any,
  labels: Any,
  info: Any,
  *,
  max_per_class: int = 10,
  mark: Any = None,
  title: str = "",
) -> None:
  """Writes a PNG grid: one row per class, up to `max_per_class` images.

  Args:
    path: output PNG file.
    images: ``[N, H, W, C]`` normalised images.
    labels: int ``[N]`` class of each image (rows).
    info: the `DatasetInfo` (de-normalisation and class names).
    max_per_class: columns.
    mark: optional bool ``[N]``; False images get a red frame (e.g.
      disqualified candidates).
    title: figure title.
  """
  shown = _to_display(images, info)
  labels = np.asarray(labels)
  mark = None if mark is None else np.asarray(mark)
  c = info.num_classes
  cols = max(1, max_per_class)
  fig = _figure((0.9 * (cols + 1), 0.9 * c))
  axes = fig.subplots(c, cols + 1, squeeze=False)
  for row in range(c):
    axes[row, 0].axis("off")
    axes[row, 0].text(
      1.0, 0.5, info.class_names[row], ha="right", va="center", fontsize=7
    )
    idx = np.flatnonzero(labels == row)[:cols]
    for col in range(cols):
      ax = axes[row, col + 1]
      if col < len(idx):
        _show(ax, shown[idx[col]])
        if mark is not None and not mark[idx[col]]:
          for spine in ax.spines.values():
            spine.set_edgecolor("red")
            spine.set_linewidth(2)
      else:
        ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=9)
  # Leave room for the title: tight_layout ignores suptitle.
  fig.tight_layout(pad=0.2, rect=(0, 0, 1, 0.95 if title else 1))
  fig.savefig(path, dpi=100)


def strip(
  path: str | os.PathLike,
  images: Any,
  info: Any,
  *,
  titles: Sequence[str] | None = None,
  title: str = "",
) -> None:
  """Writes a PNG strip of ``[K, H, W, C]`` normalised images in a row."""
  shown = _to_display(images, info)
  k = len(shown)
  fig = _figure((1.2 * k, 1.5))
  axes = fig.subplots(1, k, squeeze=False)
  for i in range(k):
    _show(axes[0, i], shown[i])
    if titles is not None:
      axes[0, i].set_title(titles[i], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  # Leave room for the title: tight_layout ignores suptitle.
  fig.tight_layout(pad=0.2, rect=(0, 0, 1, 0.95 if title else 1))
  fig.savefig(path, dpi=100)


def plot_curves(
  path: str | os.PathLike,
  rows: Sequence[dict[str, Any]],
  *,
  keys: Sequence[str] | None = None,
  title: str = "",
) -> None:
  """Writes one small panel per metric in ``keys`` against ``step``.

  Args:
    path: output PNG file.
    rows: dicts with ``"step"`` and numeric metrics (metrics.jsonl rows).
    keys: metrics to draw (default: every numeric key but ``step``).
    title: figure title.
  """
  rows = list(rows)
  if not rows:
    raise ValueError("plot_curves needs at least one row.")
  if keys is None:
    keys = sorted(
      k
      for k, v in rows[0].items()
      if k != "step" and isinstance(v, (int, float))
    )
  keys = [k for k in keys if any(k in r for r in rows)]
  steps = [r["step"] for r in rows]
  cols = min(4, max(1, len(keys)))
  nrows = -(-len(keys) // cols)
  fig = _figure((3.0 * cols, 2.2 * nrows))
  axes = fig.subplots(nrows, cols, squeeze=False)
  for i, key in enumerate(keys):
    ax = axes[i // cols, i % cols]
    ax.plot(steps, [r.get(key, np.nan) for r in rows])
    ax.set_title(key, fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=6)
  for j in range(len(keys), nrows * cols):
    axes[j // cols, j % cols].axis("off")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


__all__ = ["class_grid", "plot_curves", "strip"]
