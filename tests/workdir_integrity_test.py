"""A workdir's stages are identified by results and inputs, never timings,
and a finished stage whose outputs are gone or damaged is redone."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dsv_jax import artifacts, configs
from dsv_jax.experiment import registry
from dsv_jax.experiment import workdir as wdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
  return configs.get_config("digits", "tiny")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A workdir where the tiny config's train and select stages finished."""
  wd = tmp_path_factory.mktemp("finished") / "wd"
  for stage in ("train", "select"):
    registry.run(_tiny(), str(wd), stage, progress=False)
  return wd


@pytest.fixture
def wd(finished, tmp_path):
  return shutil.copytree(finished, tmp_path / "wd")


def _hashes(wd):
  return {s: registry.stage_hash(_tiny(), str(wd), s) for s in registry.STAGES}


def test_run_fields_are_not_results():
  results = {
    "test_accuracy": 0.9,
    "train_time_s": 12.0,
    "finish_time_s": 3.0,
    "s_per_iter": 0.1,
    "candidate_steps_per_s": 50.0,
    "resumed_from_step": 3,
    "resumed_from_iteration": 0,
    "num_devices": 4,
    "train_accuracy_last_batch": 0.5,
    "finish_rel_grad_before": 9.0,
    "iterations": 6,
  }
  assert wdir.stable_results(results) == {
    "test_accuracy": 0.9,
    "iterations": 6,
  }


def test_rerunning_a_finished_stage_changes_no_digest(wd):
  before = _hashes(wd)
  meta = json.loads((wd / "classifier" / "meta.json").read_text())
  registry.run(_tiny(), str(wd), "train", progress=False)
  after = json.loads((wd / "classifier" / "meta.json").read_text())
  # The rerun wrote the classifier again (its own timing)...
  assert after["results"]["resumed_from_step"] == _tiny().train.steps
  assert after["results"]["train_time_s"] != meta["results"]["train_time_s"]
  # ... and every later stage still counts as finished under its hash.
  assert _hashes(wd) == before
  assert wdir.record_digest(str(wd), "select") == before["select"]
  # A named finished stage resumes its last checkpoint: no iteration again.
  res = registry.run(_tiny(), str(wd), "select", progress=False)["select"]
  assert res["resumed_from_iteration"] == res["iterations"] > 0


def test_other_weights_change_the_digest(wd):
  before = _hashes(wd)
  path = wd / "classifier" / "meta.json"
  meta = json.loads(path.read_text())
  meta["results"]["test_loss"] += 1e-6  # What other weights would give.
  path.write_text(json.dumps(meta))
  after = _hashes(wd)
  assert after["train"] == before["train"]  # Its recipe: the same.
  for stage in registry.STAGES[1:]:
    assert after[stage] != before[stage], stage


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
  "stage,rel,damage",
  [
    ("train", "classifier/meta.json", _truncate),
    ("train", "classifier/meta.json", os.remove),
    ("select", "select/dsv.npz", _truncate),
    ("select", "select/lambdas.npz", os.remove),
  ],
  ids=["meta-truncated", "meta-deleted", "dsv-truncated", "lambdas-deleted"],
)
def test_a_damaged_output_redoes_its_stage(wd, monkeypatch, stage, rel, damage):
  module = registry.STAGE_MODULES[stage]
  record = wdir.stage_record(str(wd), stage)
  assert registry.damaged_outputs(module, record, _tiny(), str(wd)) is None
  before = _hashes(wd)
  damage(wd / rel)
  problem = registry.damaged_outputs(module, record, _tiny(), str(wd))
  assert problem and rel in problem
  # `all`, cut to the stages this workdir has, redoes the damaged one.
  monkeypatch.setattr(registry, "STAGES", ("train", "select"))
  out = registry.run(_tiny(), str(wd), "all", progress=False)
  assert registry.damaged_outputs(module, record, _tiny(), str(wd)) is None
  assert {s: registry.stage_hash(_tiny(), str(wd), s) for s in before} == before
  if stage == "select":
    artifacts.load_dsv(wd / "select")
    assert (
      out["select"]["resumed_from_iteration"] == out["select"]["iterations"]
    )


def test_a_damaged_classifier_names_the_command_that_repairs_it(wd):
  _truncate(wd / "classifier" / "meta.json")
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "dsv_jax.main",
      "--config=digits:tiny",
      f"--workdir={wd}",
      "--stage=select",
    ],
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 2, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("dsv: error: The classifier record"), last
  assert "--stage train" in last, last


def test_a_damaged_dsv_set_names_the_command_that_repairs_it(wd):
  _truncate(wd / "select" / "dsv.npz")
  with pytest.raises(ValueError, match="damaged .*`--stage select`"):
    artifacts.load_dsv(wd / "select")
  os.remove(wd / "select" / "dsv.npz")
  with pytest.raises(FileNotFoundError, match="`--stage select`"):
    artifacts.load_dsv(wd / "select")
