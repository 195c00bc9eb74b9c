"""The DSV set artifact: one schema for all DSVs.

A DSV set is written by synthesis and by selection alike, as
  * ``<dir>/dsv.npz``: readable with numpy alone (``np.load`` without
    pickles): every array of `DSVSet` plus the metadata, and
  * ``<dir>/dsv_orbax/``: the same arrays as an Orbax checkpoint (``source``
    stored as int32 codes into `SOURCES`) for JAX pipelines.

Arrays (N rows):
  images        float32[N, H, W, C]  in the dataset's normalised space
  targets       int32[N] or float32[N, C]  (soft targets)
  lambdas       float32[N]
  active        bool[N]      dual feasibility (False: disqualified)
  source        str[N]       one of SOURCES per row
  source_index  int32[N]     index into the source split, -1 where none
  confidence, entropy, margin  float32[N] under the source model
Metadata (npz keys, 0-d arrays, also as JSON in ``meta_json``):
  schema_version, dataset, mean, std (pixel normalisation), config_hash,
  plus any extra JSON-serialisable fields given to `save_dsv`.
"""

import json
import os
import zipfile
from typing import Any, NamedTuple

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dsv_jax import checkpoints, checks, distributed

SCHEMA_VERSION = 1
SOURCES = ("noise", "real", "other", "user", "train")
NPZ = "dsv.npz"
ORBAX = "dsv_orbax"
_FLOAT_ROWS = ("lambdas", "confidence", "entropy", "margin")


class DSVSet(NamedTuple):
  """A set of DSVs; see the module docstring for shapes and meanings."""

  images: np.ndarray
  targets: np.ndarray
  lambdas: np.ndarray
  active: np.ndarray
  source: np.ndarray
  source_index: np.ndarray
  confidence: np.ndarray
  entropy: np.ndarray
  margin: np.ndarray


def _canonical(dsv: DSVSet) -> DSVSet:
  """Converts to the schema's dtypes and checks shapes; raises ValueError."""
  images = checks.host_float32_images(dsv.images, "images")
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got {images.shape}.")
  n = images.shape[0]
  targets = np.asarray(dsv.targets)
  if targets.ndim == 1:
    if not np.issubdtype(targets.dtype, np.integer):
      raise ValueError(f"1-D targets must be integers, got {targets.dtype}.")
    targets = targets.astype(np.int32)
  elif targets.ndim == 2:
    targets = targets.astype(np.float32)
  else:
    raise ValueError(f"targets must be [N] or [N, C], got {targets.shape}.")
  source = np.asarray(dsv.source).astype(str)
  if source.ndim == 0:
    source = np.full(n, str(source))
  unknown = sorted(set(source.tolist()) - set(SOURCES))
  if unknown:
    raise ValueError(f"unknown source values {unknown}; expected {SOURCES}.")
  out = DSVSet(
    images=images,
    targets=targets,
    lambdas=np.asarray(dsv.lambdas, np.float32),
    active=np.asarray(dsv.active, bool),
    source=source.astype(f"<U{max(len(s) for s in SOURCES)}"),
    source_index=np.asarray(dsv.source_index, np.int32),
    confidence=np.asarray(dsv.confidence, np.float32),
    entropy=np.asarray(dsv.entropy, np.float32),
    margin=np.asarray(dsv.margin, np.float32),
  )
  for name, arr in out._asdict().items():
    if arr.shape[:1] != (n,):
      raise ValueError(f"{name} has {arr.shape[:1]} rows; images have {n}.")
    if name in ("lambdas", "active", "source", "source_index", *_FLOAT_ROWS):
      if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got {arr.shape}.")
  return out


