"""The `interpolate` stage: soft-label interpolation from class a to b.

One real image of class a (a DSV of class a from the synthesize stage where
the data is not here) optimised towards ``(1 - delta) y_a + delta y_b`` for
a sweep of delta (the image recipe, `common.synthesis_recipe`). Writes
`interpolate/strip.png` and `interpolate/interpolate.npz`.
"""

import os

import jax
import ml_collections
import numpy as np
from etils import epath

from dsv_jax import checkpoints, distributed, models, synthesize, viz
from dsv_jax.experiment import common, stages
from dsv_jax.experiment import workdir as wd

NAME = "interpolate"
SECTIONS = ("seed", "data", "model", "train", "kkt", "synth", "interpolate")
UPSTREAM = ("train", "synthesize")
CKPT_DIRS = ()
# What a finished stage leaves (`workdir.output_problem`).
OUTPUTS = ("interpolate/interpolate.npz",)


def stage_hash(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`common.start_synthesis_hash` of its sections."""
  return common.start_synthesis_hash(config, workdir, SECTIONS)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Sweeps delta from class a to class b with soft targets (Sec. 5.2).

  Every delta in ``linspace(0, 1, num_deltas)`` gets a candidate with
  target ``(1 - delta) y_a + delta y_b``; all start from the same real
  image of class a. Writes `interpolate/strip.png` (titled with the source
  model's probability of class b) and `interpolate/interpolate.npz`.

  Returns:
    A dict with the probability of class b at each delta.
  """
  common.validate_config(config)
  config = common.synthesis_recipe(config, "real")
  workdir = checkpoints.abspath(workdir)
  digest = stage_hash(config, workdir)
  clf = common.classifier_for(config, workdir)
  info, it = clf.info, config.interpolate
  c = info.num_classes
  if not (0 <= it.class_a < c and 0 <= it.class_b < c):
    raise ValueError(
      f"Config key interpolate.class_a/class_b: must lie in [0, {c})."
    )
  key = jax.random.fold_in(jax.random.key(config.seed), 5)
  image, index, start = common.start_images(
    config,
    workdir,
    np.array([it.class_a], np.int32),
    jax.random.fold_in(key, 2),
  )
  deltas = np.linspace(0.0, 1.0, it.num_deltas).astype(np.float32)
  targets = np.asarray(
    synthesize.blend_targets(
      np.full(it.num_deltas, it.class_a),
      np.full(it.num_deltas, it.class_b),
      deltas,
      c,
    )
  )
  x0 = np.repeat(image, it.num_deltas, axis=0)
  x = common.synthesize_from(
    config, clf, key, x0, targets, steps=it.steps, name="interpolate"
  )
  probs = np.asarray(
    jax.nn.softmax(models.predict(clf.apply_fn, clf.params, x), -1)
  )
  out_dir = os.path.join(workdir, "interpolate")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  distributed.primary_only(viz.strip)(
    os.path.join(out_dir, "strip.png"),
    x,
    info,
    titles=[
      f"d={d:.2f} p_b={p:.2f}"
      for d, p in zip(deltas, probs[:, it.class_b], strict=True)
    ],
    title=(
      f"interpolation {info.class_names[it.class_a]} -> "
      f"{info.class_names[it.class_b]}"
    ),
  )
  wd.savez(
    os.path.join(out_dir, "interpolate.npz"),
    images=x,
    deltas=deltas,
    targets=targets,
    probs=probs,
    start_index=index,
    start=start,
  )
  results = {
    "deltas": deltas.tolist(),
    "prob_b": probs[:, it.class_b].tolist(),
    "prob_a": probs[:, it.class_a].tolist(),
    "steps": it.steps,
    "start": start,
  }
  wd.mark_done(workdir, "interpolate", digest, results)
  return results


__all__ = list(stages.FACE)
