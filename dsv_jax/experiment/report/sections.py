"""The report's sections: each a function returning (markdown, results).

Every section reads what the stages and the report's sub-runs
(`report.cache`) produced, draws its figures into the report folder with
matplotlib's object-oriented API (no global backend is switched), and
returns its markdown and numbers. Importable from a notebook.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dsv_jax import (
  coreset,
  data,
  distributed,
  select,
)
from dsv_jax.experiment import workdir as wd
from dsv_jax.experiment.report import reproduction
from dsv_jax.experiment.report.boundary_sections import (  # noqa: F401
  ablation_section,
  boundary_section,
  decision_section,
  entropy_protocol_run,
  flip_rates,
  lambda_accuracy_section,
)
from dsv_jax.experiment.report.cache import (
  RetrainRows,
  baseline_run,
  shot_run,
)
from dsv_jax.experiment.report.section_utils import (  # noqa: F401
  active_hard,
  load_selection,
  pct,
)
from dsv_jax.experiment.stages import retrain as retrain_stage
from dsv_jax.experiment.stages import train as train_stage

ZERO_SHOT_INITS = ("noise", "other")


# Published Fashion-MNIST coreset and distillation numbers (ConvNet, test
# accuracy %, 1 / 10 / 50 images per class; the DC and KIP papers), shown
# as context under the few-shot table (sections 1 and 2). Not run here.
LITERATURE = {
  "fashion_mnist": (
    ("random real", (51.4, 73.8, 82.5)),
    ("herding", (67.0, 71.1, 71.9)),
    ("forgetting", (42.0, 53.9, 55.0)),
    ("DC", (70.5, 82.3, 83.6)),
    ("DSA", (70.6, 84.6, 88.7)),
    ("KIP (to NN)", (73.8, 86.8, 87.8)),
  ),
}


LITERATURE_IPC = (1, 10, 50)


def other_dataset_missing(config: ml_collections.ConfigDict) -> str | None:
  """Why the 0-shot source `synth.other_dataset` cannot load, or None.

  Only missing data is tolerated (the report then skips the rows that need
  it and says so); an unknown name is a config error and raises.
  """
  try:
    data.load_dataset(
      config.synth.other_dataset,
      data_dir=config.synth.other_data_dir or None,
      max_train=10,
    )
  except FileNotFoundError as e:
    return str(e).splitlines()[0]
  return None


def few_shot_section(config, workdir, rows: RetrainRows) -> tuple[str, dict]:
  """Table 2 analogue: DSVs from k real shots / 0 shots vs k real images.

  For every k in `report.ipc`: DSVs from the k real shots per class and the
  shots themselves; 0-shot DSVs from another data set (the paper's
  protocol, `synth.other_dataset`) and from noise; the KKT-reconstruction
  baseline. Every row records its classical agreement (`judges`: the
  fraction of its images that pixel classifiers fitted on the real
  training split assign to their label) and a two-sided Welch p-value
  against the k real shots per class (the same seeds).
  """
  ds, rc = rows.ds, config.report
  missing = other_dataset_missing(config)
  zero_inits = [i for i in ("other", "noise") if i != "other" or not missing]
  results, lines = {}, []
  lines.append(
    "| img/cls | real seen/cls | method | test accuracy % (mean +- std over "
    f"{config.retrain.num_models} seeds) | classical agreement | p vs k "
    "real shots |"
  )
  lines.append("|---|---|---|---|---|---|")
  for k in rc.ipc:
    dsv_real, _, _ = shot_run(config, workdir, "real", k)
    # The baseline trains on exactly the real images the k-shot DSVs
    # started from.
    idx = dsv_real.source_index
    shots = (ds.train["image"][idx], ds.train["label"][idx])
    r_random = rows(f"random real k={k}", *shots)
    shots_name = "k random real images (the DSVs' init)"
    entries = [(k, k, shots_name, shots, r_random)]
    for init in zero_inits:
      dsv_zero, _, _ = shot_run(config, workdir, init, k)
      src = "noise" if init == "noise" else config.synth.other_dataset
      images = active_hard(dsv_zero)
      entries.append(
        (
          k,
          0,
          f"DSV ({src} init)",
          images,
          rows(f"DSV {init}-init k={k}", *images),
        )
      )
    images = active_hard(dsv_real)
    entries.append(
      (k, k, "DSV (real init)", images, rows(f"DSV real-init k={k}", *images))
    )
    if rc.baseline:
      dsv_b = baseline_run(config, workdir, f"kkt_reconstruction_k{k}", k)
      images = active_hard(dsv_b)
      entries.append(
        (
          k,
          k,
          "KKT reconstruction (Buzaglo et al. style)",
          images,
          rows(f"KKT reconstruction k={k}", *images),
        )
      )
    for kk, seen, name, images, row in entries:
      row = dict(row, seen_per_class=seen)
      row["classical_agreement"] = rows.classical_agreement(*images)
      p = None
      if name != shots_name:
        p = reproduction.welch_p(row["accuracies"], r_random["accuracies"])
      row["p_vs_shots"] = p
      p_cell = "-" if p is None else f"{p:.2g}"
      lines.append(
        f"| {kk} | {seen} | {name} | {pct(row)} | "
        f"{row['classical_agreement']:.2f} | {p_cell} |"
      )
      results[f"k{k}/{name}"] = row
  md = (
    "## 1. Few-shot distillation (Table 2 analogue)\n\n"
    "Fresh models of the classifier's architecture, trained only on the set "
    "named in the row with the same recipe "
    f"(`config.retrain`: {config.retrain.steps} steps, Adam lr "
    f"{config.retrain.learning_rate}), evaluated on the real test split. "
    "0 real seen: DSVs synthesised from images of another data set "
    f"({config.synth.other_dataset}, resized; the paper's 0-shot protocol) "
    "or from noise. Classical agreement: the fraction of a set's images "
    "that logistic regression, an RBF SVM and 1-NN fitted on the real "
    "training pixels assign to their label (mean of the three). p: "
    "two-sided Welch t-test against the k real shots per class.\n\n"
    + "\n".join(lines)
    + "\n"
  )
  if missing:
    md += (
      f"\nThe 0-shot rows from {config.synth.other_dataset} are missing: "
      f"{missing}\n"
    )
  return md + literature_table(rows.clf.info.name), results


def literature_table(dataset: str) -> str:
  """Published numbers for `dataset` as a markdown table ("" if none)."""
  lit = LITERATURE.get(dataset)
  if not lit:
    return ""
  head = " | ".join(str(k) for k in LITERATURE_IPC)
  return (
    "\nLiterature, for context (published numbers, not run here; ConvNet, "
    "test accuracy % at img/cls):\n\n"
    f"| method (literature) | {head} |\n|---|"
    + "---|" * len(LITERATURE_IPC)
    + "\n"
    + "".join(
      f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |\n"
      for name, vals in lit
    )
  )


def el2n_run(config, workdir, clf, ds) -> np.ndarray:
  """EL2N scores of the training split, cached in `report/runs/el2n.npz`.

  K = `report.el2n_models` fresh models of the classifier's architecture
  trained for `report.el2n_steps` steps of the classifier's own recipe
  (`config.train`) on the whole training split (`coreset.el2n_scores`).
  """
  t, rc = config.train, config.report
  path = os.path.join(workdir, "report", "runs", "el2n.npz")
  digest = wd.array_digest(
    ds.train["label"],
    extra={
      "train": train_stage.stage_hash(config, workdir),
      "el2n": [rc.el2n_models, rc.el2n_steps],
    },
  )
  if epath.Path(path).exists():
    with epath.Path(path).open("rb") as f, np.load(f) as z:
      if str(z["digest"]) == digest:
        return z["scores"]
  logging.info(
    "Report: EL2N scores from %d models x %d steps.",
    rc.el2n_models,
    rc.el2n_steps,
  )
  scores = coreset.el2n_scores(
    retrain_stage.model_fn_of(clf),
    ds.train["image"],
    ds.train["label"],
    num_models=rc.el2n_models,
    steps=rc.el2n_steps,
    learning_rate=t.learning_rate,
    batch_size=t.batch_size,
    weight_decay=t.weight_decay,
    flip=t.flip,
    max_shift=t.max_shift,
    seed=config.seed + 2,
  )
  epath.Path(os.path.dirname(path)).mkdir(parents=True, exist_ok=True)
  wd.savez(path, scores=scores, digest=digest)
  return scores


def coreset_section(config, workdir, rows: RetrainRows) -> tuple[str, dict]:
  """Table 1 analogue: selected training images against coreset baselines.

  For every k in `report.coreset_ipc`: random images (K different draws,
  model k trained on draw k), herding in the classifier's penultimate
  features, the highest EL2N scores, and the selection's top-k by its score
  (contribution) and by lambda (the paper's ranking); the same retraining
  recipe and K model seeds for every row, and a Welch p-value of selection
  against random.
  """
  ds, clf = rows.ds, rows.clf
  c = clf.info.num_classes
  sel = load_selection(workdir)
  x, labels = ds.train["image"], ds.train["label"]
  key = jax.random.fold_in(jax.random.key(config.seed), 77)
  fm = clf.functional
  feats = coreset.features_of(
    lambda p, xx: fm.eval_features(p, fm.state, xx), clf.params, x
  )
  el2n = el2n_run(config, workdir, clf, ds)
  num_models = config.retrain.num_models
  lines = [
    "| img/cls | random | herding | EL2N (highest) | DSV selection "
    "(contribution) | DSV selection (lambda) | p vs random: contribution "
    "/ lambda |",
    "|---|---|---|---|---|---|---|",
  ]
  results = {}
  for k in config.report.coreset_ipc:
    draws = [
      select.random_per_class(
        jax.random.fold_in(key, 1000 * k + m), labels, c, k
      )
      for m in range(num_models)
    ]
    picks = {
      "herding": coreset.herding(feats, labels, c, k),
      "el2n": select.top_per_class(el2n, labels, c, k),
      "selected": np.concatenate([sel["ranking"][j][:k] for j in range(c)]),
      "selected_lambda": select.top_per_class(
        select.scores(
          sel["lambdas"], None, score="lambda", rankable=sel["rankable"]
        ),
        labels,
        c,
        k,
      ),
    }
    res = {
      "random": rows(
        f"random k={k} ({num_models} draws)",
        np.stack([x[d] for d in draws]),
        np.stack([labels[d] for d in draws]),
      )
    }
    for name, idx in picks.items():
      res[name] = rows(f"{name} k={k}", x[idx], labels[idx])
    rand = res["random"]["accuracies"]
    p = reproduction.welch_p(res["selected"]["accuracies"], rand)
    p_lam = reproduction.welch_p(res["selected_lambda"]["accuracies"], rand)
    res["p_selected_vs_random"] = p
    res["p_selected_lambda_vs_random"] = p_lam
    cells = [
      pct(res[n])
      for n in ("random", "herding", "el2n", "selected", "selected_lambda")
    ]
    lines.append(
      f"| {k} | " + " | ".join(cells) + f" | {p:.2g} / {p_lam:.2g} |"
    )
    results[f"k{k}"] = res
  md = (
    "## 2. Coreset selection (Table 1 analogue)\n\n"
    f"k training images per class, {num_models} seeds per row (the same "
    "retraining recipe and model seeds as section 1; the random row draws "
    "a new subset for every seed). Herding: greedy mean matching of the "
    "classifier's L2-normalised penultimate features. EL2N: highest error "
    f"norm after {config.report.el2n_steps} training steps, averaged over "
    f"{config.report.el2n_models} models. Selection: the `select` stage's "
    "top-k per class by contribution lambda_i ||p_i - y_i|| (the default) "
    "and by lambda (the paper's ranking). p: two-sided Welch t-test of "
    "each selection against random.\n\n" + "\n".join(lines) + "\n"
  )
  return md, results


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
    record = wd.stage_record(workdir, stage)
    if not epath.Path(src).exists() or record is None:
      parts.append(f"{title}: the `{stage}` stage has not run.\n")
      continue
    dst = os.path.join(out_dir, f"{stage}_strip.png")
    if distributed.is_primary():
      epath.Path(src).copy(dst, overwrite=True)
    res[stage] = record["results"]
    summary = ", ".join(
      f"{k}={_short(v)}" for k, v in record["results"].items()
    )
    parts.append(f"{title} ({summary}):\n\n![{stage}]({stage}_strip.png)\n")
  return "\n".join(parts), res


def health_lines(train_res: dict, select_record: dict | None) -> str:
  """The report header's classifier health and stationarity anchors."""

  def get(key, fmt=".3f"):
    v = train_res.get(key)
    return "n/a" if v is None else format(v, fmt)

  max_ent = train_res.get("max_entropy")
  out = (
    "| classifier health | training images | validation |\n|---|---|---|\n"
    f"| mean predictive entropy (max ln C = {get('max_entropy')}) | "
    f"{get('train_entropy')} | {get('val_entropy')} |\n"
    f"| mean margin (label logit - largest other) | {get('train_margin')} | "
    f"{get('val_margin')} |\n"
    f"| logit scale (std over classes) | {get('train_logit_std')} | "
    f"{get('val_logit_std')} |\n"
    f"| accuracy | {get('train_accuracy', '.4f')} | "
    f"{get('val_accuracy', '.4f')} |\n\n"
  )
  if max_ent and train_res.get("train_entropy", 0) > 0.5 * max_ent:
    out += (
      "**Warning: the classifier is near-uniform** (training-image entropy "
      "above half of ln C): every boundary number below means little.\n\n"
    )
  if "finish_rel_grad_after" in train_res:
    out += (
      "Finishing phase (full-batch L-BFGS on the training objective): "
      f"relative gradient ||grad F|| / (wd ||theta||) "
      f"{train_res['finish_rel_grad_before']:.3g} -> "
      f"{train_res['finish_rel_grad_after']:.3g} in "
      f"{train_res['finish_iterations']} iterations.\n\n"
    )
  if select_record is not None:
    r = select_record["results"]
    if "residual_uniform" in r:
      excluded = ", ".join(r["excluded_leaves"]) or "none"
      out += (
        "Selection: relative stationarity residual "
        "||theta + sum_i lambda_i g_i|| / ||theta|| of the fitted lambda "
        f"{r['residual']:.3f} on the represented parameters "
        f"({r['residual_all']:.3f} over all of theta); the anchor "
        f"lambda_i = 1/(N wd) gives {r['residual_uniform']:.3f} "
        f"({r['residual_uniform_all']:.3f}). Left out as unrepresentable "
        f"(scale-invariant or zero-gradient): {excluded} "
        f"({100 * r['excluded_share']:.1f}% of ||theta||^2).\n\n"
      )
  return out


__all__ = [
  "LITERATURE",
  "ZERO_SHOT_INITS",
  "ablation_section",
  "boundary_section",
  "coreset_section",
  "decision_section",
  "el2n_run",
  "entropy_protocol_run",
  "few_shot_section",
  "flip_rates",
  "health_lines",
  "lambda_accuracy_section",
  "literature_table",
  "load_selection",
  "other_dataset_missing",
  "strips_section",
]
