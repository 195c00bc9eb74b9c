"""The `edit` stage: one real image per class edited towards another class.

The synthesis objective with hard targets of class ``(c + edit.shift) % C``
(or the pairs of `edit.pairs`: slug -> head cabbage) from real images, or
from the synthesize stage's DSVs where the data is not here (the image
recipe, `common.synthesis_recipe`). Writes `edit/strip.png` and
`edit/edit.npz`.
"""

import os

import jax
import ml_collections
import numpy as np
from etils import epath

from dsv_jax import checkpoints, distributed, models, viz
from dsv_jax.experiment import common, stages
from dsv_jax.experiment import workdir as wd

NAME = "edit"
SECTIONS = ("seed", "data", "model", "train", "kkt", "synth", "edit")
UPSTREAM = ("train", "synthesize")
CKPT_DIRS = ()
# What a finished stage leaves (`workdir.output_problem`).
OUTPUTS = ("edit/edit.npz",)


def stage_hash(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`common.start_synthesis_hash` of its sections."""
  return common.start_synthesis_hash(config, workdir, SECTIONS)


def _pairs(spec: str, info) -> tuple[np.ndarray, np.ndarray]:
  """(sources, targets) of `edit.pairs`, "a->b, c->d"."""
  pairs = [p.split("->") for p in spec.split(",") if p.strip()]
  if any(len(p) != 2 for p in pairs):
    raise ValueError(
      f"Config key edit.pairs: {spec!r} is not a list of 'source->target'."
    )
  src, dst = zip(*pairs, strict=True)
  return (
    common.resolve_classes(",".join(src), info, "edit.pairs"),
    common.resolve_classes(",".join(dst), info, "edit.pairs"),
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Edits one image per class towards class ``(c + shift) % C``.

  Writes `edit/strip.png` (each original beside its edit, titled with the
  source model's prediction) and `edit/edit.npz`.

  Returns:
    A dict with the fraction of edits the source model classifies as the
    requested target.
  """
  common.validate_config(config)
  config = common.synthesis_recipe(config, "real")
  workdir = checkpoints.abspath(workdir)
  digest = stage_hash(config, workdir)
  clf = common.classifier_for(config, workdir)
  info, ed = clf.info, config.edit
  c = info.num_classes
  key = jax.random.fold_in(jax.random.key(config.seed), 4)
  if ed.pairs:
    src, new = _pairs(ed.pairs, info)
  else:
    src = common.resolve_classes(config.synth.classes, info, "synth.classes")
    new = ((src + ed.shift) % c).astype(np.int32)
  images, index, start = common.start_images(
    config, workdir, src, jax.random.fold_in(key, 2)
  )
  edited = common.synthesize_from(
    config, clf, key, images, new, steps=ed.steps, name="edit"
  )
  n = len(edited)
  pred_before = models.predict(clf.apply_fn, clf.params, images).argmax(-1)
  pred_after = models.predict(clf.apply_fn, clf.params, edited).argmax(-1)
  out_dir = os.path.join(workdir, "edit")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  both = np.stack([images, edited], 1).reshape(-1, *images.shape[1:])
  names = info.class_names
  titles = []
  for i in range(n):
    titles += [f"{names[pred_before[i]]}", f"->{names[pred_after[i]]}"]
  distributed.primary_only(viz.strip)(
    os.path.join(out_dir, "strip.png"),
    both,
    info,
    titles=titles,
    title=(
      f"editing {'real images' if start == 'real' else 'DSVs'}: "
      f"{ed.pairs.replace(',', ', ') if ed.pairs else f'c -> c+{ed.shift}'}"
      " (source-model predictions)"
    ),
  )
  wd.savez(
    os.path.join(out_dir, "edit.npz"),
    original=images,
    edited=edited,
    source_index=index,
    start=start,
    original_label=src,
    target=new,
    prediction=pred_after,
  )
  results = {
    "num_edits": n,
    "start": start,
    "steps": ed.steps,
    "target_reached": float(np.mean(pred_after == new)),
  }
  wd.mark_done(workdir, "edit", digest, results)
  return results


__all__ = list(stages.FACE)
