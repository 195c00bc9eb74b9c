"""Specification tests of the workdir hashes and the caches, enumerated.

Stage hashes (`dsv_jax.experiment.workdir` module docstring): a stage's
hash covers the config SECTIONS it declares, minus the keys the docstring
names (`PROGRESS_KEYS`, `LOCATION_KEYS`, `DEVICE_KEYS`, options at their
`NEUTRAL_DEFAULTS`), and the digests of its inputs: the records of the
stages it declares UPSTREAM and the content of the classifier. Every case
is generated: each config key, changed alone, redoes exactly the stages
whose hash covers it; each upstream record, changed alone, redoes exactly
the stages that read it.

Caches: retraining rows (`retrain_stage.row_key`, evaluation split
included; the report's `RetrainRows`) and the classical judges
(`common.classical_judges`) never share an entry between inputs that
differ.
"""

import json
import types

import ml_collections
import numpy as np
import pytest

from dsv_jax import configs, judges
from dsv_jax.experiment import common, registry
from dsv_jax.experiment import workdir as wd
from dsv_jax.experiment.report import cache as report_cache
from dsv_jax.experiment.stages import retrain as retrain_stage

# Documented per stage, beyond the module-wide exclusions: select's hash
# leaves out max_iters (its `stage_hash` docstring: a finished fit
# extends to a larger budget instead of starting again).
STAGE_EXCLUDES = {"select": {("select", "max_iters")}}
# Synthesis-like stages hash the recipe they run (`common.synthesis_recipe`):
# synthesize from `synth.init`, edit and interpolate from real images.
RECIPE_INIT = {
  "synthesize": lambda c: c.synth.init,
  "edit": lambda c: "real",
  "interpolate": lambda c: "real",
}
# model.source other than "train" loads a classifier from elsewhere (a
# download): the hash of such a config is tested with the sources.
NOT_ENUMERATED = {("model", "source")}


def _changed(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 1.5 + 0.25
  if isinstance(value, str):
    return value + "_x"
  if isinstance(value, tuple):
    return (*value, 2)
  raise TypeError(f"no change rule for {value!r}")


def _view(config, stage):
  """What the hash of `stage` covers in `config`, from the docstrings."""
  module = registry.STAGE_MODULES[stage]
  if stage in RECIPE_INIT:
    config = common.synthesis_recipe(config, RECIPE_INIT[stage](config))
  d = config.to_dict()
  excluded = set(wd.LOCATION_KEYS) | set(wd.DEVICE_KEYS)
  excluded |= STAGE_EXCLUDES.get(stage, set())
  out = {}
  for section in module.SECTIONS:
    v = d[section]
    if isinstance(v, dict):
      v = {
        k: x
        for k, x in v.items()
        if k not in wd.PROGRESS_KEYS
        and (section, k) not in excluded
        and wd.NEUTRAL_DEFAULTS.get((section, k), object()) != x
      }
    out[section] = v
  return out


def _keys(config):
  for section, v in config.to_dict().items():
    if isinstance(v, dict):
      for k in v:
        if (section, k) not in NOT_ENUMERATED:
          yield section, k
    else:
      yield section, None


def _with(config, section, key, value):
  c = ml_collections.ConfigDict(config.to_dict())
  if key is None:
    c[section] = value
  else:
    c[section][key] = value
  return c


def _write_classifier(workdir, content):
  path = workdir / "classifier"
  path.mkdir(exist_ok=True)
  (path / "meta.json").write_text(content)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
  # Data "available" without loading it: edit and interpolate then start
  # from real images (`common.start_digest`).
  monkeypatch.setattr(common, "try_load_data", lambda config: object())
  _write_classifier(tmp_path, '{"classifier": 1}')
  for stage in registry.STAGES:
    wd.mark_done(str(tmp_path), stage, f"{stage}-0", {})
  return tmp_path


def _hashes(config, workdir):
  return {
    s: registry.stage_hash(config, str(workdir), s) for s in registry.STAGES
  }


def test_every_config_key_redoes_exactly_the_stages_that_read_it(workdir):
  config = configs.get_config("digits", "tiny")
  before = _hashes(config, workdir)
  views = {s: _view(config, s) for s in registry.STAGES}
  checked = {True: 0, False: 0}
  for section, key in _keys(config):
    value = config[section] if key is None else config[section][key]
    if key in ("classifier",):
      # A location: the same classifier elsewhere (here: the workdir's
      # own, by its path) is the same input.
      new = _with(config, section, key, str(workdir))
    else:
      new = _with(config, section, key, _changed(value))
    after = _hashes(new, workdir)
    for stage in registry.STAGES:
      expect = _view(new, stage) != views[stage]
      got = after[stage] != before[stage]
      assert got == expect, (
        f"changing {section}.{key} {'should' if expect else 'should not'} "
        f"redo stage {stage}"
      )
      checked[expect] += 1
  # Both kinds of case occur, many times.
  assert checked[True] > 200 and checked[False] > 200, checked


def test_every_upstream_record_redoes_exactly_the_stages_that_read_it(workdir):
  config = configs.get_config("digits", "tiny")
  before = _hashes(config, workdir)
  for changed in registry.STAGES:
    wd.mark_done(str(workdir), changed, f"{changed}-1", {})
    after = _hashes(config, workdir)
    for stage in registry.STAGES:
      upstream = registry.STAGE_MODULES[stage].UPSTREAM
      if changed == "train" and stage != "report":
        # The classifier's content stands for the train stage (below).
        continue
      # Edit and interpolate read the synthesize record only where there
      # is no data to start from (`common.start_digest`); here there is.
      reads = changed in upstream and not (
        stage in ("edit", "interpolate") and changed == "synthesize"
      )
      assert (after[stage] != before[stage]) == reads, (changed, stage)
    wd.mark_done(str(workdir), changed, f"{changed}-0", {})
  assert _hashes(config, workdir) == before


def test_edit_and_interpolate_read_the_synthesize_record_without_data(
  workdir, monkeypatch
):
  monkeypatch.setattr(common, "try_load_data", lambda config: None)
  config = configs.get_config("digits", "tiny")
  before = _hashes(config, workdir)
  wd.mark_done(str(workdir), "synthesize", "synthesize-1", {})
  after = _hashes(config, workdir)
  for stage in ("edit", "interpolate"):
    assert after[stage] != before[stage], stage


def test_the_classifier_content_redoes_every_stage_downstream_of_train(workdir):
  config = configs.get_config("digits", "tiny")
  before = _hashes(config, workdir)
  _write_classifier(workdir, '{"classifier": 2, "retrained": true}')
  after = _hashes(config, workdir)
  for stage in registry.STAGES:
    downstream = "train" in registry.STAGE_MODULES[stage].UPSTREAM
    assert (after[stage] != before[stage]) == downstream, stage


# ---------------------------------------------------------------------------
# Cache keys.


def test_retraining_row_key_distinguishes_every_input():
  config = configs.get_config("digits", "tiny")
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 2, 2, 1)).astype(np.float32)
  labels = np.array([0, 1, 2, 1], np.int32)
  key = retrain_stage.row_key(config, images, labels, "test")
  # The evaluation split: given, or the recipe's.
  assert retrain_stage.row_key(config, images, labels, "validation") != key
  config.retrain.eval_split = "test"
  assert retrain_stage.row_key(config, images, labels) == key
  config.retrain.eval_split = "validation"
  assert retrain_stage.row_key(config, images, labels) != key
  config.retrain.eval_split = "test"
  # The images and targets, to the last bit.
  bumped = images.copy()
  bumped[-1, -1, -1, -1] = np.nextafter(bumped[-1, -1, -1, -1], np.inf)
  assert retrain_stage.row_key(config, bumped, labels, "test") != key
  assert retrain_stage.row_key(config, images, labels[::-1], "test") != key
  soft = np.eye(3, dtype=np.float32)[labels]
  assert retrain_stage.row_key(config, images, soft, "test") != key
  # Every key of the recipe, the model and the data, and the seed; no
  # other section.
  for section, k in _keys(config):
    if section == "retrain" and k == "eval_split":
      continue
    value = config[section] if k is None else config[section][k]
    new = _with(config, section, k, _changed(value))
    reads = section in ("retrain", "model", "data", "seed")
    got = retrain_stage.row_key(new, images, labels, "test") != key
    assert got == reads, (section, k)


