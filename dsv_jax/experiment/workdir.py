"""A workdir's bookkeeping: stage records, the config hash, resume, the lock.

Every stage writes its outputs into one workdir and records its completion
in `stages/<stage>.json` (`mark_done`) with the hash of what it depended on
(`config_hash`):
  * the config sections the stage reads, minus keys that change only
    progress output (`PROGRESS_KEYS`) and options at the neutral value that
    reproduces the behaviour from before they existed (`NEUTRAL_DEFAULTS`);
  * the digests of its inputs: the upstream stages' records and the content
    of the classifier it inverts (`classifier_digest`; an external
    `--config.synth.classifier` included, so retraining it redoes the
    stages that used it);
  * the package version.
A stage finished under the same hash is current; one interrupted under
another hash is refused (`check_resumable`), never silently continued.

One process at a time owns a workdir (`lock`): a second run fails at once,
naming the holder.

A workdir may be a local path or a URI such as ``gs://bucket/run``: files
go through `etils.epath`, and paths are joined as strings (`os.path.join`
keeps a URI intact; `os.path.abspath` would not, see `checkpoints.abspath`).
"""

import contextlib
import datetime
import hashlib
import json
import math
import os
import socket
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

import dsv_jax
from dsv_jax import checkpoints, distributed

# Keys that change only progress output and checkpoint frequency, never a
# result: left out of the hashes, so changing them neither redoes a finished
# stage under `all` nor discards an interrupted stage's checkpoint.
PROGRESS_KEYS = ("log_every", "ckpt_every", "eval_every")

# Paths to a classifier: the hash takes its content instead
# (`classifier_digest`), so a workdir copied or moved elsewhere keeps its
# hashes and every finished stage and sub-run.
LOCATION_KEYS = (
  ("synth", "classifier"),
  ("select", "classifier"),
  ("model", "source_cache_dir"),
)

# Options added after runs existed, at the value that reproduces the
# behaviour from before them: left out of the hashes at that value, so a
# new option does not redo hours of finished stages that it cannot change.
NEUTRAL_DEFAULTS = {
  ("kkt", "norm_center"): "mean",
  # `common.synthesis_recipe` leaves these at their neutral values: the
  # hash of a synthesis depends on the recipe it runs, not the other init's.
  ("synth", "image_steps"): 0,
  ("synth", "image_lr_x"): 0.0,
  ("synth", "image_priors"): True,
  ("synth", "other_steps"): 0,
  ("synth", "other_lr_x"): 0.0,
  ("synth", "other_priors"): False,
  # Classifiers from elsewhere, class subsets, other sizes (issue 19).
  ("model", "source"): "train",
  ("data", "image_size"): 0,
  ("synth", "classes"): "",
  ("synth", "image_size"): 0,
  ("synth", "lowres_size"): 0,
  ("synth", "lowres_steps"): 0,
  ("edit", "pairs"): "",
  ("report", "candidate_counts"): (),
}


# How many devices a stage shards over: like the device count itself
# (num_devices 0 = every device), a layout and not a result (a checkpoint
# resumes on another, `synthesis_loop.run_synthesis_loop`). Hashed as 0,
# the default, so existing hashes stand and a run resumes on another mesh.
DEVICE_KEYS = (("synth", "num_devices"), ("select", "num_devices"))


def record_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, "stages", f"{stage}.json")


def stage_record(workdir: str, stage: str) -> dict[str, Any] | None:
  """The completion record of `stage` in `workdir`, or None if unfinished."""
  path = record_path(workdir, stage)
  if not epath.Path(path).exists():
    return None
  return checkpoints.read_json(
    path,
    f"record of stage {stage!r}",
    f"run `--stage {stage}` again (or `--stage all`, which redoes it)",
  )


@distributed.primary_only  # One copy, whatever the number of processes.
def write_json(path: str, obj: Any, **kw: Any) -> None:
  """Writes `obj` as JSON atomically (a reader never sees half a file)."""
  tmp = epath.Path(f"{path}.tmp{os.getpid()}")
  with tmp.open("w") as f:
    json.dump(obj, f, **kw)
  # On an object store (gs://) a rename is a copy and a delete; an object
  # appears whole when written, so a reader still never sees half a file.
  tmp.replace(path)


