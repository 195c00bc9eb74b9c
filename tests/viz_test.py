"""Figures: titles fit narrow figures; curves take null metrics."""

import os

from dsv_jax import viz

LONG = "DSVs (noise init, 1000 steps, DeepKKT; red: disqualified)"


def _title_box(fig):
  fig.canvas.draw()
  return fig._suptitle.get_window_extent()


def test_long_titles_wrap_inside_a_one_column_grid():
  # A one-column grid is 1.8 inches wide: the title as one line overflows.
  raw = viz._figure((1.8, 9.0))
  raw.suptitle(LONG, fontsize=9)
  box = _title_box(raw)
  assert box.x0 < 0 or box.x1 > raw.bbox.width
  fig = viz._figure((1.8, 9.0))
  top = viz._add_title(fig, LONG)
  box = _title_box(fig)
  assert 0 <= box.x0 and box.x1 <= fig.bbox.width
  # The panels start below the (three-line) title.
  assert box.y0 >= top * fig.bbox.height - 1
  assert viz._add_title(viz._figure((4.0, 4.0)), "") == 1.0


def test_curves_take_null_metrics(tmp_path):
  # metrics.jsonl writes non-finite values as null.
  rows = [{"step": s, "lambda_min": None if s == 2 else 0.5} for s in (1, 2, 3)]
  path = tmp_path / "curves.png"
  viz.plot_curves(path, rows, title="synthesis")
  assert os.path.getsize(path) > 0


def test_image_rows_writes_named_rows_and_checks_their_lengths(tmp_path):
  import numpy as np
  import pytest
  from matplotlib.image import imread

  rows = [np.zeros((3, 8, 8, 1)), np.ones((3, 8, 8, 1))]
  path = str(tmp_path / "rows.png")
  viz.image_rows(
    path, rows, row_names=["a", "b"], captions=[["1", "2", "3"]] * 2
  )
  assert imread(path).shape[0] > 0
  with pytest.raises(ValueError, match="row names"):
    viz.image_rows(path, rows, row_names=["a"])
  with pytest.raises(ValueError, match="one length"):
    viz.image_rows(path, [rows[0], rows[1][:2]], row_names=["a", "b"])
