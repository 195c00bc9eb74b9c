"""`config.model.source`: the stages on a classifier from elsewhere.

A factory (`byo_classifier`) stands for a user's own model; one has no
training data here (data.name cifar10 in an empty folder), like a
pretrained ImageNet model, one classifies the bundled digits.
"""

import json
import os

import numpy as np
import pytest

from dsv_jax import artifacts
from dsv_jax.configs import digits
from dsv_jax.experiment import common, registry, sources


def _offline_config(tmp_path):
  c = digits.get_config("tiny")
  c.model.source = "byo_classifier:offline_classifier"
  c.data.name = "cifar10"
  c.data.data_dir = str(tmp_path / "no_data")
  c.synth.classes = "1,class3"
  c.synth.num_per_class = 2
  c.synth.other_dataset = "digits"
  return c


def test_parse():
  assert sources.parse("train") == ("train", "", "")
  assert sources.parse("torchvision:resnet50") == (
    "torchvision",
    "resnet50",
    "IMAGENET1K_V1",
  )
  assert sources.parse("torchvision:resnet50:IMAGENET1K_V2")[2] == (
    "IMAGENET1K_V2"
  )
  assert sources.parse("my.pkg:make") == ("factory", "my.pkg", "make")
  for bad in ("", "resnet50", "torchvision:vgg", "a:b:c", ":f"):
    with pytest.raises(ValueError, match="Config key model.source"):
      sources.parse(bad)


def test_factory_errors_name_the_problem(tmp_path):
  c = _offline_config(tmp_path)
  for source, match in (
    ("byo_classifier:nope", "cannot load 'byo_classifier:nope'"),
    ("no_such_module_xyz:f", "cannot load"),
    ("byo_classifier:not_a_tuple", "returned str; expected"),
    ("byo_classifier:wrong_logits", r"to \(2, 3\), not the \(2, 10\) logits"),
  ):
    c.model.source = source
    with pytest.raises(ValueError, match=match):
      sources.classifier_for(c, str(tmp_path))


def test_classes_by_index_or_name(tmp_path):
  from byo_classifier import OFFLINE_INFO

  got = common.resolve_classes(" 1, class3 ,0", OFFLINE_INFO, "synth.classes")
  np.testing.assert_array_equal(got, [1, 3, 0])
  assert len(common.resolve_classes("", OFFLINE_INFO, "k")) == 10
  with pytest.raises(ValueError, match="Config key synth.classes: 'cat'"):
    common.resolve_classes("1,cat", OFFLINE_INFO, "synth.classes")
  with pytest.raises(ValueError, match="'10' is no class index"):
    common.resolve_classes("10", OFFLINE_INFO, "synth.classes")


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_no_data_synthesize_edit_interpolate(tmp_path):
  """The whole pipeline on a classifier without data: what needs data
  skips in one line, synthesis needs none, edits and interpolations start
  from its DSVs."""
  c = _offline_config(tmp_path)
  c.edit.pairs = "1->class5, class3->0"
  c.interpolate.class_a, c.interpolate.class_b = 1, 4
  c.synth.image_size = 12  # A globally pooled net takes any size.
  c.synth.lowres_size, c.synth.lowres_steps = 6, 2
  workdir = str(tmp_path / "wd")
  out = registry.run(c, workdir, "all")
  assert out["train"] == {"source": c.model.source, "trained": False}
  assert out["synthesize"]["lowres_steps"] == 2
  assert os.path.isdir(os.path.join(workdir, "ckpt", "synthesize_lowres"))
  for stage in ("select", "retrain", "report"):
    assert "skipped" in out[stage], stage
    assert not os.path.exists(os.path.join(workdir, "stages", f"{stage}.json"))
  assert "cifar10" in out["select"]["skipped"]
  dsv, _ = artifacts.load_dsv(os.path.join(workdir, "synthesize"))
  assert dsv.images.shape == (4, 12, 12, 3)
  np.testing.assert_array_equal(dsv.targets, [1, 1, 3, 3])
  ed = np.load(os.path.join(workdir, "edit", "edit.npz"))
  assert str(ed["start"]) == "dsv" and out["edit"]["start"] == "dsv"
  np.testing.assert_array_equal(ed["original_label"], [1, 3])
  np.testing.assert_array_equal(ed["target"], [5, 0])
  # Each edit starts from a surviving DSV of its class.
  np.testing.assert_array_equal(ed["original"], dsv.images[ed["source_index"]])
  assert set(dsv.targets[ed["source_index"]]) == {1, 3}
  it = np.load(os.path.join(workdir, "interpolate", "interpolate.npz"))
  assert it["images"].shape == (3, 12, 12, 3) and str(it["start"]) == "dsv"
  for png in ("synthesize/grid.png", "edit/strip.png", "interpolate/strip.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000
  # A second `all` redoes nothing that finished.
  again = registry.run(c, workdir, "all")
  with open(os.path.join(workdir, "stages", "synthesize.json")) as f:
    assert json.load(f)["results"] == again["synthesize"]


def test_edit_pairs_errors(tmp_path):
  c = _offline_config(tmp_path)
  workdir = str(tmp_path / "wd")
  registry.run(c, workdir, "synthesize")
  c.edit.pairs = "1->2->3"
  with pytest.raises(ValueError, match="edit.pairs: '1->2->3' is not a list"):
    registry.run(c, workdir, "edit")
  c.edit.pairs = "1->zebra"
  with pytest.raises(ValueError, match="edit.pairs: 'zebra'"):
    registry.run(c, workdir, "edit")
  # Without data an edit starts from a DSV of its source class.
  c.edit.pairs = "2->1"
  with pytest.raises(FileNotFoundError, match="no surviving one of class 2"):
    registry.run(c, workdir, "edit")


def test_edit_without_data_or_dsvs_says_what_to_run(tmp_path):
  c = _offline_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="run --stage=synthesize first"):
    registry.run(c, str(tmp_path / "wd"), "edit")


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_factory_with_data_runs_select_and_retrain(tmp_path):
  """With its data here, selection explains the factory's classifier and
  retraining measures its DSVs."""
  c = digits.get_config("tiny")
  c.model.source = "byo_classifier:digits_classifier"
  workdir = str(tmp_path / "wd")
  out = registry.run(c, workdir, "select")["select"]
  assert "skipped" not in out
  sel, _ = artifacts.load_dsv(os.path.join(workdir, "select"))
  assert len(sel.images) == 10 * c.select.num_per_class
  assert np.all(sel.lambdas >= 0)
  # Retraining trains fresh models of config.model on its DSVs.
  registry.run(c, workdir, "synthesize")
  rows = registry.run(c, workdir, "retrain")["retrain"]
  assert "skipped" not in rows and 0 <= rows["dsv_mean"] <= 1
