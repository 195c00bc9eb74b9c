"""Specification tests of the report's statistics: which rows each p-value
compares, that Fisher's test is two-sided, and the sort direction of the
entropy protocol's groups. The sections run on their real code with the
expensive sub-runs (synthesis, retraining, flip counting) replaced by
fakes that return distinct, known numbers.
"""

import json
import os
import types
import zlib

import numpy as np
import pytest
from scipy import stats

from dsv_jax import artifacts, configs, synthesize
from dsv_jax.experiment.report import boundary_sections, reproduction
from dsv_jax.experiment.report import sections as report_sections

C = 3


def _dsv(n, seed, active=None):
  rng = np.random.default_rng(seed)
  labels = np.arange(n, dtype=np.int32) % C
  return artifacts.DSVSet(
    images=rng.normal(size=(n, 1, 1, C)).astype(np.float32),
    targets=labels,
    lambdas=rng.uniform(0.1, 1, n).astype(np.float32),
    active=np.ones(n, bool) if active is None else active,
    source=np.full(n, "noise"),
    source_index=rng.permutation(12)[:n].astype(np.int32),
    confidence=rng.uniform(size=n).astype(np.float32),
    entropy=rng.uniform(size=n).astype(np.float32),
    margin=rng.normal(size=n).astype(np.float32),
  )


class FakeRows:
  """`RetrainRows` that returns a distinct row per name, and records what
  each row was given."""

  def __init__(self, ds, clf):
    self.ds, self.clf, self.seen = ds, clf, {}

  def __call__(self, name, images, labels):
    self.seen[name] = (np.asarray(images), np.asarray(labels))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    accs = (rng.uniform(0.2, 0.8) + 0.02 * rng.standard_normal(4)).tolist()
    return {"accuracies": accs, "mean": float(np.mean(accs)), "std": 0.01}

  def classical_agreement(self, images, labels):
    return 0.5


def _ds(n=12):
  rng = np.random.default_rng(1)
  labels = np.arange(n, dtype=np.int32) % C
  split = lambda: {
    "image": rng.normal(size=(n, 1, 1, C)).astype(np.float32),
    "label": labels,
  }
  return types.SimpleNamespace(train=split(), test=split())


def _clf():
  info = types.SimpleNamespace(
    num_classes=C,
    class_names=("a", "b", "c"),
    name="toy",
    pixel_min=np.full(C, -10.0, np.float32),
    pixel_max=np.full(C, 10.0, np.float32),
  )
  return types.SimpleNamespace(
    apply_fn=lambda p, x: x.reshape(len(x), -1) @ p,
    params=np.eye(C, dtype=np.float32),
    info=info,
    functional=types.SimpleNamespace(
      state=None, eval_features=lambda p, s, xx: xx.reshape(len(xx), -1)
    ),
  )


@pytest.fixture
def config():
  c = configs.get_config("digits", "tiny")
  c.report.ipc = (1, 2)
  c.report.coreset_ipc = (1, 2)
  return c


def test_few_shot_p_values_compare_each_row_with_its_own_k_shots(
  config, monkeypatch, tmp_path
):
  runs = {}

  def shot_run(cfg, workdir, init, k):
    runs[init, k] = _dsv(C * k, seed=10 * k + len(init))
    return runs[init, k], {}, ""

  monkeypatch.setattr(report_sections, "shot_run", shot_run)
  monkeypatch.setattr(report_sections, "other_dataset_missing", lambda c: None)
  monkeypatch.setattr(
    report_sections,
    "baseline_run",
    lambda cfg, workdir, name, k: _dsv(C * k, seed=100 + k),
  )
  ds = _ds()
  rows = FakeRows(ds, _clf())
  _, res = report_sections.few_shot_section(config, str(tmp_path), rows)
  shots_name = "k random real images (the DSVs' init)"
  for k in (1, 2):
    shots = res[f"k{k}/{shots_name}"]
    assert shots["p_vs_shots"] is None
    # The shots are the real images the k-shot DSVs started from.
    idx = runs["real", k].source_index
    got_images, got_labels = rows.seen[f"random real k={k}"]
    np.testing.assert_array_equal(got_images, ds.train["image"][idx])
    np.testing.assert_array_equal(got_labels, ds.train["label"][idx])
    others = [
      n for n in res if n.startswith(f"k{k}/") and n != f"k{k}/{shots_name}"
    ]
    assert len(others) == 4  # other data, noise, real, KKT reconstruction
    for name in others:
      row = res[name]
      want = reproduction.welch_p(row["accuracies"], shots["accuracies"])
      assert row["p_vs_shots"] == pytest.approx(want, rel=1e-12), name
      # Another k's shots would give another p-value.
      other_k = res[f"k{3 - k}/{shots_name}"]
      assert row["p_vs_shots"] != pytest.approx(
        reproduction.welch_p(row["accuracies"], other_k["accuracies"])
      )


