"""Matplotlib drawings of DSVs written to PNG files (never imported by core).

Figures are drawn with matplotlib's object-oriented API on their own Agg
canvas: importing or calling this module never selects a global backend
nor imports pyplot, so inline figures in a notebook keep working.

* `class_grid`: one row per class, images de-normalised to [0, 1].
* `strip`: one row of images with titles (editing, interpolation).
* `plot_curves`: metric curves over steps (e.g. rows of metrics.jsonl).
* `image_rows`: named rows of [0, 1] images with a caption under each
  (e.g. real images above their best-matching candidates).
"""

import os
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _figure(figsize: tuple[float, float]) -> Figure:
  """A figure on its own Agg canvas (no pyplot, no global backend)."""
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def _add_title(fig: Figure, title: str, *, extra_in: float = 0.0) -> float:
  """Sets `title`, wrapped to the figure's width, and returns the top of
  the area left for the panels (for `tight_layout(rect=...)`, which
  ignores suptitle). `extra_in`: inches more, e.g. for panel titles."""
  width_in, height_in = fig.get_size_inches()
  if not title:
    return 1.0 - extra_in / height_in
  # About 13 characters per inch at 9 pt.
  text = textwrap.fill(title, width=max(12, int(13 * width_in)))
  fig.suptitle(text, fontsize=9)
  lines = text.count("\n") + 1
  return max(0.5, 1.0 - (0.2 * lines + 0.12 + extra_in) / height_in)


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
  classes: Any = None,
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
    classes: the classes of the rows, in order (default: every class; a
      few of ImageNet's 1000, say).
  """
  shown = _to_display(images, info)
  labels = np.asarray(labels)
  mark = None if mark is None else np.asarray(mark)
  rows = range(info.num_classes) if classes is None else list(classes)
  cols = max(1, max_per_class)
  fig = _figure((0.9 * (cols + 1), 0.9 * len(rows)))
  axes = fig.subplots(len(rows), cols + 1, squeeze=False)
  for row, cls in enumerate(rows):
    axes[row, 0].axis("off")
    axes[row, 0].text(
      1.0, 0.5, info.class_names[cls], ha="right", va="center", fontsize=7
    )
    idx = np.flatnonzero(labels == cls)[:cols]
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
  top = _add_title(fig, title)
  fig.tight_layout(pad=0.2, rect=(0, 0, 1, top))
  save_png(fig, path)


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
  # The panels' own titles need room under the figure's.
  top = _add_title(fig, title, extra_in=0.15 if titles is not None else 0.0)
  fig.tight_layout(pad=0.2, rect=(0, 0, 1, top))
  save_png(fig, path)


def image_rows(
  path: str | os.PathLike,
  rows: Sequence[Any],
  *,
  row_names: Sequence[str],
  captions: Sequence[Sequence[str]] | None = None,
  title: str = "",
) -> None:
  """Writes a PNG of named rows of ``[K, H, W, C]`` images in [0, 1].

  Every row has the same K; ``captions[r][k]`` goes under image k of row r.
  """
  if len(rows) != len(row_names):
    raise ValueError(f"{len(rows)} rows but {len(row_names)} row names.")
  shown = [np.clip(np.asarray(r, np.float32), 0.0, 1.0) for r in rows]
  shown = [r[..., 0] if r.shape[-1] == 1 else r for r in shown]
  cols = len(shown[0])
  if any(len(r) != cols for r in shown):
    raise ValueError("image_rows needs rows of one length.")
  fig = _figure((0.75 * (cols + 2), 0.95 * len(rows)))
  axes = fig.subplots(len(rows), cols + 1, squeeze=False)
  for r, (name, images) in enumerate(zip(row_names, shown, strict=True)):
    axes[r, 0].axis("off")
    axes[r, 0].text(1.0, 0.5, name, ha="right", va="center", fontsize=7)
    for k in range(cols):
      _show(axes[r, k + 1], images[k])
      if captions is not None:
        axes[r, k + 1].set_xlabel(captions[r][k], fontsize=6, labelpad=1)
  top = _add_title(fig, title)
  fig.tight_layout(pad=0.2, rect=(0, 0, 1, top))
  save_png(fig, path)


def plot_curves(
  path: str | os.PathLike,
  rows: Sequence[dict[str, Any]],
  *,
  keys: Sequence[str] | None = None,
  title: str = "",
  xlabel: str = "step",
) -> None:
  """Writes one small panel per metric in ``keys`` against ``step``.

  Args:
    path: output PNG file.
    rows: dicts with ``"step"`` and numeric metrics (metrics.jsonl rows).
    keys: metrics to draw (default: every numeric key but ``step``).
    title: figure title.
    xlabel: what ``step`` counts (the x axis label).
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
    # null (a non-finite value in metrics.jsonl) and absent are gaps.
    values = [np.nan if r.get(key) is None else r[key] for r in rows]
    ax.plot(steps, np.asarray(values, float))
    ax.set_title(key, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.tick_params(labelsize=6)
    # Whole steps, and plain numbers (no offset label over the title).
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(useOffset=False, style="plain", axis="both")
  for j in range(len(keys), nrows * cols):
    axes[j // cols, j % cols].axis("off")
  top = _add_title(fig, title)
  fig.tight_layout(rect=(0, 0, 1, top))
  save_png(fig, path)


def save_png(fig: Figure, path: str | os.PathLike) -> None:
  """Writes `fig` as a PNG at `path`, local or remote (gs://: epath)."""
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=100)


__all__ = ["class_grid", "image_rows", "plot_curves", "save_png", "strip"]
