"""Orbax checkpointing: resumable training state and final model artifacts.

Two kinds of things are stored:
  * a run's state every K steps (`CheckpointManager`, keeps the last two), so
    an interrupted run resumes from its latest step and loses nothing;
  * a finished classifier (`save_classifier` / `load_classifier_arrays`): its
    parameters and non-trainable state as a plain Orbax pytree plus a JSON
    record of how to rebuild the model (never pickled classes).
Orbax needs absolute paths (relative ones fail from its background thread),
so every public function resolves its path first.

A stop (Ctrl-C, SIGTERM) never lands inside Orbax's own I/O: a signal
handler passes its exception to `raise_stop`, which holds it until the
checkpoint call under way returns (`stop_safe`). Raised inside Orbax (its
event loop, its executors) the exception left a half-started save that
printed tracebacks at exit or hung the exit.
"""

import contextlib
import functools
import json
import logging as std_logging
import os
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dsv_jax import checks
from dsv_jax.types import PyTree

# Depth of the checkpoint calls under way, and a stop held until they end.
_io_depth = [0]
_held_stop: list[BaseException] = []


def raise_stop(exc: BaseException) -> None:
  """Raises `exc` (a signal handler's stop) now, or, inside a checkpoint
  call, as soon as that call returns."""
  if _io_depth[0]:
    if not _held_stop:
      _held_stop.append(exc)
    return
  raise exc


@contextlib.contextmanager
def _stop_safe_section():
  _io_depth[0] += 1
  try:
    yield
  finally:
    _io_depth[0] -= 1
    if not _io_depth[0] and _held_stop:
      raise _held_stop.pop()


