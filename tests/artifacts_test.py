"""The DSV set artifact: numpy-only readability, Orbax copy, schema checks."""

import json
import os
import zipfile

import numpy as np
import pytest

from dsv_jax import artifacts


def _set(n=5, soft=False):
  rng = np.random.default_rng(0)
  targets = (
    rng.dirichlet(np.ones(3), n).astype(np.float32)
    if soft
    else np.arange(n) % 3
  )
  return artifacts.DSVSet(
    images=rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
    targets=targets,
    lambdas=rng.normal(size=n),
    active=np.arange(n) % 2 == 0,
    source=np.array(["noise", "real", "other", "user", "train"][:n]),
    source_index=np.array([-1, 3, 7, -1, 2][:n]),
    confidence=rng.uniform(size=n),
    entropy=rng.uniform(size=n),
    margin=rng.normal(size=n),
  )


@pytest.mark.parametrize("soft", [False, True])
def test_roundtrip_npz_and_orbax(tmp_path, soft):
  dsv = _set(soft=soft)
  meta = artifacts.save_dsv(
    tmp_path,
    dsv,
    dataset="digits",
    mean=[0.3],
    std=[0.37],
    config_hash="abc",
    extra={"seed": 1},
  )
  assert meta["schema_version"] == artifacts.SCHEMA_VERSION
  for orbax in (False, True):
    back, meta2 = artifacts.load_dsv(tmp_path, orbax=orbax)
    assert meta2 == meta
    for name in artifacts.DSVSet._fields:
      a, b = getattr(dsv, name), getattr(back, name)
      if name == "source":
        assert list(a) == list(b)
      else:
        np.testing.assert_allclose(
          np.asarray(b, float), np.asarray(a, float), rtol=1e-6
        )
    assert back.images.dtype == np.float32 and back.active.dtype == bool
    assert back.targets.dtype == (np.float32 if soft else np.int32)
    assert back.source_index.dtype == np.int32


def test_npz_is_readable_with_numpy_alone(tmp_path):
  artifacts.save_dsv(
    tmp_path,
    _set(),
    dataset="digits",
    mean=[0.3],
    std=[0.37],
    config_hash="abc",
  )
  path = os.path.join(tmp_path, artifacts.NPZ)
  with np.load(path, allow_pickle=False) as z:  # No pickled objects inside.
    assert z["images"].shape == (5, 4, 4, 1)
    assert str(z["dataset"]) == "digits"
    assert str(z["config_hash"]) == "abc"
    assert int(z["schema_version"]) == artifacts.SCHEMA_VERSION
    np.testing.assert_allclose(z["mean"], [0.3])
    assert json.loads(str(z["meta_json"]))["std"] == [0.37]
    assert list(z["source"]) == ["noise", "real", "other", "user", "train"]
  with zipfile.ZipFile(path) as zf:
    assert "images.npy" in zf.namelist()


def test_bad_sets_and_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="No DSV set"):
    artifacts.load_dsv(tmp_path)
  bad = _set()._replace(source=np.array(["noise", "x", "real", "real", "a"]))
  with pytest.raises(ValueError, match="unknown source"):
    artifacts.save_dsv(tmp_path, bad, dataset="d", mean=[0], std=[1])
  bad = _set()._replace(lambdas=np.zeros(4))
  with pytest.raises(ValueError, match="lambdas has"):
    artifacts.save_dsv(tmp_path, bad, dataset="d", mean=[0], std=[1])
  bad = _set()._replace(targets=np.zeros(5, np.float32))
  with pytest.raises(ValueError, match="1-D targets must be integers"):
    artifacts.save_dsv(tmp_path, bad, dataset="d", mean=[0], std=[1])