def mark_done(workdir: str, stage: str, digest: str, results: dict) -> None:
  """Records `stage` as finished under `digest` with its `results`.

  Process 0 writes the record; every process returns only once it exists
  (a later stage of the same run reads it).
  """
  if distributed.is_primary():
    epath.Path(workdir, "stages").mkdir(parents=True, exist_ok=True)
    record = {
      "config_hash": digest,
      "finished": time.time(),
      "results": results,
    }
    write_json(record_path(workdir, stage), record, indent=2, sort_keys=True)
  distributed.barrier(f"dsv_jax: stage {stage} recorded")


def output_problem(workdir: str, paths: Sequence[str]) -> str | None:
  """What is wrong with a finished stage's outputs `paths` (relative to
  `workdir`), or None when every one is there and loads.

  JSON files must parse and npz files read in full (every array: the zip's
  checksums catch a damaged member); other files must be there.
  """
  for rel in paths:
    path = epath.Path(workdir, rel)
    if not path.is_file():
      return f"{rel} is missing"
    try:
      if rel.endswith(".json") or rel.endswith("_METADATA"):
        with path.open() as f:
          json.load(f)
      elif rel.endswith(".npz"):
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
          for k in z.files:
            z[k]  # noqa: B018 -- reading is the check.
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      return f"{rel} does not load ({type(e).__name__})"
  return None