def _write_selection(workdir, lambdas, weights, labels, rankable):
  from dsv_jax import select

  scores = np.where(rankable, lambdas * weights, 0.0)
  per_class = select.rank_per_class(scores, labels, C)
  os.makedirs(os.path.join(workdir, "select"))
  np.savez(
    os.path.join(workdir, "select", "lambdas.npz"),
    lambdas=lambdas,
    scores=scores,
    rankable=rankable,
    weights=weights,
    labels=labels,
    order=np.concatenate(per_class),
    class_start=np.cumsum([0] + [len(i) for i in per_class]),
  )


def test_coreset_p_values_compare_each_selection_with_random(
  config, monkeypatch, tmp_path
):
  ds = _ds()
  n = len(ds.train["label"])
  rng = np.random.default_rng(3)
  _write_selection(
    str(tmp_path),
    rng.uniform(0.1, 1, n).astype(np.float32),
    rng.uniform(0.1, 1, n).astype(np.float32),
    ds.train["label"],
    np.ones(n, bool),
  )
  monkeypatch.setattr(
    report_sections, "el2n_run", lambda *a: rng.uniform(size=n)
  )
  rows = FakeRows(ds, _clf())
  md, res = report_sections.coreset_section(config, str(tmp_path), rows)
  for k in (1, 2):
    r = res[f"k{k}"]
    rand = r["random"]["accuracies"]
    for key, name in (
      ("p_selected_vs_random", "selected"),
      ("p_selected_lambda_vs_random", "selected_lambda"),
    ):
      want = reproduction.welch_p(r[name]["accuracies"], rand)
      assert r[key] == pytest.approx(want, rel=1e-12), key
      for wrong in ("herding", "el2n"):
        assert r[key] != pytest.approx(
          reproduction.welch_p(r[wrong]["accuracies"], rand)
        )
    line = next(x for x in md.splitlines() if x.startswith(f"| {k} | "))
    cells = [
      f"{100 * r[name]['mean']:.2f} +- {100 * r[name]['std']:.2f}"
      for name in ("random", "herding", "el2n", "selected", "selected_lambda")
    ]
    assert line == (
      f"| {k} | " + " | ".join(cells) + f" | {r['p_selected_vs_random']:.2g}"
      f" / {r['p_selected_lambda_vs_random']:.2g} |"
    )


def test_decision_p_value_is_two_sided_fisher_of_each_ratio_s_counts(
  config, monkeypatch, tmp_path
):
  config.report.flip_ratios = (0.5, 2.0)
  # Counts (flipped, pairs) per ratio: DSV first, then the real control.
  counts = [
    {0.5: (9, 30), 2.0: (20, 30)},
    {0.5: (3, 24), 2.0: (19, 24)},
  ]
  calls = []

  def flip_rates(*args, **kw):
    calls.append(args)
    return counts[len(calls) - 1]

  monkeypatch.setattr(boundary_sections, "flip_rates", flip_rates)
  monkeypatch.setattr(
    artifacts, "load_dsv", lambda path, **kw: (_dsv(C, seed=5), {})
  )
  _, res = report_sections.decision_section(
    config, str(tmp_path), _clf(), _ds()
  )
  for r in (0.5, 2.0):
    (hd, nd), (hr, nr) = counts[0][r], counts[1][r]
    assert res["dsv"][r] == hd / nd and res["real"][r] == hr / nr
    table = [[hd, nd - hd], [hr, nr - hr]]
    two = stats.fisher_exact(table, alternative="two-sided").pvalue
    assert res["p"][r] == pytest.approx(two, rel=1e-12)
  # One-sided tests give other values on these counts.
  table = [[9, 21], [3, 21]]
  for alt in ("greater", "less"):
    assert res["p"][0.5] != pytest.approx(
      stats.fisher_exact(table, alternative=alt).pvalue
    )


