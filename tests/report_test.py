"""The report stage and `all`: every section from a tiny config, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from dsv_jax import checkpoints, configs, select
from dsv_jax.experiment import common, registry, report
from dsv_jax.experiment import workdir as wdir
from dsv_jax.experiment.report import cache as report_cache
from dsv_jax.experiment.report import reproduction
from dsv_jax.experiment.report import sections as report_sections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = (
  "## 1. Few-shot distillation",
  "## 2. Coreset selection",
  "## 3. Boundary evidence",
  "## 4. Per-class sum of lambda",
  "## 5. Decision criteria",
  "## 6. Loss ablation",
  "## 7. Editing and soft-label interpolation",
  "## 8. Candidate-count regime",
)


def _cli(workdir, *overrides, wait=True):
  cmd = [
    sys.executable,
    "-m",
    "dsv_jax.main",
    "--config=configs/digits.py:tiny",
    f"--workdir={workdir}",
    *overrides,
  ]
  kw = {"cwd": REPO, "text": True}
  if not wait:
    return subprocess.Popen(
      cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw
    )
  return subprocess.run(cmd, capture_output=True, timeout=600, **kw)


REFERENCE = os.path.join(os.path.dirname(__file__), "data", "tiny_reference")
# Keys that differ between runs by nature (wall time, hashes, paths).
_VOLATILE = ("time_s", "_per_s", "config_hash", "meta_json")


def _volatile(key: str) -> bool:
  return key == "report" or any(v in key for v in _VOLATILE)


def _assert_matches_reference(wd):
  """The tiny pipeline's results and arrays equal those committed from
  before the experiment layer moved (tests/data/tiny_reference.*), up to
  float round-off between machines (a changed behaviour moves them by far
  more than the tolerances)."""
  with open(REFERENCE + ".json") as f:
    ref = json.load(f)
  for stage, expected in ref.items():
    got = wdir.stage_record(str(wd), stage)["results"]
    for key, value in expected.items():
      if _volatile(key):
        continue
      assert key in got, (stage, key)
      if isinstance(value, str):
        assert got[key] == value, (stage, key)
        continue
      np.testing.assert_allclose(
        np.asarray(got[key], dtype=float),
        np.asarray(value, dtype=float),
        rtol=1e-3,
        atol=5e-3,
        err_msg=f"{stage}: {key}",
      )
  with np.load(REFERENCE + ".npz") as z:
    for name in z.files:
      sub, stem, key = name.split("/")
      if _volatile(key):
        continue
      with np.load(wd / sub / f"{stem}.npz") as got:
        a, b = got[key], z[name]
        if a.dtype.kind in "fc":
          np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3, err_msg=name)
        else:
          np.testing.assert_array_equal(a, b, err_msg=name)


# Two minutes on 2 cores, a fifth of the default suite: with the slow
# tests (`.ci/run`).
@pytest.mark.slow
def test_all_interrupted_resumes_without_redoing_finished_stages(tmp_path):
  wd = tmp_path / "wd"
  proc = _cli(wd, wait=False)
  # Kill once train and select have finished, i.e. in a later stage.
  deadline = time.time() + 400
  while wdir.stage_record(str(wd), "select") is None:
    assert proc.poll() is None, "`all` ended before the kill"
    assert time.time() < deadline, "select never finished"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = {s: wdir.stage_record(str(wd), s) for s in registry.STAGES}
  assert before["report"] is None

  res = _cli(wd)
  assert res.returncode == 0, res.stderr[-3000:]
  for stage in registry.STAGES:
    after = wdir.stage_record(str(wd), stage)
    assert after is not None, stage
    if before[stage] is not None:  # Finished before the kill: not redone.
      assert after["finished"] == before[stage]["finished"], stage
      assert f"Stage {stage} already finished; skipping" in res.stderr

  _assert_matches_reference(wd)
  text = open(wd / "report" / "report.md").read()
  assert "Smoke run (tiny config)" in text  # Not mistaken for results.
  for header in SECTIONS:
    assert header in text, header
  # Every table cell that should hold a measured number does.
  assert not re.search(r"\bnan\b", text), text
  assert "has not run" not in text
  for path in ("dsv.npz", "grid.png", "curves.png", "metrics.jsonl"):
    assert os.path.getsize(wd / "synthesize" / path) > 0, path
  for path in ("dsv.npz", "grid.png", "lambdas.npz"):
    assert os.path.getsize(wd / "select" / path) > 0, path
  for png in (
    "entropy_curve.png",
    "lambda_vs_accuracy.png",
    "ablation_full.png",
    "ablation_primal_only.png",
    "edit_strip.png",
    "interpolate_strip.png",
  ):
    assert os.path.getsize(wd / "report" / png) > 0, png
  results = json.load(open(wd / "report" / "results.json"))
  tiny = configs.get_config("digits", "tiny")
  # Real shots, 0-shot from the other data set and from noise, real-init
  # DSVs (and the KKT baseline).
  rows_per_k = 5 if tiny.report.baseline else 4
  assert len(results["few_shot"]) == len(tiny.report.ipc) * rows_per_k
  assert "k1/DSV (digits init)" in results["few_shot"]
  assert "k1/DSV (noise init)" in results["few_shot"]
  for name, row in results["few_shot"].items():
    assert len(row["accuracies"]) == tiny.retrain.num_models
    assert 0.0 <= row["mean"] <= 1.0
    assert 0.0 <= row["classical_agreement"] <= 1.0
    if name.startswith("k1/k random real"):
      assert row["p_vs_shots"] is None
      # Real images: the pixel judges recognise most of them.
      assert row["classical_agreement"] >= 0.7
    else:
      assert 0.0 <= row["p_vs_shots"] <= 1.0
  assert -1.0 <= results["lambda_accuracy"]["pearson"] <= 1.0
  assert 0.0 <= results["lambda_accuracy"]["pearson_p"] <= 1.0
  for r in tiny.report.flip_ratios:
    assert 0.0 <= results["decision"]["p"][str(float(r))] <= 1.0
    assert results["decision"]["pairs"][str(float(r))] > 0
  assert 0.0 <= results["ablation"]["p_retrain"] <= 1.0
  assert results["meta"]["dataset"] == "digits"
  # The reproduction table reads these results: every claim has a cell.
  table = reproduction.markdown([reproduction.load_run(str(wd))])
  assert len(table.splitlines()) >= 2 + len(reproduction.CLAIMS)
  assert "k=1: " in table
  methods = ("random", "herding", "el2n", "selected", "selected_lambda")
  for k in tiny.report.coreset_ipc:
    rows = results["coreset"][f"k{k}"]
    for method in methods:
      assert len(rows[method]["accuracies"]) == tiny.retrain.num_models
    assert 0.0 <= rows["p_selected_vs_random"] <= 1.0
    # The random row trains every model on its own draw.
    assert rows["random"]["per_model_sets"] is True
  protocol = results["boundary"]["entropy_protocol"]
  assert set(protocol) == {"top-5 lambda", "lowest-15 lambda", "all candidates"}
  assert "| mean predictive entropy (max ln C = 2.303) |" in text
  assert "Finishing phase (full-batch L-BFGS" in text
  assert "Left out as unrepresentable" in text
  summary = wdir.stage_record(str(wd), "report")["results"]
  assert summary["report"].endswith("report.md")

  # The report again: every sub-run and retraining row comes from its
  # cache (a retraining would change the recorded wall times).
  again = report.run_report(tiny, str(wd))
  assert (
    json.load(open(wd / "report" / "results.json"))["few_shot"]
    == (results["few_shot"])
  )
  assert again["lambda_accuracy_pearson"] == summary["lambda_accuracy_pearson"]

  # A copied workdir keeps its hashes (classifier paths are not hashed,
  # its content is): the report reruns from every cache.
  import glob
  import shutil

  moved = tmp_path / "moved"
  shutil.copytree(wd, moved)
  runs = sorted(
    glob.glob(str(moved / "report" / "runs" / "*" / "stages" / "*"))
  )
  before = {p: json.load(open(p))["finished"] for p in runs}
  cache = (moved / "report" / "retrain_rows.json").read_text()
  report.run_report(tiny, str(moved))
  assert runs and {p: json.load(open(p))["finished"] for p in runs} == before
  assert (moved / "report" / "retrain_rows.json").read_text() == cache
  # A changed config redoes what it touches under `all`, the report's
  # KKT-baseline sub-run included (it used to refuse its own finished
  # checkpoint as "an interrupted run of a different config").
  changed = configs.get_config("digits", "tiny")
  changed.synth.steps += 2
  registry.run(changed, str(moved), "all")
  assert wdir.stage_record(str(moved), "report")[
    "config_hash"
  ] == registry.stage_hash(changed, str(moved), "report")

  # The retrain stage's rows serve the report: the same DSV set under the
  # same recipe is not trained twice; under another recipe it is.
  from dsv_jax import artifacts
  from dsv_jax.experiment.stages import retrain as retrain_stage

  clf, ds = common.load_classifier(str(wd)), common.load_data(tiny)
  dsv, _ = artifacts.load_dsv(str(wd / "synthesize"))
  images, labels = retrain_stage.set_rows(dsv, soft=False)
  stage_rows = json.load(open(wd / "retrain" / "results.json"))["rows"]
  row = report_cache.RetrainRows(tiny, str(wd), clf, ds)("DSV", images, labels)
  assert row["accuracies"] == stage_rows["dsv"]["accuracies"]
  assert row["time_s"] == stage_rows["dsv"]["time_s"]
  assert row["name"] == "DSV"
  other = configs.get_config("digits", "tiny")
  other.retrain.steps += 1
  key = retrain_stage.row_key(other, images, labels, "test")
  assert key not in report_cache.RetrainRows(other, str(wd), clf, ds).cache

  # Without the other data set offline, the few-shot table skips its
  # 0-shot rows and says why, instead of failing the report.
  c = configs.get_config("digits", "tiny")
  c.synth.other_dataset = "idx"
  c.synth.other_data_dir = str(tmp_path / "no_such_folder")
  clf, ds = common.load_classifier(str(wd)), common.load_data(c)
  md, res = report_sections.few_shot_section(
    c, str(wd), report_cache.RetrainRows(c, str(wd), clf, ds)
  )
  assert "0-shot rows from idx are missing" in md
  assert "no_such_folder" in md
  assert len(res) == len(c.report.ipc) * (rows_per_k - 1)
  assert not any("idx init" in name for name in res)


def test_flip_rates_known_answer():
  # A linear model that predicts the class of the larger of two pixels.
  apply_fn = lambda p, x: x.reshape(len(x), -1) @ p
  params = np.eye(2, dtype=np.float32)
  # Class 0, twice, and a class-0 image the model gets wrong: left out.
  images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
  images = images.reshape(3, 2, 1, 1)
  labels = np.zeros(3, np.int32)
  added = np.array([[[[0.0]], [[1.0]]]], np.float32).reshape(1, 2, 1, 1)
  rates = report_sections.flip_rates(
    apply_fn,
    params,
    added,
    np.array([1]),
    images,
    labels,
    (0.5, 2.0),
    pixel_min=-10.0,
    pixel_max=10.0,
  )
  # x + r * a: pixel 1 = r beats pixel 0 = 1 only for r > 1.
  assert rates == {0.5: 0.0, 2.0: 1.0}


def _selection_workdir(tmp_path, lambdas, weights, labels, rankable):
  """A workdir holding only select/lambdas.npz, ranked as the stage does."""
  scores = np.where(rankable, lambdas * weights, 0.0)
  per_class = select.rank_per_class(scores, labels, labels.max() + 1)
  os.makedirs(tmp_path / "select")
  np.savez(
    tmp_path / "select" / "lambdas.npz",
    lambdas=lambdas,
    scores=scores,
    rankable=rankable,
    weights=weights,
    labels=labels,
    order=np.concatenate(per_class),
    class_start=np.cumsum([0] + [len(i) for i in per_class]),
  )
  return str(tmp_path)


def _three_pixel_classifier():
  """Predicts the brightest of three pixels (images [N, 1, 1, 3])."""
  info = types.SimpleNamespace(num_classes=3, class_names=("a", "b", "c"))
  return types.SimpleNamespace(
    apply_fn=lambda p, x: x.reshape(len(x), -1) @ p,
    params=np.eye(3, dtype=np.float32),
    info=info,
  )


def test_lambda_accuracy_section_known_values(tmp_path):
  # Test accuracy per class 1, 1/2, 0 (training images: all correct);
  # lambda sums 3, 2, 1 (contribution scores the other way round): Pearson
  # r = +1, between lambda and the test split's accuracy.
  eye = np.eye(3, dtype=np.float32).reshape(3, 1, 1, 3)
  labels = np.array([0, 1, 2], np.int32)
  wd = _selection_workdir(
    tmp_path,
    lambdas=np.array([3.0, 2.0, 1.0], np.float32),
    weights=np.array([1 / 3, 1.0, 3.0], np.float32),
    labels=labels,
    rankable=np.ones(3, bool),
  )
  ds = types.SimpleNamespace(
    train={"image": eye, "label": labels},
    test={
      "image": eye[[0, 0, 1, 0, 1, 1]],
      "label": np.array([0, 0, 1, 1, 2, 2], np.int32),
    },
  )
  clf = _three_pixel_classifier()
  md, res = report_sections.lambda_accuracy_section(
    None, wd, clf, ds, str(tmp_path)
  )
  np.testing.assert_allclose(res["accuracy"], [1.0, 0.5, 0.0])
  np.testing.assert_allclose(res["lambda_sums"], [3.0, 2.0, 1.0])
  np.testing.assert_allclose(res["pearson"], 1.0)
  assert "r = 1.000" in md and "| b | 2 | 50.00 |" in md


def test_coreset_section_ranks_and_draws_as_documented(tmp_path, monkeypatch):
  # Every row's training images, recomputed by hand from lambdas.npz, the
  # EL2N scores and the random draws; retraining is replaced by a fake
  # that records what it was given.
  rng = np.random.default_rng(0)
  n, c = 15, 3
  labels = np.arange(n, dtype=np.int32) % c
  lambdas = rng.uniform(0.1, 1.0, n).astype(np.float32)
  weights = rng.uniform(0.1, 1.0, n).astype(np.float32)
  rankable = np.arange(n) != 4
  wd = _selection_workdir(tmp_path, lambdas, weights, labels, rankable)
  x = rng.normal(size=(n, 1, 1, 4)).astype(np.float32)
  el2n = rng.uniform(size=n)
  monkeypatch.setattr(report_sections, "el2n_run", lambda *a: el2n)
  clf = types.SimpleNamespace(
    info=types.SimpleNamespace(num_classes=c),
    params=None,
    functional=types.SimpleNamespace(
      state=None, eval_features=lambda p, s, xx: xx.reshape(len(xx), -1)
    ),
  )
  seen = {}

  def rows(name, images, targets):
    seen[name] = (np.asarray(images), np.asarray(targets))
    return {"accuracies": [0.5, 0.7], "mean": 0.6, "std": 0.1}

  rows.ds = types.SimpleNamespace(train={"image": x, "label": labels})
  rows.clf = clf
  config = configs.get_config("digits", "tiny")
  config.report.coreset_ipc = (2,)
  _, res = report_sections.coreset_section(config, wd, rows)

  def top(scores):
    return np.concatenate(
      [
        i[np.argsort(-scores[i], kind="stable")][:2]
        for i in (np.flatnonzero(labels == k) for k in range(c))
      ]
    )

  contribution = np.where(rankable, lambdas * weights, 0.0)
  expected = {
    "selected k=2": top(contribution),
    "selected_lambda k=2": top(np.where(rankable, lambdas, 0.0)),
    "el2n k=2": top(el2n),
  }
  assert not np.array_equal(*list(expected.values())[:2])
  for name, idx in expected.items():
    np.testing.assert_array_equal(seen[name][0], x[idx], err_msg=name)
    np.testing.assert_array_equal(seen[name][1], labels[idx], err_msg=name)
  # Random: one draw of 2 per class for each of the K models, all different.
  draws, draw_labels = seen[f"random k=2 ({config.retrain.num_models} draws)"]
  assert draws.shape == (config.retrain.num_models, 2 * c, 1, 1, 4)
  for lab in draw_labels:
    np.testing.assert_array_equal(np.bincount(lab, minlength=c), [2] * c)
  assert not np.array_equal(draws[0], draws[1])
  assert set(res["k2"]) >= {
    "random",
    "herding",
    "selected",
    "p_selected_vs_random",
  }


def test_report_config_and_missing_stage_errors(tmp_path):
  c = configs.get_config("digits", "tiny")
  c.report.zero_shot_init = "moon"
  with pytest.raises(ValueError, match="report.zero_shot_init"):
    report.run_report(c, str(tmp_path))
  c = configs.get_config("digits", "tiny")
  c.report.detail_ipc = 7
  with pytest.raises(ValueError, match="report.detail_ipc: 7 must be one of"):
    report.run_report(c, str(tmp_path))
  c = configs.get_config("digits", "tiny")
  c.synth.other_dataset = "moon"
  with pytest.raises(ValueError, match="synth.other_dataset: unknown dataset"):
    report.run_report(c, str(tmp_path))
  c = configs.get_config("digits", "tiny")
  with pytest.raises(FileNotFoundError, match="'train' stage"):
    report.run_report(c, str(tmp_path))


def test_literature_rows_are_labelled_and_only_where_published():
  md = report_sections.literature_table("fashion_mnist")
  assert "published numbers, not run here" in md
  assert "| DC | 70.5 | 82.3 | 83.6 |" in md
  assert "| forgetting | 42.0 | 53.9 | 55.0 |" in md
  assert "| DSA | 70.6 | 84.6 | 88.7 |" in md
  assert "| KIP (to NN) | 73.8 | 86.8 | 87.8 |" in md
  assert report_sections.literature_table("digits") == ""


def test_image_inits_run_their_own_recipe():
  c = configs.get_config("digits")
  c.synth.steps, c.synth.lr_x, c.kkt.beta_tv, c.kkt.beta_norm = 1000, 0.05, 1, 2
  c.synth.image_steps, c.synth.image_lr_x = 150, 0.01
  # 0-shot's own keys at 0: it falls back to the image recipe.
  c.synth.other_steps, c.synth.other_lr_x = 0, 0.0
  noise = common.synthesis_recipe(c, "noise")
  assert (noise.synth.steps, noise.synth.lr_x) == (1000, 0.05)
  assert (noise.kkt.beta_tv, noise.kkt.beta_norm) == (1, 2)
  for init in ("real", "other"):
    r = common.synthesis_recipe(c, init)
    assert (r.synth.steps, r.synth.lr_x) == (150, 0.01)
    assert (r.kkt.beta_tv, r.kkt.beta_norm) == (0, 0)
  c.synth.init = "other"  # The default init is the config's.
  assert common.synthesis_recipe(c).synth.steps == 150
  c.synth.image_steps, c.synth.image_priors = 0, True
  r = common.synthesis_recipe(c, "real")
  assert r.synth.steps == 1000 and r.kkt.beta_norm == 2


def test_each_init_kind_runs_its_own_recipe():
  # Three distinct recipes: any init that runs another kind's fails.
  c = configs.get_config("digits")
  c.synth.steps, c.synth.lr_x, c.kkt.beta_tv, c.kkt.beta_norm = 1000, 0.05, 1, 2
  c.synth.image_steps, c.synth.image_lr_x, c.synth.image_priors = (
    150,
    0.01,
    False,
  )
  c.synth.other_steps, c.synth.other_lr_x, c.synth.other_priors = (
    700,
    0.03,
    True,
  )
  want = {
    "noise": (1000, 0.05, 1, 2),
    "real": (150, 0.01, 0, 0),
    "other": (700, 0.03, 1, 2),
  }
  for init, recipe in want.items():
    r = common.synthesis_recipe(c, init)
    assert (
      r.synth.steps,
      r.synth.lr_x,
      r.kkt.beta_tv,
      r.kkt.beta_norm,
    ) == recipe
    # The per-init keys are neutral in the copy: only the effective
    # values remain to be hashed.
    assert (r.synth.other_steps, r.synth.image_steps) == (0, 0)
  # 0-shot keys at 0 fall back to the image recipe, and its priors are
  # 0-shot's own switch.
  c.synth.other_steps, c.synth.other_lr_x, c.synth.other_priors = 0, 0.0, False
  r = common.synthesis_recipe(c, "other")
  assert (r.synth.steps, r.synth.lr_x, r.kkt.beta_tv) == (150, 0.01, 0)
  c.synth.image_priors = True
  assert common.synthesis_recipe(c, "other").kkt.beta_tv == 0
  assert common.synthesis_recipe(c, "real").kkt.beta_tv == 1


def test_the_zero_shot_recipe_enters_only_zero_shot_hashes():
  def h(init, **kv):
    c = configs.get_config("digits")
    c.synth.init = init
    for key, v in kv.items():
      c.synth[key] = v
    return registry.stage_hash(c, "/nonexistent-workdir", "synthesize")

  for key, value in (("other_steps", 77), ("other_lr_x", 0.5)):
    assert h("other", **{key: value}) != h("other")
    assert h("noise", **{key: value}) == h("noise")
    assert h("real", **{key: value}) == h("real")
  flipped = not configs.get_config("digits").synth.other_priors
  assert h("other", other_priors=flipped) != h("other")
  assert h("real", other_priors=flipped) == h("real")


def test_a_synthesis_hash_depends_only_on_the_recipe_it_runs():
  def h(stage, init="noise", **kv):
    c = configs.get_config("digits")
    c.synth.init = init
    for key, v in kv.items():
      section, field = key.split("__")
      c[section][field] = v
    return registry.stage_hash(c, "/nonexistent-workdir", stage)

  # The image recipe does not touch a noise synthesis, and the priors (off
  # for images) do not touch an image one; each redoes its own.
  assert h("synthesize", synth__image_steps=77) == h("synthesize")
  assert h("synthesize", "real", synth__image_steps=77) != h(
    "synthesize", "real"
  )
  assert h("synthesize", "real", kkt__beta_tv=5.0) == h("synthesize", "real")
  assert h("synthesize", kkt__beta_tv=5.0) != h("synthesize")
  # Editing starts from real images; the report runs both recipes.
  assert h("edit", synth__image_lr_x=0.2) != h("edit")
  assert h("edit", kkt__beta_tv=5.0) == h("edit")
  assert h("report", synth__image_steps=77) != h("report")


def test_stale_interrupted_sub_run_is_discarded_not_refused(tmp_path):
  # A report sub-run interrupted under an older config (a real Orbax
  # checkpoint) is redone from scratch; one of this config is kept to resume.
  ckpt_dir = str(tmp_path / "ckpt" / "synthesize")
  ckptr = checkpoints.RunCheckpointer(ckpt_dir)
  ckptr.save(3, {"x": np.zeros(2, np.float32)}, {"config_hash": "old"})
  ckptr.close()
  report_cache.discard_stale_checkpoints(ckpt_dir, "old")
  assert os.path.isdir(ckpt_dir)
  report_cache.discard_stale_checkpoints(ckpt_dir, "new")
  assert not os.path.exists(ckpt_dir)
  report_cache.discard_stale_checkpoints(
    ckpt_dir, "new"
  )  # Nothing there: fine.