def relevant_sections(
  config: ml_collections.ConfigDict,
  sections: Sequence[str],
  exclude: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
  """The parts of `config` a hash covers (see the module docstring)."""
  d = config.to_dict()
  out = {}
  for k in sections:
    v = d.get(k)
    if isinstance(v, dict):
      v = {
        kk: 0 if (k, kk) in DEVICE_KEYS else vv
        for kk, vv in v.items()
        if kk not in PROGRESS_KEYS
        and (k, kk) not in exclude
        and (k, kk) not in LOCATION_KEYS
        and NEUTRAL_DEFAULTS.get((k, kk), object()) != vv
      }
    out[k] = v
  return out


def config_hash(
  config: ml_collections.ConfigDict,
  sections: Sequence[str],
  inputs: Mapping[str, str | None] | None = None,
  exclude: Sequence[tuple[str, str]] = (),
) -> str:
  """A short hash of `sections` of `config`, the `inputs` digests (upstream
  records, classifier content) and the package version."""
  blob = json.dumps(
    {
      "config": relevant_sections(config, sections, exclude),
      "inputs": dict(inputs or {}),
      "version": dsv_jax.__version__,
    },
    sort_keys=True,
    default=str,
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_digest(workdir: str, stage: str) -> str | None:
  """The hash `stage` finished under in `workdir` (None: not finished)."""
  record = stage_record(workdir, stage)
  return None if record is None else record["config_hash"]


def classifier_dir(path: str) -> str:
  """A workdir's `classifier/`, or `path` itself if it is one."""
  path = checkpoints.abspath(path)
  inner = os.path.join(path, "classifier")
  return inner if epath.Path(inner).is_dir() else path


# (directory, files' sizes and mtimes) -> digest: a report hashes the same
# classifier for every sub-run; reading it once per process is enough.
_CONTENT_DIGESTS: dict[tuple, str] = {}

# Results that say how a run went, not what it computed: wall times,
# speeds, where it resumed from, and what it saw on the way there (the last
# batch it trained on, the gradient where the finishing phase started: a
# resumed run sees other ones). A rerun changes them and nothing else.
_RUN_KEYS = (
  "resumed_from_step",
  "resumed_from_iteration",
  "num_devices",
  "train_accuracy_last_batch",
  "finish_rel_grad_before",
)
_RUN_SUFFIXES = ("time_s", "s_per_iter", "steps_per_s")


def stable_results(results: Mapping[str, Any]) -> dict[str, Any]:
  """`results` without the entries that say how the run went (timings,
  speeds, resume points): what identifies its output."""
  return {
    k: v
    for k, v in results.items()
    if k not in _RUN_KEYS and not k.endswith(_RUN_SUFFIXES)
  }


def classifier_digest(path: str) -> str | None:
  """A digest of the classifier at `path` (None: none there).

  A classifier of the `train` stage is identified by its record: the
  recipe's hash and its results (accuracies, losses, health of every
  split, functions of every weight), not its timings, so retraining it
  to the same weights changes no digest, and retraining to others does.
  Its Orbax files cannot serve: their names and metadata differ on every
  write. A classifier written otherwise (no results in its meta.json) is
  identified by the content of every file.
  """
  root = classifier_dir(path)
  if not epath.Path(root, "meta.json").is_file():
    return None
  files = []
  for dirpath, _, names in epath.Path(root).walk():
    for name in names:
      full = dirpath / name
      files.append((os.fspath(full.relative_to(root)), *_size_and_mtime(full)))
  files.sort()
  key = (root, tuple(files))
  if key not in _CONTENT_DIGESTS:
    meta = checkpoints.load_classifier_meta(root)
    h = hashlib.sha256()
    if isinstance(meta.get("results"), dict) and "config_hash" in meta:
      meta = {**meta, "results": stable_results(meta["results"])}
      h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    else:
      for rel, _, _ in files:
        h.update(rel.encode())
        with epath.Path(root, rel).open("rb") as f:
          for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _CONTENT_DIGESTS[key] = h.hexdigest()[:16]
  return _CONTENT_DIGESTS[key]


def _size_and_mtime(path: epath.Path) -> tuple[int, int]:
  # A remote store's stat (epath) has whole seconds: a same-size rewrite
  # within a second keeps the cached digest there, not on a local disk.
  if _is_remote(path):
    st = path.stat()
    return st.length, st.mtime
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def array_digest(*arrays: Any, extra: Any = None) -> str:
  """A short digest of arrays' bytes and a JSON-able `extra` (cache keys)."""
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(json.dumps(extra, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def check_resumable(ckptr: Any, ckpt_dir: str, digest: str, what: str) -> None:
  """Refuses to resume a checkpoint written under another hash."""
  meta = ckptr.read_meta()  # The newest step whose record reads.
  if meta is None:
    return
  if meta.get("config_hash") != digest:
    ckptr.close()
    raise ValueError(
      f"{ckpt_dir} holds an interrupted {what} run of a different config "
      f"(hash {meta.get('config_hash')}, this config {digest}). Resume it "
      "with its original config, use a fresh --workdir, or delete "
      f"{ckpt_dir} to start over."
    )


@contextlib.contextmanager
def resumable(
  ckpt_dir: str, digest: str, what: str
) -> Iterator[checkpoints.RunCheckpointer]:
  """The run checkpointer of ``ckpt_dir``, closed on exit; refused
  (`check_resumable`) when it holds a run of another config."""
  with checkpoints.RunCheckpointer(ckpt_dir) as ckptr:
    check_resumable(ckptr, ckpt_dir, digest, what)
    yield ckptr


def metrics_writer(path: str, ckptr: checkpoints.RunCheckpointer) -> Callable:
  """The `jsonl_writer` of a resumable loop: rows kept through the newest
  step of its checkpointer."""
  return jsonl_writer(path, keep_through_step=ckptr.latest_step() or 0)


def clear_checkpoints(workdir: str, names: Sequence[str]) -> None:
  if distributed.is_primary():
    for name in names:
      epath.Path(workdir, "ckpt", name).rmtree(missing_ok=True)
  # No process may open a checkpoint that is being deleted.
  distributed.barrier("dsv_jax: checkpoints cleared")


@distributed.primary_only  # One copy, whatever the number of processes.
def savez(path: str, **arrays: Any) -> None:
  """`np.savez` into `path`, local or remote (an open file: epath)."""
  with epath.Path(path).open("wb") as f:
    np.savez(f, **arrays)


def _json_safe(value: Any) -> Any:
  # JSON has no Infinity or NaN (json.dumps would write them anyway, and
  # strict readers reject the file): a non-finite metric becomes null.
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _write_rows(path: str, rows: list[dict]) -> None:
  with epath.Path(path).open("w") as f:
    f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)


def jsonl_writer(path: str, *, keep_through_step: int) -> Callable:
  """Appends rows to `path`, one row per step and kind.

  After a resume, the steps the interrupted run logged past its checkpoint
  are logged again. Rows past `keep_through_step` (the newest checkpoint
  step) are dropped at once, and the first row written drops the old rows
  from its own step on: a fallback past a damaged checkpoint resumes
  before `keep_through_step`, and only the resumed run knows from where.
  Non-finite values are written as null. With several processes only
  process 0 writes; the others get a writer that does nothing. An object
  store (gs://) cannot append: there every row rewrites the whole file.
  """
  if not distributed.is_primary():
    return lambda row: None
  rows = []
  if epath.Path(path).exists():
    with epath.Path(path).open() as f:
      rows = [r for r in map(json.loads, f) if r["step"] <= keep_through_step]
  _write_rows(path, rows)
  first = True
  remote = _is_remote(path)

  def write(row: dict) -> None:
    nonlocal first, rows
    row = {k: _json_safe(v) for k, v in row.items()}
    if first:
      rows = [r for r in rows if r["step"] < row["step"]]
      _write_rows(path, rows)
      first = False
    if remote:
      rows.append(row)
      _write_rows(path, rows)
      return
    with open(path, "a") as f:
      f.write(json.dumps(row, allow_nan=False) + "\n")

  return write


def _is_remote(path: str) -> bool:
  return "://" in os.fspath(path)


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds `workdir/.lock` while the block runs.

  A second process fails at once with the holder's pid, host and start
  time. A lock left by a dead process of this host (a killed run) is taken
  over; one from another host is never guessed about: the message says to
  remove it if that run is gone. On a remote workdir (gs://) the lock file
  holds the same record, but creating it is not atomic (two runs starting
  at the same moment can both take it), and a stale lock is only detected
  when the rerun is on the host that left it.

  In a multi-process run, process 0 holds the lock for all of them (the
  others are its peers, not competitors); the others start once it has.

  Raises:
    WorkdirLocked: another process holds the workdir.
  """
  if not distributed.is_primary():
    distributed.barrier("dsv_jax: workdir locked")
    yield
    return
  with _lock(workdir):
    distributed.barrier("dsv_jax: workdir locked")
    yield


@contextlib.contextmanager
def _lock(workdir: str) -> Iterator[None]:
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  host = socket.gethostname()
  me = {
    "pid": os.getpid(),
    "host": host,
    "started": datetime.datetime.now(datetime.UTC).isoformat(
      timespec="seconds"
    ),
  }
  while True:
    try:
      out = _create_exclusive(path)
    except FileExistsError:
      try:
        with epath.Path(path).open() as f:
          holder = json.load(f)
      except (OSError, ValueError):
        holder = {}
      if holder.get("host") == host and not _alive(int(holder.get("pid", 0))):
        # Left by a killed run of this machine.
        epath.Path(path).unlink(missing_ok=True)
        continue
      raise WorkdirLocked(
        f"{workdir} is in use by pid {holder.get('pid')} on "
        f"{holder.get('host')} since {holder.get('started')} UTC; wait for "
        f"it, use another --workdir, or delete {path} if that run is gone."
      ) from None
    with out:
      json.dump(me, out)
    break
  try:
    yield
  finally:
    epath.Path(path).unlink(missing_ok=True)


def _create_exclusive(path: str) -> Any:
  """`path` opened for writing if it did not exist; else FileExistsError."""
  if not _is_remote(path):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    return os.fdopen(fd, "w")
  # An object store has no exclusive create: check, then write.
  if epath.Path(path).exists():
    raise FileExistsError(path)
  return epath.Path(path).open("w")


__all__ = [
  "LOCATION_KEYS",
  "NEUTRAL_DEFAULTS",
  "PROGRESS_KEYS",
  "WorkdirLocked",
  "array_digest",
  "check_resumable",
  "classifier_digest",
  "classifier_dir",
  "clear_checkpoints",
  "config_hash",
  "jsonl_writer",
  "lock",
  "mark_done",
  "metrics_writer",
  "output_problem",
  "record_digest",
  "record_path",
  "relevant_sections",
  "resumable",
  "savez",
  "stable_results",
  "stage_record",
  "write_json",
]
