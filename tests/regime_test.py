"""The candidate-count regime section (experiment.report.regime)."""

import types

import numpy as np
import pytest

from dsv_jax import configs, similarity
from dsv_jax.experiment.report import regime


def test_counts_resolve_zero_to_twice_the_training_samples_per_class():
  labels = np.repeat(np.arange(3), [8, 10, 12])  # 30 samples, 3 classes.
  assert regime.resolve_counts((10, 0, 10, 5), labels, 3) == [10, 20, 5]
  with pytest.raises(ValueError, match="report.candidate_counts: -1"):
    regime.resolve_counts((-1,), labels, 3)


def test_matched_references_draw_equally_many_of_each_class():
  train_y = np.repeat(np.arange(3), [20, 5, 9])
  held_y = np.repeat(np.arange(3), [4, 7, 9])
  t, h = regime.matched_references(train_y, held_y, 0)
  # Per class the smaller count: 4 (held), 5 (train), 9 (both).
  np.testing.assert_array_equal(np.bincount(train_y[t], minlength=3), [4, 5, 9])
  np.testing.assert_array_equal(np.bincount(held_y[h], minlength=3), [4, 5, 9])
  assert len(set(t.tolist())) == len(t) and len(set(h.tolist())) == len(h)
  t2, h2 = regime.matched_references(train_y, held_y, 0)
  np.testing.assert_array_equal(t, t2)  # Seeded.
  np.testing.assert_array_equal(h, h2)
  assert not np.array_equal(t, regime.matched_references(train_y, held_y, 1)[0])


def _images(n, seed):
  return np.random.default_rng(seed).uniform(size=(n, 8, 8, 1))


def test_best_ssim_is_taken_among_the_images_own_class_only():
  refs = _images(6, 0)
  ref_y = np.array([0, 0, 0, 1, 1, 1])
  # Query 0 is reference 1 (class 0); query 1 is reference 2 but labelled
  # class 1, whose references do not contain it.
  queries = refs[[1, 2]]
  s = regime.best_ssim_per_class(queries, np.array([0, 1]), refs, ref_y)
  np.testing.assert_allclose(s[0], 1.0, atol=1e-5)
  expected = max(
    float(similarity.ssim(refs[2], refs[j])) for j in np.flatnonzero(ref_y == 1)
  )
  np.testing.assert_allclose(s[1], expected, rtol=1e-5)
  assert s[1] < 0.9
  with pytest.raises(ValueError, match="No reference image of class 2"):
    regime.best_ssim_per_class(queries, np.array([0, 2]), refs, ref_y)


def test_regime_row_reads_each_reference_set():
  train = _images(4, 1)
  held = _images(4, 2)
  y = np.zeros(4, np.int32)
  dsv = np.concatenate([train[:3], held[:1]])  # 3 training copies, 1 held.
  row = regime.regime_row(dsv, y[:4], {"train": (train, y), "held": (held, y)})
  s_train = regime.best_ssim_per_class(dsv, y, train, y)
  s_held = regime.best_ssim_per_class(dsv, y, held, y)
  assert row["ssim_train"] == pytest.approx(float(s_train.mean()))
  assert row["ssim_held"] == pytest.approx(float(s_held.mean()))
  assert row["ssim_match_train"] == pytest.approx(np.mean(s_train >= 0.4))
  assert row["ssim_match_held"] == pytest.approx(np.mean(s_held >= 0.4))
  assert row["ssim_match_train"] >= 0.75  # Three exact copies.
  assert row["ssim_train"] > row["ssim_held"]


def test_regime_section_synthesises_each_count_from_noise(
  tmp_path, monkeypatch
):
  # Synthesis and retraining are replaced by fakes that record what they
  # were given; the section's table must read each count's own numbers.
  rng = np.random.default_rng(0)
  c = 2
  train_y = np.repeat(np.arange(c), 6)
  test_y = np.repeat(np.arange(c), 3)
  info = types.SimpleNamespace(
    num_classes=c, denormalize=lambda x: np.asarray(x) * 0.5 + 0.5
  )
  ds = types.SimpleNamespace(
    train={"image": rng.normal(size=(12, 8, 8, 1)), "label": train_y},
    test={"image": rng.normal(size=(6, 8, 8, 1)), "label": test_y},
  )
  calls = []

  def fake_synth_run(config, workdir, name, **overrides):
    k = overrides["synth.num_per_class"]
    calls.append((name, overrides))
    n = k * c
    active = np.ones(n, bool)
    active[0] = False  # A disqualified candidate is not retrained on.
    dsv = types.SimpleNamespace(
      images=rng.normal(size=(n, 8, 8, 1)),
      targets=np.repeat(np.arange(c), k).astype(np.int32),
      active=active,
    )
    return dsv, {"stationarity_last": 0.1 * k}, workdir

  trained = {}

  def rows(name, images, labels):
    trained[name] = len(images)
    k = len(images)
    return {"accuracies": [k / 100], "mean": k / 100, "std": 0.001 * k}

  rows.ds = ds
  rows.clf = types.SimpleNamespace(info=info)
  rows.classical_agreement = lambda images, labels: len(images) / 1000
  monkeypatch.setattr(regime, "synth_run", fake_synth_run)
  config = configs.get_config("digits", "tiny")
  config.report.candidate_counts = (3, 0)  # 0: twice 6 = 12 per class.
  md, res = regime.regime_section(config, str(tmp_path), rows, str(tmp_path))
  assert [o["synth.num_per_class"] for _, o in calls] == [3, 12]
  assert all(o["synth.init"] == "noise" for _, o in calls)
  assert trained == {"DSV noise-init k=3": 5, "DSV noise-init k=12": 23}
  assert res["3"]["test_accuracy"] == pytest.approx(0.05)
  assert res["12"]["classical_agreement"] == pytest.approx(0.023)
  assert res["12"]["stationarity_last"] == pytest.approx(1.2)
  assert "| 3 | 5.00 +- 0.50 | 0.01 |" in md
  assert "| 12 | 23.00 +- 2.30 | 0.02 |" in md
  assert (tmp_path / "regime.png").stat().st_size > 0
