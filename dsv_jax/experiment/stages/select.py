"""The `select` stage: DSVs selected from the classifier's training set.

`run(config, workdir)` fits lambda over every training sample with
`select.fit_lambdas` (resuming from `ckpt/select`), ranks the samples per
class by their contribution and writes into `workdir/select/`:

  lambdas.npz    lambda, score, rankable and ||p - y|| of every training
                 sample (scores are 0 where not rankable), its
                 label, and the per-class ranking (`order`: indices sorted
                 by class, then by score; `class_start`: where each class
                 begins in `order`; `rank_in_class` per sample)
  dsv.npz, dsv_orbax/  the top `num_per_class` per class as a DSV set
                 (source "train", source_index = training
                 index)
  grid.png       the top selected images, one row per class
  metrics.jsonl  one row per logged solver iteration

and records per-class sums of lambda and of the contribution, and the mean
entropy and margin of the selected samples against random samples of the
same class (the paper's "closer to the boundary" claim) in
`stages/select.json`.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dsv_jax import (
  checkpoints,
  checks,
  distributed,
  parallel,
  select,
  synthesize,
  viz,
)
from dsv_jax.experiment import common, sources, stages
from dsv_jax.experiment import workdir as wd

NAME = "select"
SECTIONS = ("seed", "data", "model", "train", "select")
UPSTREAM = ("train",)
CKPT_DIRS = ("select",)
# What a finished stage leaves (`workdir.output_problem`).
OUTPUTS = ("select/lambdas.npz", "select/dsv.npz")
# A fit extends: raising select.max_iters resumes a finished, unconverged
# fit from its last checkpoint instead of redoing it (`is_current`).
_EXTENDABLE = (("select", "max_iters"),)


def stage_hash(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The hash the stage records: its sections but max_iters, and the
  classifier it selects for."""
  return wd.config_hash(
    config,
    SECTIONS,
    {"classifier": sources.classifier_digest(config, workdir, "select")},
    exclude=_EXTENDABLE,
  )


def is_current(record: dict, config: ml_collections.ConfigDict) -> bool:
  """A finished fit serves `config` unless it stopped unconverged before
  `select.max_iters` (then `all` resumes it to the new budget)."""
  res = record["results"]
  return bool(res.get("converged")) or (
    res.get("iterations", 0) >= config.select.max_iters
  )


