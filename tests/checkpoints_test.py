"""RunCheckpointer: errors keep Orbax's cause; older NamedTuple states load."""

import glob
import os
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import checkpoints


class _Old(NamedTuple):
  step: Any
  x: Any


class _New(NamedTuple):  # _Old after gaining a defaulted field.
  step: Any
  x: Any
  done: Any = np.array(False)


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


def test_namedtuple_that_gained_a_defaulted_field_restores_older_state(
  tmp_path,
):
  old = _saved(tmp_path / "old", _Old(jnp.int32(3), jnp.arange(4.0)))
  target = _New(jnp.int32(0), jnp.zeros(4), done=np.array(True))
  step, state, meta = old.restore(target)
  assert step == 3 and meta == {"note": "test"}
  assert isinstance(state, _New)
  np.testing.assert_array_equal(state.x, np.arange(4.0))
  assert bool(state.done)  # The target's value: the checkpoint has none.
  # A current checkpoint restores its own value of the field.
  new = _saved(tmp_path / "new", _New(jnp.int32(3), jnp.ones(4), jnp.bool_(1)))
  _, state, _ = new.restore(_New(jnp.int32(0), jnp.zeros(4)))
  assert bool(state.done) and isinstance(state, _New)
  # Other mismatches still fail. (A structural one: a shape mismatch fails
  # too, but leaves Orbax warning about an abandoned read coroutine.)
  with pytest.raises(ValueError, match="does not match"):
    old.restore(_New(jnp.int32(0), {"y": jnp.zeros(4)}))
