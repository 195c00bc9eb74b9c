"""RunCheckpointer: restore errors are one line and keep Orbax's cause."""

import glob
import os

import jax.numpy as jnp
import pytest

from dsv_jax import checkpoints


def _saved(directory, state) -> checkpoints.RunCheckpointer:
  ckptr = checkpoints.RunCheckpointer(directory)
  ckptr.save(3, state, {"note": "test"})
  return ckptr


def test_damaged_checkpoint_error_is_one_line_with_orbax_cause(tmp_path):
  target = {"x": jnp.arange(6.0), "y": jnp.zeros(2)}
  _saved(tmp_path / "ckpt", target).close()
  manifests = glob.glob(
    os.path.join(tmp_path, "ckpt", "3", "state", "**", "manifest.ocdbt"),
    recursive=True,
  )
  assert manifests
  for path in manifests:  # Truncated, as by a full disk.
    open(path, "wb").close()
  ckptr = checkpoints.RunCheckpointer(tmp_path / "ckpt")
  with pytest.raises(ValueError, match="at step 3 .* or is damaged") as info:
    ckptr.restore(target)
  assert "\n" not in str(info.value)
  assert info.value.__cause__ is not None


def test_structure_mismatch_error_keeps_its_cause(tmp_path):
  ckptr = _saved(tmp_path / "ckpt", {"x": jnp.arange(6.0)})
  with pytest.raises(ValueError, match="does not match") as info:
    ckptr.restore({"x": jnp.arange(6.0), "y": jnp.zeros(2)})
  assert isinstance(info.value.__cause__, ValueError)