def validate_select_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the key, on select values no run could use."""
  if "select" not in config:
    raise ValueError("Config key select: missing section.")
  s = config.select

  def need(cond: bool, key: str, msg: str) -> None:
    if not cond:
      raise ValueError(f"Config key select.{key}: {msg}")

  need(
    s.distance in select.DISTANCES, "distance", f"not in {select.DISTANCES}."
  )
  need(s.init in select.INITS, "init", f"not in {select.INITS}.")
  need(s.wrt in select.WRT, "wrt", f"not in {select.WRT}.")
  need(s.score in select.SCORES, "score", f"not in {select.SCORES}.")
  need(s.slackness >= 0, "slackness", "must be >= 0.")
  need(
    not (s.distance == "cosine" and s.slackness > 0),
    "slackness",
    "must be 0 with distance 'cosine' (scale-invariant: unbounded).",
  )
  for key in ("num_per_class", "chunk_size", "log_every"):
    need(s[key] >= 1, key, "must be >= 1.")
  for key in ("max_iters", "num_random_per_class", "ckpt_every", "num_devices"):
    need(s[key] >= 0, key, "must be >= 0.")
  need(s.tol >= 0, "tol", "must be >= 0.")
  need(s.l1_smoothing > 0, "l1_smoothing", "must be > 0.")


def _check_class_counts(labels: np.ndarray, num_classes: int, k: int) -> None:
  counts = np.bincount(labels, minlength=num_classes)
  for c, count in enumerate(counts):
    if count == 0:
      raise ValueError(
        f"class {c} has no training samples: nothing to select from."
      )
  checks.check_class_sizes(
    counts,
    k,
    "per class to select or draw (select.num_per_class, "
    "select.num_random_per_class)",
    what="training samples",
  )


def _ranking(scores: np.ndarray, labels: np.ndarray, num_classes: int):
  """(order, class_start, rank_in_class) of the per-class ranking."""
  per_class = select.rank_per_class(scores, labels, num_classes)
  order = np.concatenate(per_class).astype(np.int32)
  class_start = np.cumsum([0] + [len(i) for i in per_class]).astype(np.int32)
  rank = np.empty(len(labels), np.int32)
  for idx in per_class:
    rank[idx] = np.arange(len(idx))
  return order, class_start, rank


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Selects DSVs from the training set.

  Uses the classifier of the `train` stage in `workdir` (or the path in
  `config.select.classifier`) and the training split of `config.data`;
  resumes an interrupted fit from `ckpt/select`.

  Returns:
    A dict with the fit's residual, iterations and timing, the per-class
    sums of lambda and contribution, and the mean entropy and margin of the
    selected samples against random ones of the same classes.

  Raises:
    ValueError: a bad `select` config value, a class with no or too few
      training samples, a classifier of another dataset, or a checkpoint of
      another config.
  """
  common.validate_config(config)
  validate_select_config(config)
  s = config.select
  workdir = checkpoints.abspath(workdir)
  digest = stage_hash(config, workdir)
  ds = common.try_load_data(config)
  if ds is None:
    return common.skipped(
      NAME, f"selection needs the {config.data.name} training set, not here."
    )
  clf = common.classifier_for(config, workdir, "select")
  info = clf.info
  if ds.info.name != info.name or ds.info.num_classes != info.num_classes:
    raise ValueError(
      f"The classifier was trained on {info.name!r} ({info.num_classes} "
      f"classes) but config.data names {ds.info.name!r}."
    )
  x, labels = ds.train["image"], np.asarray(ds.train["label"], np.int32)
  n, c = len(labels), info.num_classes
  _check_class_counts(labels, c, max(s.num_per_class, s.num_random_per_class))

  mesh = parallel.make_mesh(s.num_devices or None)
  out_dir = os.path.join(workdir, "select")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  lambdas, fit, represented, resumed = _fit(
    s, clf, x, labels, mesh, workdir, out_dir, digest
  )
  scores = select.scores(
    lambdas, fit.weights, score=s.score, rankable=fit.rankable
  )
  uniform_rep, uniform_all = _uniform_residuals(
    config, clf, x, labels, represented, mesh
  )
  logging.info(
    "Stationarity residual ||theta + G lambda|| / ||theta||: fitted %.4g "
    "(represented part), %.4g (all of theta); uniform lambda = 1/(N wd): "
    "%.4g / %.4g.",
    fit.residual,
    fit.residual_all,
    uniform_rep,
    uniform_all,
  )
  desc = _save_selection(
    config, clf, x, labels, lambdas, scores, fit, out_dir, digest
  )
  stats = {"selected": desc}
  if s.num_random_per_class:
    key = jax.random.fold_in(jax.random.key(config.seed), 6)
    rand = select.random_per_class(key, labels, c, s.num_random_per_class)
    stats["random"] = jax.tree.map(
      np.asarray,
      synthesize.describe(clf.apply_fn, clf.params, x[rand], labels[rand]),
    )
  this_run = [r["s_per_iter"] for r in fit.history]
  results = {
    "num_train": n,
    "residual": fit.residual,
    "residual_all": fit.residual_all,
    "residual_uniform": uniform_rep,
    "residual_uniform_all": uniform_all,
    "excluded_leaves": list(represented.groups),
    "excluded_share": represented.excluded_share,
    "distance": fit.distance,
    "objective": fit.objective,
    "iterations": fit.iterations,
    "converged": fit.converged,
    "capped_pushing_away": fit.capped,
    "rankable": int(fit.rankable.sum()),
    "resumed_from_iteration": resumed,
    "select_time_s": fit.time_s,
    "s_per_iter": float(np.median(this_run)) if this_run else None,
    "num_devices": parallel.num_shards(mesh),
    "lambda_sum_per_class": select.per_class_sums(lambdas, labels, c).tolist(),
    "contribution_sum_per_class": select.per_class_sums(
      lambdas * fit.weights, labels, c
    ).tolist(),
    "nonzero_lambdas": int(np.count_nonzero(lambdas)),
  }
  for name, d in stats.items():
    for key in ("entropy", "margin", "confidence"):
      results[f"{name}_{key}_mean"] = float(np.mean(d[key]))
  logging.info("Selection done: %s", json.dumps(results))
  wd.mark_done(workdir, "select", digest, results)
  return results