def stop_safe(fn):
  """Decorator: a stop (`raise_stop`) during `fn` waits until it returns."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with _stop_safe_section():
      return fn(*args, **kwargs)

  return wrapped


def abspath(path: str | os.PathLike) -> str:
  """A local `path` made absolute; a URI (``gs://...``) left as it is
  (`os.path.abspath` would make it ``<cwd>/gs:/...``)."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def _orbax_tree(tree: PyTree) -> PyTree:
  """`tree` as Orbax can save or restore it from every process.

  With several processes, an array on one process's own devices (e.g. a
  solver's host-side vectors put on device 0) makes Orbax raise "Cannot
  serialize host local jax.Array": such leaves go as numpy (every process
  holds the same values; Orbax writes them once). Global arrays, sharded
  over all processes' devices, stay: each process writes its own shards.
  Alone, the tree is left as it is.
  """
  if jax.process_count() == 1:
    return tree

  def one(leaf):
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
      return np.asarray(leaf)
    return leaf

  return jax.tree.map(one, tree)


class RunCheckpointer:
  """Periodic checkpoints of a run's state pytree with a JSON side record.

  Args:
    directory: where the numbered step folders go (created if missing).
    max_to_keep: how many of the latest steps to keep.
  """

  @stop_safe
  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
    self.directory = abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
    )
    self._last_saved: int | None = None

  @stop_safe
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  @stop_safe
  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Starts saving `state` at `step`; the writing goes on in the
    background while the run continues (Orbax copies the arrays to host
    memory first, so a donated buffer is safe to reuse).

    A save waits for the previous one, and `close` for the last: on an
    accelerator, waiting after every save would stall the device for the
    whole disk write. A process killed mid-write leaves an
    unfinished step that Orbax never lists, so a resume uses the one
    before.
    """
    if step in (self._last_saved, self._manager.latest_step()):
      return  # Already saved at this step (e.g. a final save after a periodic).
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_orbax_tree(state)),
        meta=ocp.args.JsonSave(meta),
      ),
    )
    # CheckpointManager.save returns False instead of raising when it skips.
    if not saved:
      raise RuntimeError(
        f"Orbax did not save step {step} in {self.directory} (existing "
        f"steps: {self._manager.all_steps()})."
      )
    self._last_saved = step

  @stop_safe
  def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
    """The JSON record saved with `step` (default: the newest step whose
    record reads), or None when there is none."""
    steps = [step] if step is not None else self._steps_newest_first()
    for s in steps:
      try:
        return self._manager.restore(
          s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
      except Exception:  # noqa: BLE001 -- a damaged step: try the next.
        if step is not None:
          raise
    return None

  def _steps_newest_first(self) -> list[int]:
    return sorted(self._manager.all_steps(), reverse=True)

  @stop_safe
  def restore(self, target: PyTree, step: int | None = None):
    """Restores `(step, state, meta)` into the structure of `target`.

    Without `step`, the newest step that restores cleanly: a damaged newer
    step (a file lost or truncated by a crash or a full disk) is named in
    one warning and deleted, so the run redoes it from the step before.
    Returns None when there is no checkpoint yet; raises a one-line
    ValueError, with Orbax's error as its cause, when no step restores into
    `target` (another structure, or every step damaged).

    A NamedTuple state that gained fields since the checkpoint was written
    still restores it: fields with a default (NamedTuple puts them last)
    that the checkpoint lacks keep `target`'s values (e.g.
    `dsv_jax.select.SolverState.converged`).
    """
    steps = [step] if step is not None else self._steps_newest_first()
    if not steps:
      return None
    # Before the first read: a damaged step's debris starts inside it.
    _quiet_failed_restore_aftermath()
    first_error = None
    for i, s in enumerate(steps):
      try:
        state, meta = self._restore_any_version(s, target)
      except Exception as e:  # noqa: BLE001 -- damaged or foreign: next.
        first_error = first_error or e
        continue
      if i:
        damaged = steps[:i]
        logging.warning(
          "Checkpoint step(s) %s in %s do not restore (%s); resuming from "
          "step %d and redoing the rest.",
          damaged,
          self.directory,
          checks.error_summary(first_error),
          s,
        )
        for bad in damaged:
          self._manager.delete(bad)
      return s, state, meta
    raise ValueError(
      f"No checkpoint step in {self.directory} restores into the state of "
      f"this run (steps {steps}: another config's, or damaged: "
      f"{checks.error_summary(first_error)}). Resume with the config that "
      "wrote it, or delete the directory to start over."
    ) from first_error

  def _restore_any_version(self, step: int, target: PyTree):
    try:
      return self._restore(step, target)
    except ValueError:
      older = self._restore_without_new_fields(step, target)
      if older is None:
        raise
      return older

  def _restore(self, step: int, target: PyTree) -> tuple[PyTree, Any]:
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_orbax_tree(target)),
        meta=ocp.args.JsonRestore(),
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

  @stop_safe
  def close(self) -> None:
    """Waits for the last save to reach the disk, then releases Orbax."""
    self._manager.close()

  # As a context manager, an interrupted run (an exception, Ctrl-C in a
  # notebook) still finishes writing the step it started saving.
  def __enter__(self) -> "RunCheckpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _from_failed_orbax_read(exc: BaseException | None) -> bool:
  """Whether `exc` is debris of an Orbax read that already failed."""
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True  # Tensorstore callbacks into the loop Orbax closed.
  tb = exc.__traceback__ if exc is not None else None
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _DropFailedReadDebris(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (
      "exception was never retrieved" in record.getMessage()
      and _from_failed_orbax_read(exc)
    )


_QUIETED = False


def _quiet_failed_restore_aftermath() -> None:
  """Silences what a failed Orbax restore leaves running (installed once).

  When one array of a damaged step fails to read, Orbax closes its event
  loop while tensorstore still completes the other reads; each completion
  raises "Event loop is closed" in a background thread, the pending
  futures are logged at garbage collection, and their coroutines warn at
  exit: 100-250 lines around the one error `RunCheckpointer.restore`
  reports (with the real cause). Only that debris is dropped: anything
  else still reaches the previous hooks.
  """
  global _QUIETED
  if _QUIETED:
    return
  _QUIETED = True
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _from_failed_orbax_read(unraisable.exc_value):
      previous(unraisable)

  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(_DropFailedReadDebris())
  warnings.filterwarnings(
    "ignore", r"coroutine '\w+\._get_array_metadatas' was never awaited"
  )


_META = "meta.json"
_ARRAYS = "arrays"


@stop_safe
def save_classifier(
  path: str | os.PathLike, arrays: PyTree, meta: dict[str, Any]
) -> None:
  """Writes a finished classifier: `arrays` (Orbax) + `meta` (JSON).

  Overwrites an existing classifier at `path`, so a re-run stage replaces
  its output instead of failing.
  """
  path = abspath(path)
  epath.Path(path).mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, _ARRAYS), _orbax_tree(arrays), force=True)
  if jax.process_index() == 0:  # One copy, not one per process.
    with epath.Path(path, _META).open("w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)


def load_classifier_meta(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the JSON record of a classifier saved by `save_classifier`."""
  path = abspath(path)
  meta_path = os.path.join(path, _META)
  if not epath.Path(meta_path).exists():
    raise FileNotFoundError(
      f"No classifier checkpoint at {path} (missing {_META}): {_RETRAIN}, "
      "or point to a directory written by "
      "dsv_jax.checkpoints.save_classifier."
    )
  return read_json(meta_path, "classifier record", _RETRAIN)


# What repairs a workdir's missing or damaged classifier (its checkpoints
# stand: the stage resumes from the last one).
_RETRAIN = (
  "run `--stage train` for this workdir (or `--stage all`, which redoes "
  "a damaged stage)"
)


def read_json(
  path: str, what: str, repair: str = "rerun the stage that wrote it"
) -> Any:
  """`json.load` of `path`; a damaged file raises a ValueError naming it
  and what repairs it (`repair`)."""
  try:
    with epath.Path(path).open() as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"The {what} {path} is damaged ({e}); {repair}.") from e


@stop_safe
def load_classifier_arrays(path: str | os.PathLike, target: PyTree) -> PyTree:
  """Restores a classifier's arrays into the structure of `target`.

  Raises a ValueError naming the mismatch when the stored arrays do not fit
  `target` (e.g. a checkpoint of another architecture or width).
  """
  path = abspath(path)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _orbax_tree(target))
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
  "abspath",
  "raise_stop",
  "read_json",
  "save_classifier",
  "stop_safe",
]
