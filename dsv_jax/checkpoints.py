"""Orbax checkpointing: resumable training state and final model artifacts.

Two kinds of things are stored:
  * a run's state every K steps (`CheckpointManager`, keeps the last two), so
    an interrupted run resumes from its latest step and loses nothing;
  * a finished classifier (`save_classifier` / `load_classifier_arrays`): its
    parameters and non-trainable state as a plain Orbax pytree plus a JSON
    record of how to rebuild the model (never pickled classes).
Orbax needs absolute paths (relative ones fail from its background thread),
so every public function resolves its path first.
"""

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv_jax import checks
from dsv_jax.types import PyTree


def _abs(path: str | os.PathLike) -> str:
  return os.path.abspath(os.fspath(path))


class RunCheckpointer:
  """Periodic checkpoints of a run's state pytree with a JSON side record.

  Args:
    directory: where the numbered step folders go (created if missing).
    max_to_keep: how many of the latest steps to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = _abs(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Saves `state` at `step` (blocking until it is on disk)."""
    if self._manager.latest_step() == step:
      return  # Already saved at this step (e.g. a final save after a periodic).
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
      ),
    )
    # CheckpointManager.save returns False instead of raising when it skips.
    if not saved:
      raise RuntimeError(
        f"Orbax did not save step {step} in {self.directory} (existing "
        f"steps: {self._manager.all_steps()})."
      )
    self._manager.wait_until_finished()

  def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
    """The JSON record saved with `step` (default: latest), or None."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(
      step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )
    return restored.meta

  def restore(self, target: PyTree, step: int | None = None):
    """Restores `(step, state, meta)` into the structure of `target`.

    Returns None when there is no checkpoint yet; raises a ValueError, with
    Orbax's error as its cause, when the stored state cannot be restored
    into `target` (another structure, or a damaged checkpoint).

    A NamedTuple state that gained fields since the checkpoint was written
    still restores it: fields with a default (NamedTuple puts them last)
    that the checkpoint lacks keep `target`'s values (e.g.
    `dsv_jax.select.SolverState.converged`).
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    try:
      state, meta = self._restore(step, target)
    except ValueError as e:
      older = self._restore_without_new_fields(step, target)
      if older is None:
        # Orbax's message lists whole arrays: one line of it here, all of
        # it in the chained cause.
        raise ValueError(
          f"The checkpoint at step {step} in {self.directory} does not match "
          f"the state of this run or is damaged ({checks.error_summary(e)}). "
          "Resume with the config that wrote it, or delete the directory to "
          "start over."
        ) from e
      state, meta = older
    return step, state, meta

  def _restore(self, step: int, target: PyTree) -> tuple[PyTree, Any]:
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
      ),
    )
    return restored.state, restored.meta

  def _restore_without_new_fields(self, step: int, target: PyTree):
    """`(state, meta)` of a checkpoint written before `target`'s type
    gained its trailing defaulted fields, or None."""
    cls = type(target)
    fields = getattr(cls, "_fields", None)
    defaults = getattr(cls, "_field_defaults", {})
    if not isinstance(target, tuple) or not fields:
      return None
    # NamedTuples are stored as {field: value}; try without the last k
    # defaulted fields, k = 1, 2, ...
    for k in range(1, len(fields) + 1):
      if fields[-k] not in defaults:
        return None
      kept = {f: getattr(target, f) for f in fields[:-k]}
      try:
        state, meta = self._restore(step, kept)
      except ValueError:
        continue
      missing = {f: getattr(target, f) for f in fields[-k:]}
      return cls(**state, **missing), meta
    return None

  def close(self) -> None:
    self._manager.close()


_META = "meta.json"
_ARRAYS = "arrays"


def save_classifier(
  path: str | os.PathLike, arrays: PyTree, meta: dict[str, Any]
) -> None:
  """Writes a finished classifier: `arrays` (Orbax) + `meta` (JSON).

  Overwrites an existing classifier at `path`, so a re-run stage replaces
  its output instead of failing.
  """
  path = _abs(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, _ARRAYS), arrays, force=True)
  with open(os.path.join(path, _META), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def load_classifier_meta(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the JSON record of a classifier saved by `save_classifier`."""
  path = _abs(path)
  meta_path = os.path.join(path, _META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
      f"No classifier checkpoint at {path} (missing {_META}). Run the "
      "`train` stage for this workdir first, or point to a directory "
      "written by dsv_jax.checkpoints.save_classifier."
    )
  with open(meta_path) as f:
    return json.load(f)


def load_classifier_arrays(path: str | os.PathLike, target: PyTree) -> PyTree:
  """Restores a classifier's arrays into the structure of `target`.

  Raises a ValueError naming the mismatch when the stored arrays do not fit
  `target` (e.g. a checkpoint of another architecture or width).
  """
  path = _abs(path)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(os.path.join(path, _ARRAYS), abstract)
    except (ValueError, KeyError) as e:
      raise ValueError(
        f"The classifier checkpoint at {path} does not match the model "
        f"built from its config ({checks.error_summary(e)})."
      ) from e


__all__ = [
  "RunCheckpointer",
  "load_classifier_arrays",
  "load_classifier_meta",
  "save_classifier",
]