@checkpoints.stop_safe
def save_dsv(
  directory: str | os.PathLike,
  dsv: DSVSet,
  *,
  dataset: str,
  mean: Any,
  std: Any,
  config_hash: str = "",
  extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes ``dsv.npz`` and the Orbax copy into ``directory``.

  Overwrites an existing set there (a re-run replaces its output).

  Args:
    directory: output folder (created).
    dsv: the set; converted to the schema's dtypes.
    dataset: dataset name (``DatasetInfo.name``).
    mean, std: the dataset's per-channel normalisation.
    config_hash: hash of the config that produced the set.
    extra: more JSON-serialisable metadata.

  Returns:
    The metadata dict written.
  """
  directory = checkpoints.abspath(directory)
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  dsv = _canonical(dsv)
  meta = {
    "schema_version": SCHEMA_VERSION,
    "dataset": str(dataset),
    "mean": [float(m) for m in np.ravel(mean)],
    "std": [float(s) for s in np.ravel(std)],
    "config_hash": str(config_hash),
    **(extra or {}),
  }
  meta_json = json.dumps(meta, sort_keys=True)
  # Several processes: the plain files are written once, by process 0;
  # every process takes part in the Orbax save.
  primary = distributed.is_primary()
  tmp = os.path.join(directory, NPZ + ".tmp.npz")
  if primary:
    with epath.Path(tmp).open("wb") as f:
      np.savez(
        f,
        **dsv._asdict(),
        schema_version=np.int32(SCHEMA_VERSION),
        dataset=np.array(meta["dataset"]),
        mean=np.asarray(meta["mean"], np.float32),
        std=np.asarray(meta["std"], np.float32),
        config_hash=np.array(meta["config_hash"]),
        meta_json=np.array(meta_json),
      )
    # Never half written (on gs:// the rename is a copy of a whole object).
    epath.Path(tmp).replace(os.path.join(directory, NPZ))
  arrays = dsv._asdict()
  arrays["source"] = np.array(
    [SOURCES.index(s) for s in dsv.source], np.int32
  ).reshape(dsv.source.shape)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, ORBAX), {"arrays": arrays}, force=True)
  if primary:
    epath.Path(directory, "dsv_meta.json").write_text(meta_json)
  return meta


@checkpoints.stop_safe
def load_dsv(
  path: str | os.PathLike, *, orbax: bool = False
) -> tuple[DSVSet, dict[str, Any]]:
  """Reads a DSV set written by `save_dsv`.

  Args:
    path: the directory, or the ``dsv.npz`` file itself.
    orbax: read the Orbax copy instead of the npz (same arrays).

  Returns:
    ``(dsv, meta)``.

  Raises:
    FileNotFoundError: nothing there.
    ValueError: a schema version this code does not know.
  """
  path = checkpoints.abspath(path)
  directory = os.path.dirname(path) if path.endswith(".npz") else path
  npz_path = os.path.join(directory, NPZ)
  # In a workdir the folder is named after the stage that wrote it.
  stage = os.path.basename(directory.rstrip("/"))
  repair = (
    f"run `--stage {stage}` for this workdir (or `--stage all`, which "
    "redoes a damaged stage)"
    if stage in ("select", "synthesize")
    else "run the synthesize or select stage that writes it"
  )
  if not epath.Path(npz_path).exists():
    raise FileNotFoundError(
      f"No DSV set at {directory} (missing {NPZ}); {repair}."
    )
  try:
    with (
      epath.Path(npz_path).open("rb") as f,
      np.load(f, allow_pickle=False) as z,
    ):
      meta = json.loads(str(z["meta_json"]))
      fields = {k: z[k] for k in DSVSet._fields}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(
      f"The DSV set {npz_path} is damaged ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}); {repair}."
    ) from e
  if meta.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(
      f"{npz_path} has schema version {meta.get('schema_version')}; this "
      f"code reads version {SCHEMA_VERSION}."
    )
  if orbax:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(os.path.join(directory, ORBAX))
    arrays = {k: np.asarray(v) for k, v in restored["arrays"].items()}
    arrays["source"] = np.array(
      [SOURCES[i] for i in arrays["source"]], fields["source"].dtype
    )
    fields = {k: arrays[k] for k in DSVSet._fields}
  return DSVSet(**fields), meta


__all__ = [
  "DSVSet",
  "NPZ",
  "ORBAX",
  "SCHEMA_VERSION",
  "SOURCES",
  "load_dsv",
  "save_dsv",
]
