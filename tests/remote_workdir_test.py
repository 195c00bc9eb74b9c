"""Workdirs on gs:// (issue 17): the experiment layer's own files go through
`etils.epath`, and a URI is never made into a local path.

No GCS here and no gcsfs: epath's gs:// backend (fsspec) is given an
in-memory object store that, like GCS, cannot append. Orbax writes its
arrays through TensorStore, which this stand-in cannot serve, so the Orbax
saves are replaced by a recorder of the paths they get; the stages with
their checkpoints run on local paths in the other tests.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem

from dsv_jax import artifacts, checkpoints, configs, viz
from dsv_jax.experiment import registry
from dsv_jax.experiment import workdir as wdir

ROOT = "gs://bucket/run"


class _ObjectStore(MemoryFileSystem):
  """GCS stand-in: objects in memory, written whole, never appended to."""

  protocol = ("gs", "gcs")

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"an object store cannot append ({path})")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def store(monkeypatch):
  fs = _ObjectStore(global_store=False, skip_instance_cache=True)
  monkeypatch.setattr(backend.fsspec_backend, "_get_filesystem", lambda _: fs)
  # With TensorFlow installed epath would take gs:// to tf.io.gfile instead.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  return fs


@pytest.fixture
def orbax_paths(monkeypatch):
  """The paths Orbax is asked to save to (nothing is written)."""
  paths = []

  class Recorder:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def save(self, path, tree, force=False):
      del tree, force
      paths.append(os.fspath(path))

  monkeypatch.setattr(checkpoints.ocp, "StandardCheckpointer", Recorder)
  return paths


def test_a_uri_stays_a_uri_and_a_local_path_becomes_absolute(
  tmp_path, monkeypatch
):
  assert checkpoints.abspath(ROOT) == ROOT
  assert os.path.join(checkpoints.abspath(ROOT), "stages") == f"{ROOT}/stages"
  assert wdir.record_path(ROOT, "train") == f"{ROOT}/stages/train.json"
  monkeypatch.chdir(tmp_path)
  assert checkpoints.abspath("wd") == str(tmp_path / "wd")


def test_a_workdir_that_is_a_remote_file_is_refused_naming_it(store):
  epath.Path("gs://bucket/afile").write_text("x")
  config = configs.get_config("digits", "tiny")
  with pytest.raises(NotADirectoryError, match="gs://bucket/afile is a file"):
    registry.run(config, "gs://bucket/afile", "train")


def test_records_metrics_arrays_and_pngs_go_to_the_store(store):
  wdir.mark_done(ROOT, "select", "abc", {"iterations": 3})
  assert wdir.record_digest(ROOT, "select") == "abc"
  assert wdir.stage_record(ROOT, "select")["results"] == {"iterations": 3}
  assert wdir.stage_record(ROOT, "train") is None
  # Written beside and renamed: no temporary object is left.
  assert epath.Path(ROOT, "stages").exists()
  assert [p.name for p in epath.Path(ROOT, "stages").iterdir()] == [
    "select.json"
  ]

  metrics = f"{ROOT}/select/metrics.jsonl"
  write = wdir.jsonl_writer(metrics, keep_through_step=0)
  for step in (1, 2, 3):
    write({"step": step, "loss": float(step), "bad": float("nan")})
  lines = epath.Path(metrics).read_text().splitlines()
  assert [json.loads(r) for r in lines] == [
    {"step": s, "loss": float(s), "bad": None} for s in (1, 2, 3)
  ]
  # A resume from step 1's checkpoint logs steps 2.. again, once each.
  write = wdir.jsonl_writer(metrics, keep_through_step=1)
  write({"step": 2, "loss": 20.0})
  rows = [json.loads(r) for r in epath.Path(metrics).read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 20.0)]

  wdir.savez(f"{ROOT}/select/lambdas.npz", lambdas=np.arange(4.0))
  with epath.Path(ROOT, "select", "lambdas.npz").open("rb") as f:
    np.testing.assert_array_equal(np.load(f)["lambdas"], np.arange(4.0))

  viz.plot_curves(f"{ROOT}/select/curves.png", rows, title="selection")
  png = epath.Path(ROOT, "select", "curves.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n")

  epath.Path(ROOT, "ckpt", "select", "0").mkdir(parents=True)
  epath.Path(ROOT, "ckpt", "select", "0", "x").write_text("x")
  wdir.clear_checkpoints(ROOT, ["select", "train"])
  assert not epath.Path(ROOT, "ckpt", "select").exists()


def test_dsv_sets_and_classifier_records_on_the_store(
  store, orbax_paths, tmp_path
):
  rng = np.random.default_rng(0)
  n = 3
  dsv = artifacts.DSVSet(
    images=rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
    targets=np.arange(n),
    lambdas=rng.normal(size=n),
    active=np.array([True, False, True]),
    source=np.array(["noise", "real", "train"]),
    source_index=np.array([-1, 3, 7]),
    confidence=rng.uniform(size=n),
    entropy=rng.uniform(size=n),
    margin=rng.normal(size=n),
  )
  meta = artifacts.save_dsv(
    f"{ROOT}/select", dsv, dataset="digits", mean=[0.5], std=[0.2]
  )
  assert orbax_paths == [f"{ROOT}/select/{artifacts.ORBAX}"]
  names = sorted(p.name for p in epath.Path(ROOT, "select").iterdir())
  assert names == [artifacts.NPZ, "dsv_meta.json"]  # No temporary left.
  back, back_meta = artifacts.load_dsv(f"{ROOT}/select")
  assert back_meta == meta
  assert json.loads(epath.Path(ROOT, "select", "dsv_meta.json").read_text())
  np.testing.assert_array_equal(back.images, dsv.images)
  np.testing.assert_array_equal(back.source, dsv.source)

  classifier = f"{ROOT}/classifier"
  checkpoints.save_classifier(classifier, {"w": np.ones(2)}, {"seed": 7})
  assert orbax_paths[-1] == f"{classifier}/arrays"
  assert checkpoints.load_classifier_meta(classifier) == {"seed": 7}
  # The content digest reads the store: the same files on a local disk
  # give the same digest (it covers names and bytes, not locations).
  epath.Path(classifier, "arrays", "d").mkdir(parents=True)
  epath.Path(classifier, "arrays", "d", "shard").write_bytes(b"\x00\x01")
  local = tmp_path / "classifier"
  (local / "arrays" / "d").mkdir(parents=True)
  (local / "arrays" / "d" / "shard").write_bytes(b"\x00\x01")
  (local / "meta.json").write_text(
    epath.Path(classifier, "meta.json").read_text()
  )
  digest = wdir.classifier_digest(ROOT)  # Finds classifier/ inside.
  assert digest is not None
  assert digest == wdir.classifier_digest(str(local))
  # A rewrite of another size (the store here keeps no mtimes).
  epath.Path(classifier, "arrays", "d", "shard").write_bytes(b"\x00\x02\x03")
  assert wdir.classifier_digest(classifier) != digest


def test_the_lock_on_the_store_names_the_holder(store):
  lock = epath.Path(ROOT, ".lock")
  with wdir.lock(ROOT):
    holder = json.loads(lock.read_text())
    assert (holder["pid"], holder["host"]) == (
      os.getpid(),
      socket.gethostname(),
    )
    with pytest.raises(wdir.WorkdirLocked, match=f"pid {os.getpid()} on"):
      with wdir.lock(ROOT):
        pass
  assert not lock.exists()
  # A lock left by a killed run of this host is taken over.
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
  ).stdout.strip()
  lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
  with wdir.lock(ROOT):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  # One from another host is not guessed about.
  lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
  with pytest.raises(wdir.WorkdirLocked, match="on elsewhere since x"):
    with wdir.lock(ROOT):
      pass
