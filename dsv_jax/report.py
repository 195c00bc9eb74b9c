"""The paper's experiments (METHOD.md section 5) as one report.

`run_report(config, workdir)` is the `report` stage: it reads what the
earlier stages wrote into `workdir` (classifier, selection, DSV set, edit and
interpolation strips), runs the extra sub-experiments a table needs in
`workdir/report/runs/<name>/` (each a resumable stage of its own, skipped when
already finished with the same config) and writes `workdir/report/report.md`
with its figures. Every section is a function of its own, importable from a
notebook.

Fairness rules, enforced by construction:
  * every retraining row uses the same recipe (`config.retrain`: the
    classifier's architecture, steps, augmentation, learning rate) and the
    same seeds; only the training images differ;
  * hard labels everywhere (soft targets only where a row says so);
  * the report evaluates on the test split only; settings are chosen on the
    validation split beforehand and fixed in the config.
"""

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from absl import logging

from dsv_jax import (
  artifacts,
  data,
  pipelines,
  retrain_stage,
  select,
  synthesize,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

ZERO_SHOT_INITS = ("noise", "other")


# ----------------------------------------------------------------------------
# Sub-experiments: runs of existing stages in their own sub-workdirs.


def _sub_config(
  config: ml_collections.ConfigDict, workdir: str, **overrides: Any
) -> ml_collections.ConfigDict:
  """A copy of `config` whose synthesis inverts `workdir`'s classifier.

  `overrides` are dotted keys (`"synth.init"`) with their values.
  """
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.synth.classifier = workdir
  for key, value in overrides.items():
    section, field = key.split(".")
    sub[section][field] = value
  return sub


def _run_stage_once(
  runner: Callable[[ml_collections.ConfigDict, str], dict],
  config: ml_collections.ConfigDict,
  sub_workdir: str,
  stage: str,
) -> dict:
  """Runs `stage` in `sub_workdir` unless it already finished there.

  A finished record with another config hash is redone (its checkpoints
  removed); an unfinished one resumes from its checkpoints.
  """
  record = pipelines.stage_record(sub_workdir, stage)
  digest = pipelines.config_hash(config, stage)
  if record is not None and record["config_hash"] == digest:
    return record["results"]
  if record is not None:
    shutil.rmtree(os.path.join(sub_workdir, "ckpt", stage), ignore_errors=True)
  os.makedirs(sub_workdir, exist_ok=True)
  logging.info("Report: running %s in %s.", stage, sub_workdir)
  return runner(config, sub_workdir)


def synth_run(
  config: ml_collections.ConfigDict,
  workdir: str,
  name: str,
  **overrides: Any,
) -> tuple[artifacts.DSVSet, dict, str]:
  """A synthesis sub-run `report/runs/<name>`; returns (dsv, results, dir).

  When the sub-run's settings are exactly those of the workdir's own
  finished `synthesize` stage, that stage's output is used instead of
  synthesising the same set twice.
  """
  steps = config.report.synth_steps or config.synth.steps
  sub = _sub_config(config, workdir, **{"synth.steps": steps, **overrides})
  main = _sub_config(config, workdir)
  record = pipelines.stage_record(workdir, "synthesize")
  if (
    record is not None
    and record["config_hash"] == pipelines.config_hash(config, "synthesize")
    and pipelines.config_hash(sub, "synthesize")
    == pipelines.config_hash(main, "synthesize")
  ):
    dsv, _ = artifacts.load_dsv(os.path.join(workdir, "synthesize"))
    return dsv, record["results"], workdir
  sub_dir = os.path.join(workdir, "report", "runs", name)
  results = _run_stage_once(
    pipelines.run_synthesize, sub, sub_dir, "synthesize"
  )
  dsv, _ = artifacts.load_dsv(os.path.join(sub_dir, "synthesize"))
  return dsv, results, sub_dir


def shot_run(
  config: ml_collections.ConfigDict, workdir: str, init: str, k: int
) -> tuple[artifacts.DSVSet, dict, str]:
  """`synth_run` of k candidates per class from `init`, named `<init>_k<k>`.

  The few-shot, boundary and ablation sections share these sub-runs.
  """
  return synth_run(
    config,
    workdir,
    f"{init}_k{k}",
    **{"synth.init": init, "synth.num_per_class": k},
  )


def baseline_run(
  config: ml_collections.ConfigDict, workdir: str, name: str, k: int
) -> artifacts.DSVSet:
  """The KKT-reconstruction baseline (`dsv_jax.baseline`) from k real shots."""
  from dsv_jax import baseline

  sub = _sub_config(
    config, workdir, **{"synth.init": "real", "synth.num_per_class": k}
  )
  out_dir = os.path.join(workdir, "report", "runs", name)
  digest = pipelines.config_hash(sub, "report")
  marker = os.path.join(out_dir, "done.json")
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f).get("config_hash") == digest:
        return artifacts.load_dsv(out_dir)[0]
  os.makedirs(out_dir, exist_ok=True)
  # The sub-run folder is its workdir (checkpoints); synth.classifier
  # points at the main workdir's classifier.
  results = baseline.run_baseline(sub, out_dir, out_dir)
  with open(marker, "w") as f:
    json.dump({"config_hash": digest, "results": results}, f, default=float)
  return artifacts.load_dsv(out_dir)[0]