def test_entropy_protocol_groups_are_the_highest_and_lowest_final_lambdas(
  config, monkeypatch, tmp_path
):
  n, t = 60, 4
  rng = np.random.default_rng(7)
  lambdas = rng.permutation(n).astype(np.float32) + 0.5
  # Every candidate's entropy curve is its own.
  entropy = rng.uniform(size=(t, n)).astype(np.float32)
  proto = {
    "steps": np.arange(t) * 10,
    "entropy": entropy,
    "lambdas": lambdas,
    "labels": np.arange(n) % C,
  }
  monkeypatch.setattr(
    boundary_sections, "entropy_protocol_run", lambda *a: proto
  )
  run_dir = tmp_path / "run"
  (run_dir / "synthesize").mkdir(parents=True)
  (run_dir / "synthesize" / "metrics.jsonl").write_text(
    "\n".join(
      json.dumps({"step": s, "entropy": e}) for s, e in [(0, 0.1), (5, 0.7)]
    )
  )
  monkeypatch.setattr(
    boundary_sections,
    "shot_run",
    lambda cfg, workdir, init, k: (None, {}, str(run_dir)),
  )
  monkeypatch.setattr(
    artifacts, "load_dsv", lambda path, **kw: (_dsv(2 * C, seed=6), {})
  )
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  _, res = report_sections.boundary_section(
    config, str(tmp_path), _clf(), _ds(), str(out_dir)
  )
  order = sorted(range(n), key=lambda i: -lambdas[i])
  top, low = order[:5], order[-50:]
  got = res["entropy_protocol"]
  np.testing.assert_allclose(
    got["top-5 lambda"], entropy[[0, -1]][:, top].mean(1), rtol=1e-6
  )
  np.testing.assert_allclose(
    got["lowest-50 lambda"], entropy[[0, -1]][:, low].mean(1), rtol=1e-6
  )
  np.testing.assert_allclose(
    got["all candidates"], entropy[[0, -1]].mean(1), rtol=1e-6
  )
  assert res["entropy_curves"] == {
    "real init, k=1": (0.1, 0.7),
    f"{config.report.zero_shot_init} init, k=1": (0.1, 0.7),
  }


def test_describe_entropy_and_margin_known_answer():
  # Logits (2, 0, 0) for target 0: entropy of softmax, margin 2.
  logits = np.array([[2.0, 0.0, 0.0]], np.float32)
  out = synthesize.describe_logits(logits, np.array([0]))
  p = np.exp(logits[0]) / np.exp(logits[0]).sum()
  np.testing.assert_allclose(
    out["entropy"], [-(p * np.log(p)).sum()], rtol=1e-6
  )
  np.testing.assert_allclose(out["margin"], [2.0])


def test_ablation_compares_full_with_the_primal_only_run(
  config, monkeypatch, tmp_path
):
  full, primal = _dsv(6, seed=11), _dsv(6, seed=12)
  dirs = {}
  for name in ("full", "primal"):
    (tmp_path / name / "synthesize").mkdir(parents=True)
    (tmp_path / name / "synthesize" / "grid.png").write_bytes(b"png")
    dirs[name] = str(tmp_path / name)
  asked = {}

  def synth_run(cfg, workdir, name, **overrides):
    asked[name] = overrides
    return primal, {}, dirs["primal"]

  monkeypatch.setattr(
    boundary_sections,
    "shot_run",
    lambda cfg, workdir, init, k: (full, {}, dirs["full"]),
  )
  monkeypatch.setattr(boundary_sections, "synth_run", synth_run)
  monkeypatch.setattr(
    boundary_sections, "independent_classifier", lambda cfg, workdir: _clf()
  )
  rows = FakeRows(_ds(), _clf())
  out = tmp_path / "out"
  out.mkdir()
  _, res = report_sections.ablation_section(
    config, str(tmp_path), _clf(), rows, str(out)
  )
  zero, k = config.report.zero_shot_init, config.report.detail_ipc
  # The primal-only run: the same init and size, stationarity off.
  (overrides,) = asked.values()
  assert overrides == {
    "synth.init": zero,
    "synth.num_per_class": k,
    "kkt.beta_stationarity": 0.0,
  }
  for name, dsv in (("full", full), ("primal_only", primal)):
    label = f"{'full' if name == 'full' else 'primal-only'} {zero} k={k}"
    np.testing.assert_array_equal(rows.seen[label][0], dsv.images)
    # Independent agreement: the brightest-pixel classifier on the set.
    pred = dsv.images.reshape(len(dsv.images), -1).argmax(-1)
    assert res[name]["agreement"] == pytest.approx(np.mean(pred == dsv.targets))
  assert res["p_retrain"] == pytest.approx(
    reproduction.welch_p(
      res["full"]["retrain"]["accuracies"],
      res["primal_only"]["retrain"]["accuracies"],
    ),
    rel=1e-12,
  )
  assert (out / "ablation_full.png").exists()