def _fit(s, clf, x, labels, mesh, workdir, out_dir, digest):
  """The checkpointed lambda fit: ``(lambdas, FitInfo, Represented,
  iteration resumed from)``."""
  n = len(labels)
  ckpt_dir = os.path.join(workdir, "ckpt", "select")
  with wd.resumable(ckpt_dir, digest, "selection") as ckptr:
    write_row = wd.metrics_writer(os.path.join(out_dir, "metrics.jsonl"), ckptr)
    logging.info(
      "Selecting from %d training samples (%s, slackness %g, chunk %d) on %d "
      "device(s).",
      n,
      s.distance,
      s.slackness,
      s.chunk_size,
      parallel.num_shards(mesh),
    )

    def on_metrics(row):
      logging.info(
        "select iteration %d/%d: residual %.4g, objective %.6g, "
        "contribution %.4g, nonzero %d, %.2f s/iter",
        row["step"],
        s.max_iters,
        row["residual"],
        row["objective"],
        row["contribution"],
        row["nonzero"],
        row["s_per_iter"],
      )
      write_row(row)

    represented = select.resolve_wrt(s.wrt, clf.apply_fn, clf.params, x, labels)
    logging.info(
      "Representing %s; excluded (no lambda can represent them): %s, %.1f%% "
      "of ||theta||^2.",
      "every leaf" if not represented.excluded else "the other leaves",
      list(represented.groups) or "none",
      100 * represented.excluded_share,
    )
    # Each process streams only its own rows (all of them with one).
    rows = select.process_rows(n, chunk_size=s.chunk_size, mesh=mesh)
    several = jax.process_count() > 1
    lambdas, fit = select.fit_lambdas(
      clf.apply_fn,
      clf.params,
      x[rows] if several else x,
      labels[rows] if several else labels,
      num_samples=n,
      wrt=represented.mask,
      distance=s.distance,
      slackness=s.slackness,
      init=s.init,
      max_iters=s.max_iters,
      tol=s.tol,
      chunk_size=s.chunk_size,
      l1_smoothing=s.l1_smoothing,
      mesh=mesh,
      on_metrics=on_metrics,
      log_every=s.log_every,
      checkpointer=ckptr,
      ckpt_every=s.ckpt_every,
      ckpt_meta={"config_hash": digest},
    )
  # The iterations before this call's: those of the resumed checkpoint.
  resumed = fit.iterations - len(fit.history)
  return lambdas, fit, represented, resumed


def _uniform_residuals(config, clf, x, labels, represented, mesh):
  """The anchor: the uniform lambda = 1 / (N wd) is exact at a stationary
  point of the classifier's training objective. NaN without decay."""
  n, s = len(labels), config.select
  decay = clf.meta.get("train", {}).get(
    "weight_decay", config.train.weight_decay
  )
  if decay <= 0:
    return float("nan"), float("nan")
  return select.stationarity_residuals(
    clf.apply_fn,
    clf.params,
    x,
    labels,
    np.full(n, 1.0 / (n * decay), np.float32),
    mask=represented.mask,
    chunk_size=s.chunk_size,
    mesh=mesh,
  )


def _save_selection(
  config, clf, x, labels, lambdas, scores, fit, out_dir, digest
):
  """Writes lambdas.npz, the DSV set of the top samples and its grid;
  the selected samples' description."""
  s, info = config.select, clf.info
  c = info.num_classes
  order, class_start, rank = _ranking(scores, labels, c)
  wd.savez(
    os.path.join(out_dir, "lambdas.npz"),
    lambdas=lambdas,
    scores=scores,
    rankable=fit.rankable,
    weights=fit.weights,
    labels=labels,
    order=order,
    class_start=class_start,
    rank_in_class=rank,
  )
  top = select.top_per_class(scores, labels, c, s.num_per_class)
  desc = common.save_described_dsv(
    out_dir,
    clf,
    images=x[top],
    targets=labels[top],
    lambdas=lambdas[top],
    source="train",
    source_index=top.astype(np.int32),
    config_hash=digest,
    extra={
      "seed": config.seed,
      "distance": s.distance,
      "slackness": s.slackness,
      "score": s.score,
      "residual": fit.residual,
      "iterations": fit.iterations,
    },
  )
  distributed.primary_only(viz.class_grid)(
    os.path.join(out_dir, "grid.png"),
    x[top],
    labels[top],
    info,
    max_per_class=min(s.num_per_class, 10),
    title=f"selected DSVs (top {s.score} per class, {s.distance})",
  )
  return desc


__all__ = [*stages.FACE, "is_current", "validate_select_config"]