def independent_classifier(
  config: ml_collections.ConfigDict, workdir: str
) -> pipelines.Classifier:
  """A second classifier of the same recipe, another seed (for agreement)."""
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.seed = config.seed + config.report.independent_seed_offset
  sub_dir = os.path.join(workdir, "report", "runs", "independent")
  _run_stage_once(pipelines.run_train, sub, sub_dir, "train")
  return pipelines.load_classifier(sub_dir)


# ----------------------------------------------------------------------------
# Retraining rows (cached so an interrupted report loses nothing).


def _digest(*arrays: np.ndarray, extra: Any = None) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(json.dumps(extra, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


class RetrainRows:
  """Retrains fresh models on image sets with one fixed recipe.

  Results are cached in `report/retrain_rows.json` by a digest of the
  images, labels and recipe, so a resumed report never retrains a row twice.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    clf: pipelines.Classifier,
    ds: data.Dataset,
  ):
    self.config, self.clf, self.ds = config, clf, ds
    self.path = os.path.join(workdir, "report", "retrain_rows.json")
    self.cache = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.cache = json.load(f)

  def __call__(self, name: str, images: np.ndarray, labels: np.ndarray) -> dict:
    recipe = self.config.retrain.to_dict()
    key = _digest(
      images, labels, extra={"recipe": recipe, "seed": self.config.seed}
    )
    if key in self.cache:
      return self.cache[key]
    logging.info("Report: retraining on %s (%d images).", name, len(images))
    # The report evaluates on the test split whatever retrain.eval_split
    # (the split the recipe was tuned on) says.
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.retrain.eval_split = "test"
    row = retrain_stage.retrain_sets(
      config, self.clf, self.ds, {name: (images, labels)}
    )[name]
    row["name"] = name
    self.cache[key] = row
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.cache, f, indent=1)
    os.replace(tmp, self.path)
    return row


def _pct(row: dict | None) -> str:
  if row is None:
    return "-"
  return f"{100 * row['mean']:.2f} +- {100 * row['std']:.2f}"


def _active_hard(dsv: artifacts.DSVSet) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(synthesize.target_labels(dsv.targets))
  return dsv.images[dsv.active], labels[dsv.active]


# ----------------------------------------------------------------------------
# Sections. Each returns (markdown, results).


def few_shot_section(config, workdir, rows: RetrainRows) -> tuple[str, dict]:
  """Table 2 analogue: DSVs from k real shots / 0 shots vs k real images."""
  ds, rc = rows.ds, config.report
  zero = rc.zero_shot_init
  results, lines = {}, []
  lines.append(
    "| img/cls | real seen/cls | method | test accuracy % (mean +- std over "
    f"{config.retrain.num_models} seeds) |"
  )
  lines.append("|---|---|---|---|")
  for k in rc.ipc:
    dsv_real, _, _ = shot_run(config, workdir, "real", k)
    dsv_zero, _, _ = shot_run(config, workdir, zero, k)
    # The baseline trains on exactly the real images the k-shot DSVs
    # started from.
    idx = dsv_real.source_index
    r_random = rows(
      f"random real k={k}", ds.train["image"][idx], ds.train["label"][idx]
    )
    r_real = rows(f"DSV real-init k={k}", *_active_hard(dsv_real))
    r_zero = rows(f"DSV {zero}-init k={k}", *_active_hard(dsv_zero))
    entries = [
      (k, 0, f"DSV ({zero} init)", r_zero),
      (k, k, "k random real images (the DSVs' init)", r_random),
      (k, k, "DSV (real init)", r_real),
    ]
    if rc.baseline:
      dsv_b = baseline_run(config, workdir, f"kkt_reconstruction_k{k}", k)
      r_b = rows(f"KKT reconstruction k={k}", *_active_hard(dsv_b))
      entries.append((k, k, "KKT reconstruction (Buzaglo et al. style)", r_b))
    for kk, seen, name, row in entries:
      lines.append(f"| {kk} | {seen} | {name} | {_pct(row)} |")
      results[f"k{k}/{name}"] = row
  md = (
    "## 1. Few-shot distillation (Table 2 analogue)\n\n"
    "Fresh models of the classifier's architecture, trained only on the set "
    "named in the row with the same recipe "
    f"(`config.retrain`: {config.retrain.steps} steps, Adam lr "
    f"{config.retrain.learning_rate}), evaluated on the real test split.\n\n"
    + "\n".join(lines)
    + "\n"
  )
  return md, results


def load_selection(workdir: str) -> dict[str, Any]:
  """The `select` stage's lambdas and per-class ranking from `workdir`.

  Returns:
    ``lambdas``, ``scores``, ``labels`` (float/int ``[N]`` over the training
    split) and ``ranking``: per class, the training indices sorted by
    decreasing score.
  """
  path = os.path.join(workdir, "select", "lambdas.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No selection at {path}; run --stage=select.")
  with np.load(path) as z:
    out = {k: z[k] for k in ("lambdas", "scores", "labels")}
    order, start = z["order"], z["class_start"]
  out["ranking"] = [
    order[a:b] for a, b in zip(start[:-1], start[1:], strict=True)
  ]
  return out


def coreset_section(config, workdir, rows: RetrainRows) -> tuple[str, dict]:
  """Table 1 analogue: top-lambda training images vs random ones."""
  ds, c = rows.ds, rows.clf.info.num_classes
  sel = load_selection(workdir)
  labels = ds.train["label"]
  key = jax.random.fold_in(jax.random.key(config.seed), 77)
  lines = [
    "| img/cls | random | highest score (selection) |",
    "|---|---|---|",
  ]
  results = {}
  for k in config.report.ipc:
    top = np.concatenate([sel["ranking"][c_][:k] for c_ in range(c)])
    rnd = select.random_per_class(jax.random.fold_in(key, k), labels, c, k)
    r_top = rows(f"selected top k={k}", ds.train["image"][top], labels[top])
    r_rnd = rows(f"random k={k}", ds.train["image"][rnd], labels[rnd])
    lines.append(f"| {k} | {_pct(r_rnd)} | {_pct(r_top)} |")
    results[f"k{k}"] = {"random": r_rnd, "selected": r_top}
  md = (
    "## 2. Coreset selection (Table 1 analogue)\n\n"
    "Training images ranked by the selection score of the `select` stage "
    "(per class), against random training images of the same classes; same "
    "retraining recipe as section 1.\n\n" + "\n".join(lines) + "\n"
  )
  return md, results


def _stats(desc: dict[str, np.ndarray]) -> dict[str, float]:
  return {
    "entropy_mean": float(np.mean(desc["entropy"])),
    "entropy_std": float(np.std(desc["entropy"])),
    "margin_mean": float(np.mean(desc["margin"])),
    "margin_std": float(np.std(desc["margin"])),
    "n": int(len(desc["entropy"])),
  }


def boundary_section(
  config, workdir, clf: pipelines.Classifier, ds: data.Dataset, out_dir: str
) -> tuple[str, dict]:
  """Entropy curves during synthesis; entropy/margin of DSVs vs samples."""
  c = clf.info.num_classes
  k = max(config.report.ipc)
  zero = config.report.zero_shot_init
  curves = {}
  for init in ("real", zero):
    # Finished sub-runs of the few-shot section: read back, not re-run.
    _, _, run_dir = shot_run(config, workdir, init, k)
    with open(os.path.join(run_dir, "synthesize", "metrics.jsonl")) as f:
      curves[f"{init} init, k={k}"] = [json.loads(line) for line in f]
  fig, ax = plt.subplots(figsize=(4.5, 3))
  for name, rws in curves.items():
    ax.plot([r["step"] for r in rws], [r["entropy"] for r in rws], label=name)
  ax.set_xlabel("synthesis step")
  ax.set_ylabel("mean predictive entropy")
  ax.axhline(np.log(c), ls=":", c="grey", label="max (log C)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "entropy_curve.png"), dpi=100)
  plt.close(fig)

  dsv, _ = artifacts.load_dsv(os.path.join(workdir, "synthesize"))
  sel, _ = artifacts.load_dsv(os.path.join(workdir, "select"))
  per = max(1, int(np.sum(sel.active)) // c)
  key = jax.random.fold_in(jax.random.key(config.seed), 78)
  rnd = select.random_per_class(key, ds.train["label"], c, per)

  def describe(images, labels):
    return jax.tree.map(
      np.asarray, synthesize.describe(clf.apply_fn, clf.params, images, labels)
    )

  groups = {
    "DSVs (synthesize stage)": _stats(
      {
        k_: v[dsv.active]
        for k_, v in dsv._asdict().items()
        if k_ in ("entropy", "margin")
      }
    ),
    "selected (select stage top-k)": _stats(
      {"entropy": sel.entropy, "margin": sel.margin}
    ),
    "random training samples": _stats(
      describe(ds.train["image"][rnd], ds.train["label"][rnd])
    ),
  }
  lines = [
    "| samples | n | entropy (mean +- std) | margin (mean +- std) |",
    "|---|---|---|---|",
  ]
  for name, s in groups.items():
    lines.append(
      f"| {name} | {s['n']} | {s['entropy_mean']:.3f} +- {s['entropy_std']:.3f}"
      f" | {s['margin_mean']:.3f} +- {s['margin_std']:.3f} |"
    )
  firsts = {n: (r[0]["entropy"], r[-1]["entropy"]) for n, r in curves.items()}
  curve_txt = "; ".join(
    f"{n}: {a:.3f} -> {b:.3f}" for n, (a, b) in firsts.items()
  )
  md = (
    "## 3. Boundary evidence\n\n"
    "The paper reports that candidates' predictive entropy rises during "
    f"synthesis (about 0.2 to 1.0 on CIFAR-10). Measured here: {curve_txt}.\n\n"
    "![entropy during synthesis](entropy_curve.png)\n\n"
    "Entropy and logit margin (target logit minus the largest other) under "
    "the source classifier; higher entropy / lower margin = closer to the "
    "decision boundary.\n\n" + "\n".join(lines) + "\n"
  )
  return md, {"entropy_curves": firsts, "groups": groups}


def _per_class_accuracy(clf, ds) -> np.ndarray:
  logits = []
  x = ds.test["image"]
  for i in range(0, len(x), 1000):
    logits.append(np.asarray(clf.apply_fn(clf.params, x[i : i + 1000])))
  pred = np.argmax(np.concatenate(logits), -1)
  y = ds.test["label"]
  return np.array(
    [np.mean(pred[y == c] == c) for c in range(clf.info.num_classes)]
  )


def lambda_accuracy_section(
  config, workdir, clf, ds, out_dir: str
) -> tuple[str, dict]:
  """Per-class sum of lambda against per-class test accuracy (Pearson)."""
  sel = load_selection(workdir)
  c = clf.info.num_classes
  labels = ds.train["label"]
  sums = np.array([sel["lambdas"][labels == k].sum() for k in range(c)])
  acc = _per_class_accuracy(clf, ds)
  r = float(np.corrcoef(sums, acc)[0, 1]) if np.std(sums) > 0 else float("nan")
  fig, ax = plt.subplots(figsize=(4, 3))
  ax.scatter(sums, acc)
  for k in range(c):
    ax.annotate(clf.info.class_names[k], (sums[k], acc[k]), fontsize=6)
  ax.set_xlabel("sum of lambda over the class")
  ax.set_ylabel("test accuracy of the class")
  ax.set_title(f"Pearson r = {r:.3f}", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "lambda_vs_accuracy.png"), dpi=100)
  plt.close(fig)
  lines = ["| class | sum lambda | test accuracy % |", "|---|---|---|"]
  for k in range(c):
    lines.append(
      f"| {clf.info.class_names[k]} | {sums[k]:.4g} | {100 * acc[k]:.2f} |"
    )
  md = (
    "## 4. Per-class sum of lambda vs per-class test accuracy\n\n"
    f"Pearson correlation **r = {r:.3f}** over {c} classes (paper: 0.78 on "
    "CIFAR-10).\n\n![lambda vs accuracy](lambda_vs_accuracy.png)\n\n"
    + "\n".join(lines)
    + "\n"
  )
  return md, {
    "pearson": r,
    "lambda_sums": sums.tolist(),
    "accuracy": acc.tolist(),
  }


def flip_rates(
  apply_fn,
  params,
  added: np.ndarray,
  added_labels: np.ndarray,
  images: np.ndarray,
  labels: np.ndarray,
  ratios: Sequence[float],
  *,
  pixel_min,
  pixel_max,
) -> dict[float, float]:
  """How often `x + r ||x|| a / ||a||` is predicted as a's class.

  Every added image `a` (class `added_labels`) is added to every real image
  `x` of another class that the model classifies correctly.

  Returns:
    `{r: fraction of (a, x) pairs whose prediction flips to a's class}`.
  """
  pred = np.asarray(jnp.argmax(apply_fn(params, images), -1))
  keep = pred == labels
  images, labels = images[keep], labels[keep]
  xn = np.linalg.norm(images.reshape(len(images), -1), axis=1)
  an = np.linalg.norm(added.reshape(len(added), -1), axis=1)
  out = {}
  for r in ratios:
    hits, total = 0, 0
    for a, la, na in zip(added, added_labels, an, strict=True):
      other = labels != la
      x = images[other]
      if not len(x):
        continue
      scale = (r * xn[other] / max(na, 1e-12))[:, None, None, None]
      mixed = np.clip(x + scale * a[None], pixel_min, pixel_max)
      p = np.asarray(jnp.argmax(apply_fn(params, mixed), -1))
      hits += int(np.sum(p == la))
      total += len(x)
    out[float(r)] = hits / max(total, 1)
  return out


def decision_section(config, workdir, clf, ds) -> tuple[str, dict]:
  """Appendix F: adding a DSV flips predictions to its class more often
  than adding a real image of that class at the same norm."""
  rc, c = config.report, clf.info.num_classes
  dsv, _ = artifacts.load_dsv(os.path.join(workdir, "synthesize"))
  imgs, labs = _active_hard(dsv)
  # One DSV per class keeps the pair count (and time) bounded.
  first = np.array(
    [np.flatnonzero(labs == k)[0] for k in range(c) if np.any(labs == k)]
  )
  imgs, labs = imgs[first], labs[first]
  key = jax.random.fold_in(jax.random.key(config.seed), 79)
  real_idx = select.random_per_class(key, ds.train["label"], c, 1)
  real_idx = real_idx[np.isin(ds.train["label"][real_idx], labs)]
  test_idx = select.random_per_class(
    jax.random.fold_in(key, 1), ds.test["label"], c, rc.flip_images
  )
  kw = {"pixel_min": clf.info.pixel_min, "pixel_max": clf.info.pixel_max}
  tx, ty = ds.test["image"][test_idx], ds.test["label"][test_idx]
  dsv_rates = flip_rates(
    clf.apply_fn, clf.params, imgs, labs, tx, ty, rc.flip_ratios, **kw
  )
  real_rates = flip_rates(
    clf.apply_fn,
    clf.params,
    ds.train["image"][real_idx],
    ds.train["label"][real_idx],
    tx,
    ty,
    rc.flip_ratios,
    **kw,
  )
  lines = [
    "| added norm / image norm | DSV added: flip rate "
    "| real image added: flip rate |",
    "|---|---|---|",
  ]
  for r in rc.flip_ratios:
    lines.append(
      f"| {r:g} | {100 * dsv_rates[float(r)]:.1f}% "
      f"| {100 * real_rates[float(r)]:.1f}% |"
    )
  md = (
    "## 5. Decision criteria (Appendix F)\n\n"
    f"One DSV per class (from the synthesize stage) added to {rc.flip_images} "
    "correctly classified test images of every other class at a norm "
    "relative to the image's; the flip rate counts predictions that change to "
    "the DSV's class. Control: one random real training image of the same "
    "class added at the same norm.\n\n" + "\n".join(lines) + "\n"
  )
  return md, {"dsv": dsv_rates, "real": real_rates}


def ablation_section(config, workdir, clf, rows: RetrainRows, out_dir: str):
  """Primal-only synthesis against the full DeepKKT loss."""
  k = max(config.report.ipc)
  zero = config.report.zero_shot_init
  full, _, full_dir = shot_run(config, workdir, zero, k)
  primal, _, primal_dir = synth_run(
    config,
    workdir,
    f"primal_only_{zero}_k{k}",
    **{
      "synth.init": zero,
      "synth.num_per_class": k,
      "kkt.beta_stationarity": 0.0,
    },
  )
  indep = independent_classifier(config, workdir)

  def agreement(dsv):
    x, y = _active_hard(dsv)
    if not len(x):
      return 0.0
    pred = np.asarray(jnp.argmax(indep.apply_fn(indep.params, x), -1))
    return float(np.mean(pred == y))

  res = {
    "full": {
      "agreement": agreement(full),
      "retrain": rows(f"full {zero} k={k}", *_active_hard(full)),
    },
    "primal_only": {
      "agreement": agreement(primal),
      "retrain": rows(f"primal-only {zero} k={k}", *_active_hard(primal)),
    },
  }
  for name, d in (("full", full_dir), ("primal_only", primal_dir)):
    src = os.path.join(d, "synthesize", "grid.png")
    dst = os.path.join(out_dir, f"ablation_{name}.png")
    shutil.copyfile(src, dst)
  md = (
    "## 6. Loss ablation: primal-only vs full DeepKKT\n\n"
    f"{k} candidates per class from {zero} init. Agreement: fraction of "
    "survivors an independently trained classifier (same recipe, another "
    "seed) assigns to the target class.\n\n"
    "| loss | independent agreement | retrained test accuracy % |\n"
    "|---|---|---|\n"
    f"| full DeepKKT | {res['full']['agreement']:.2f} | "
    f"{_pct(res['full']['retrain'])} |\n"
    f"| primal only | {res['primal_only']['agreement']:.2f} | "
    f"{_pct(res['primal_only']['retrain'])} |\n\n"
    "Full: ![full](ablation_full.png)\n\nPrimal only: "
    "![primal only](ablation_primal_only.png)\n"
  )
  return md, res


def _short(v: Any) -> str:
  """A result value for prose: floats (and lists of them) to 3 digits."""
  if isinstance(v, float):
    return f"{v:.3g}"
  if isinstance(v, list):
    return "[" + ", ".join(_short(x) for x in v) + "]"
  return str(v)


def strips_section(workdir: str, out_dir: str) -> tuple[str, dict]:
  """Editing and soft-label interpolation strips of the earlier stages."""
  parts = ["## 7. Editing and soft-label interpolation\n"]
  res = {}
  for stage, title in (("edit", "Editing"), ("interpolate", "Interpolation")):
    src = os.path.join(workdir, stage, "strip.png")
    record = pipelines.stage_record(workdir, stage)
    if not os.path.exists(src) or record is None:
      parts.append(f"{title}: the `{stage}` stage has not run.\n")
      continue
    dst = os.path.join(out_dir, f"{stage}_strip.png")
    shutil.copyfile(src, dst)
    res[stage] = record["results"]
    summary = ", ".join(
      f"{k}={_short(v)}" for k, v in record["results"].items()
    )
    parts.append(f"{title} ({summary}):\n\n![{stage}]({stage}_strip.png)\n")
  return "\n".join(parts), res


# ----------------------------------------------------------------------------
# The stage.


def validate_report_config(config: ml_collections.ConfigDict) -> None:
  rc = config.report
  if not rc.ipc or any(int(k) < 1 for k in rc.ipc):
    raise ValueError(f"Config key report.ipc: need sizes >= 1, got {rc.ipc}.")
  if rc.zero_shot_init not in ZERO_SHOT_INITS:
    raise ValueError(
      f"Config key report.zero_shot_init: {rc.zero_shot_init!r} not in "
      f"{ZERO_SHOT_INITS}."
    )
  if rc.flip_images < 1 or not rc.flip_ratios:
    raise ValueError("Config keys report.flip_images / flip_ratios: empty.")


def run_report(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes `workdir/report/report.md` with every section and its figures."""
  pipelines.validate_config(config)
  validate_report_config(config)
  workdir = os.path.abspath(workdir)
  digest = pipelines.config_hash(config, "report")
  for stage in ("train", "select", "synthesize"):
    if pipelines.stage_record(workdir, stage) is None:
      raise FileNotFoundError(
        f"The report needs the {stage!r} stage's outputs in {workdir}; run "
        f"--stage={stage} (or --stage=all) first."
      )
  t0 = time.perf_counter()
  clf = pipelines.load_classifier(workdir)
  ds = pipelines.load_data(config)
  out_dir = os.path.join(workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  rows = RetrainRows(config, workdir, clf, ds)
  sections, results = [], {}
  for name, fn in (
    ("few_shot", lambda: few_shot_section(config, workdir, rows)),
    ("coreset", lambda: coreset_section(config, workdir, rows)),
    ("boundary", lambda: boundary_section(config, workdir, clf, ds, out_dir)),
    (
      "lambda_accuracy",
      lambda: lambda_accuracy_section(config, workdir, clf, ds, out_dir),
    ),
    ("decision", lambda: decision_section(config, workdir, clf, ds)),
    ("ablation", lambda: ablation_section(config, workdir, clf, rows, out_dir)),
    ("strips", lambda: strips_section(workdir, out_dir)),
  ):
    ts = time.perf_counter()
    md, res = fn()
    logging.info(
      "Report section %s done in %.1f s.", name, time.perf_counter() - ts
    )
    sections.append(md)
    results[name] = res
  train_res = pipelines.stage_record(workdir, "train")["results"]
  header = (
    f"# DSV report: {clf.info.name}\n\n"
    f"Classifier: {clf.meta['model']['name']} "
    f"{json.dumps(clf.meta['model']['kwargs'], sort_keys=True)}, test "
    f"accuracy {100 * train_res['test_accuracy']:.2f}%. Seed {config.seed}; "
    f"config hash {digest}; written "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
    f"on {jax.device_count()} {jax.devices()[0].platform} device(s).\n"
    "Settings were fixed on the validation split; every accuracy here is on "
    "the test split.\n\n"
  )
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(header + "\n".join(sections))
  results["report_time_s"] = time.perf_counter() - t0
  results = json.loads(json.dumps(results, default=float))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  summary = _summary(results, os.path.join(out_dir, "report.md"))
  pipelines._mark_done(workdir, "report", digest, summary)
  return summary


def _summary(results: dict, path: str) -> dict[str, Any]:
  """The headline numbers of a report (the stage record and CLI output)."""
  out = {"report": path, "report_time_s": round(results["report_time_s"], 1)}
  for name, row in results["few_shot"].items():
    out[f"few_shot/{name}"] = round(row["mean"], 4)
  for k, pair in results["coreset"].items():
    for which, row in pair.items():
      out[f"coreset/{k}/{which}"] = round(row["mean"], 4)
  out["lambda_accuracy_pearson"] = round(
    results["lambda_accuracy"]["pearson"], 3
  )
  return out


__all__ = [
  "RetrainRows",
  "ZERO_SHOT_INITS",
  "ablation_section",
  "baseline_run",
  "boundary_section",
  "coreset_section",
  "decision_section",
  "few_shot_section",
  "flip_rates",
  "independent_classifier",
  "lambda_accuracy_section",
  "load_selection",
  "run_report",
  "shot_run",
  "strips_section",
  "synth_run",
]
