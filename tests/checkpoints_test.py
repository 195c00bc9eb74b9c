"""RunCheckpointer: errors keep Orbax's cause; a damaged newest step falls
back to the one before; older NamedTuple states load; damaged files are
named."""

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
  with pytest.raises(
    ValueError, match="No checkpoint step in .* damaged"
  ) as info:
    ckptr.restore(target)
  assert "\n" not in str(info.value)
  assert info.value.__cause__ is not None


def test_structure_mismatch_error_keeps_its_cause(tmp_path):
  ckptr = _saved(tmp_path / "ckpt", {"x": jnp.arange(6.0)})
  with pytest.raises(ValueError, match="another config's") as info:
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
  with pytest.raises(ValueError, match="another config.s"):
    old.restore(_New(jnp.int32(0), {"y": jnp.zeros(4)}))


def _truncate_step(directory, step):
  manifests = glob.glob(
    os.path.join(directory, str(step), "state", "**", "manifest.ocdbt"),
    recursive=True,
  )
  assert manifests
  for path in manifests:
    open(path, "wb").close()


def test_a_damaged_newest_step_falls_back_to_the_one_before(tmp_path, caplog):
  d = tmp_path / "ckpt"
  ckptr = checkpoints.RunCheckpointer(d)
  for step in (2, 4):
    ckptr.save(step, {"x": jnp.full(3, float(step))}, {"step": step})
  ckptr.close()
  _truncate_step(d, 4)
  ckptr = checkpoints.RunCheckpointer(d)
  assert ckptr.read_meta()["step"] == 4  # The record alone still reads.
  with caplog.at_level("WARNING"):
    step, state, meta = ckptr.restore({"x": jnp.zeros(3)})
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(state["x"], np.full(3, 2.0))
  warnings = [r for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "[4]" in warnings[0].getMessage()
  # The damaged step is gone, so the run saves it again.
  assert ckptr.latest_step() == 2
  ckptr.save(4, {"x": jnp.full(3, 4.0)}, {"step": 4})
  assert ckptr.restore({"x": jnp.zeros(3)})[0] == 4


def test_damaged_json_files_are_named(tmp_path):
  meta = tmp_path / "clf" / "meta.json"
  meta.parent.mkdir()
  meta.write_text('{"model": {"name": "convnet",')
  with pytest.raises(ValueError, match=f"{meta} is damaged"):
    checkpoints.load_classifier_meta(meta.parent)


def test_a_damaged_dsv_set_is_named(tmp_path):
  from dsv_jax import artifacts

  dsv = artifacts.DSVSet(
    images=np.zeros((2, 4, 4, 1), np.float32),
    targets=np.array([0, 1], np.int32),
    lambdas=np.ones(2, np.float32),
    active=np.ones(2, bool),
    source=np.array(["noise", "noise"]),
    source_index=np.full(2, -1, np.int32),
    confidence=np.ones(2, np.float32),
    entropy=np.zeros(2, np.float32),
    margin=np.ones(2, np.float32),
  )
  artifacts.save_dsv(tmp_path, dsv, dataset="digits", mean=[0.0], std=[1.0])
  path = tmp_path / artifacts.NPZ
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match=f"The DSV set {path} is damaged"):
    artifacts.load_dsv(tmp_path)


def test_saves_run_in_the_background_until_close(tmp_path, monkeypatch):
  # Waiting after each save would stall an accelerator for every disk
  # write: only Orbax's own save waits (for the save before it), and close
  # for the last.
  ckptr = checkpoints.RunCheckpointer(tmp_path / "ckpt")
  manager = ckptr._manager
  waits_after_save = []
  save, wait = manager.save, manager.wait_until_finished
  returned = [False]

  def tracked_save(*args, **kwargs):
    returned[0] = False
    out = save(*args, **kwargs)
    returned[0] = True
    return out

  def tracked_wait():
    waits_after_save.append(returned[0])
    return wait()

  monkeypatch.setattr(manager, "save", tracked_save)
  monkeypatch.setattr(manager, "wait_until_finished", tracked_wait)
  for step in (1, 2):
    ckptr.save(step, {"x": jnp.full(3, float(step))}, {"step": step})
  ckptr.save(2, {"x": jnp.full(3, 9.0)}, {"step": 2})  # Already saved: no-op.
  assert not any(waits_after_save)
  ckptr.close()
  reread = checkpoints.RunCheckpointer(tmp_path / "ckpt")
  for step in (1, 2):
    restored_step, state, meta = reread.restore({"x": jnp.zeros(3)}, step)
    assert restored_step == step and meta == {"step": step}
    np.testing.assert_array_equal(state["x"], np.full(3, float(step)))


class _Stop(BaseException):
  pass


def test_a_stop_during_a_checkpoint_call_waits_until_it_returns(tmp_path):
  done = []

  @checkpoints.stop_safe
  def save_like():
    checkpoints.raise_stop(_Stop())  # As a signal handler would, mid-I/O.
    done.append("inner")
    nested()  # A nested call does not release the held stop.
    done.append("after nested")

  @checkpoints.stop_safe
  def nested():
    done.append("nested")

  with pytest.raises(_Stop):
    save_like()
  assert done == ["inner", "nested", "after nested"]
  # Outside any checkpoint call a stop is raised at once, and none is left
  # held for the next call.
  with pytest.raises(_Stop):
    checkpoints.raise_stop(_Stop())
  nested()
  assert done[-1] == "nested"


def test_a_real_save_interrupted_by_a_stop_completes_and_restores(tmp_path):
  state = {"w": np.arange(4.0, dtype=np.float32)}
  ckptr = checkpoints.RunCheckpointer(tmp_path / "ckpt")
  try:
    real_save = ckptr._manager.save

    def save_then_signal(*args, **kwargs):
      checkpoints.raise_stop(_Stop())
      return real_save(*args, **kwargs)

    ckptr._manager.save = save_then_signal
    with pytest.raises(_Stop):
      ckptr.save(3, state, {"note": "x"})
  finally:
    ckptr.close()
  with checkpoints.RunCheckpointer(tmp_path / "ckpt") as again:
    step, restored, meta = again.restore(state)
  assert step == 3 and meta == {"note": "x"}
  np.testing.assert_array_equal(restored["w"], state["w"])