def test_report_rows_never_reuse_a_row_evaluated_on_another_split(
  tmp_path, monkeypatch
):
  # The retrain stage's rows are reused by the report only where they were
  # evaluated on the split the report evaluates on (test).
  config = configs.get_config("digits", "tiny")
  # The recipe's own split is validation (the tuning split); the report's
  # rows are on test whatever it says.
  config.retrain.eval_split = "validation"
  images = np.zeros((2, 2, 2, 1), np.float32)
  labels = np.array([0, 1], np.int32)
  trained = []

  def retrain_sets(cfg, clf, ds, sets):
    trained.append(cfg.retrain.eval_split)
    return {n: {"accuracies": [0.25], "mean": 0.25, "std": 0.0} for n in sets}

  monkeypatch.setattr(retrain_stage, "retrain_sets", retrain_sets)
  for split, reused in (("validation", False), ("test", True)):
    workdir = tmp_path / split
    (workdir / "retrain").mkdir(parents=True)
    (workdir / "report").mkdir()
    row = {
      "accuracies": [0.75],
      "mean": 0.75,
      "std": 0.0,
      "key": retrain_stage.row_key(config, images, labels, split),
    }
    (workdir / "retrain" / "results.json").write_text(
      json.dumps({"rows": {"dsv": row}})
    )
    wd.mark_done(
      str(workdir),
      "retrain",
      retrain_stage.stage_hash(config, str(workdir)),
      {},
    )
    trained.clear()
    rows = report_cache.RetrainRows(config, str(workdir), None, None)
    got = rows("dsv", images, labels)
    assert got["mean"] == (0.75 if reused else 0.25), split
    assert trained == ([] if reused else ["test"]), split


def test_classical_judges_are_fitted_once_per_data_config_and_seed(monkeypatch):
  fits = []
  monkeypatch.setattr(
    judges,
    "fit_classical",
    lambda images, labels, info: fits.append(len(images)) or {"n": len(fits)},
  )
  config = configs.get_config("digits", "tiny")
  config.data.max_train = 4321  # a data config no other test caches
  ds = types.SimpleNamespace(
    train={"image": np.zeros((3, 1, 1, 1)), "label": np.zeros(3)}, info=None
  )
  first = common.classical_judges(config, ds)
  assert common.classical_judges(config, ds) is first and len(fits) == 1
  for section, k in _keys(config):
    value = config[section] if k is None else config[section][k]
    new = _with(config, section, k, _changed(value))
    n = len(fits)
    got = common.classical_judges(new, ds)
    reads = section in ("data", "seed")
    assert (len(fits) > n) == reads, (section, k)
    assert (got is not first) == reads, (section, k)
