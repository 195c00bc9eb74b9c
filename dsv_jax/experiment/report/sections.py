"""The report's sections: each a function returning (markdown, results).

Every section reads what the stages and the report's sub-runs
(`report.cache`) produced, draws its figures into the report folder with
matplotlib's object-oriented API (no global backend is switched), and
returns its markdown and numbers. Importable from a notebook.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from matplotlib.figure import Figure

from dsv_jax import (
  artifacts,
  coreset,
  data,
  distributed,
  models,
  select,
  synthesize,
  viz,
)
from dsv_jax.experiment import common
from dsv_jax.experiment import workdir as wd
from dsv_jax.experiment.report import reproduction
from dsv_jax.experiment.report.cache import (
  RetrainRows,
  baseline_run,
  independent_classifier,
  shot_run,
  sub_config,
  synth_run,
)
from dsv_jax.experiment.stages import retrain as retrain_stage
from dsv_jax.experiment.stages import synthesize as synthesize_stage
from dsv_jax.experiment.stages import train as train_stage

ZERO_SHOT_INITS = ("noise", "other")


def _pct(row: dict | None) -> str:
  if row is None:
    return "-"
  return f"{100 * row['mean']:.2f} +- {100 * row['std']:.2f}"


def _active_hard(dsv: artifacts.DSVSet) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(synthesize.target_labels(dsv.targets))
  return dsv.images[dsv.active], labels[dsv.active]


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
      images = _active_hard(dsv_zero)
      entries.append(
        (
          k,
          0,
          f"DSV ({src} init)",
          images,
          rows(f"DSV {init}-init k={k}", *images),
        )
      )
    images = _active_hard(dsv_real)
    entries.append(
      (k, k, "DSV (real init)", images, rows(f"DSV real-init k={k}", *images))
    )
    if rc.baseline:
      dsv_b = baseline_run(config, workdir, f"kkt_reconstruction_k{k}", k)
      images = _active_hard(dsv_b)
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
        f"| {kk} | {seen} | {name} | {_pct(row)} | "
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


def load_selection(workdir: str) -> dict[str, Any]:
  """The `select` stage's lambdas and per-class ranking from `workdir`.

  Returns:
    ``lambdas``, ``scores``, ``labels``, ``rankable`` (``[N]`` over the
    training split) and ``ranking``: per class, the training indices sorted by
    decreasing score.
  """
  path = os.path.join(workdir, "select", "lambdas.npz")
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"No selection at {path}; run --stage=select.")
  with epath.Path(path).open("rb") as f, np.load(f) as z:
    out = {k: z[k] for k in ("lambdas", "scores", "labels", "rankable")}
    order, start = z["order"], z["class_start"]
  out["ranking"] = [
    order[a:b] for a, b in zip(start[:-1], start[1:], strict=True)
  ]
  return out


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
      _pct(res[n])
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


def _stats(desc: dict[str, np.ndarray]) -> dict[str, float]:
  return {
    "entropy_mean": float(np.mean(desc["entropy"])),
    "entropy_std": float(np.std(desc["entropy"])),
    "margin_mean": float(np.mean(desc["margin"])),
    "margin_std": float(np.std(desc["margin"])),
    "n": int(len(desc["entropy"])),
  }


def entropy_protocol_run(config, workdir, clf, ds) -> dict[str, np.ndarray]:
  """The paper's entropy-figure protocol, from its source code.

  Real training images (`report.protocol_candidates` in all, spread evenly
  over the classes) are the candidates; x and lambda are optimised with the
  synthesis objective from the usual random lambda initialisation
  (the image recipe: `common.synthesis_recipe`), and every candidate's
  predictive entropy is recorded along the way. The paper's figure shows
  the top-5-lambda candidates gaining entropy and the lowest-50 losing it.
  Cached in `report/runs/entropy_protocol.npz`.

  Returns:
    ``steps`` int ``[T]``, ``entropy`` ``[T, N]``, ``lambdas`` ``[N]`` (at
    the end), ``labels`` ``[N]``.
  """
  rc, info = config.report, clf.info
  c = info.num_classes
  recipe = common.synthesis_recipe(config, "real")
  steps = recipe.synth.steps
  per_class = max(1, rc.protocol_candidates // c)
  path = os.path.join(workdir, "report", "runs", "entropy_protocol.npz")
  digest = synthesize_stage.stage_hash(
    sub_config(config, workdir, **{"synth.init": "real"}), workdir
  )
  digest = wd.array_digest(extra=[digest, per_class])
  if epath.Path(path).exists():
    with epath.Path(path).open("rb") as f, np.load(f) as z:
      if str(z["digest"]) == digest:
        return {k: z[k] for k in ("steps", "entropy", "lambdas", "labels")}
  labels = synthesize.class_targets(per_class, c)
  key = jax.random.fold_in(jax.random.key(config.seed), 80)
  x0, _ = synthesize.real_init(jax.random.fold_in(key, 2), ds.train, labels)
  synth = synthesize.make_synthesizer(
    clf.apply_fn, **common.synth_kwargs(recipe, info)
  )
  state = synth.init_fn(jax.random.fold_in(key, 0), clf.params, x0, labels)
  entropy_fn = jax.jit(
    lambda p, x: synthesize.describe(clf.apply_fn, p, x, labels)["entropy"]
  )
  every = max(1, steps // 30)
  rec_steps, rec = [0], [np.asarray(entropy_fn(clf.params, state.x))]
  step_key = jax.random.fold_in(key, 1)
  for t in range(1, steps + 1):
    state, _ = synth.step(state, clf.params, labels, step_key)
    if t % every == 0 or t == steps:
      rec_steps.append(t)
      rec.append(np.asarray(entropy_fn(clf.params, state.x)))
  out = {
    "steps": np.asarray(rec_steps),
    "entropy": np.stack(rec),
    "lambdas": np.asarray(synth.lambdas_fn(state)),
    "labels": labels,
  }
  epath.Path(os.path.dirname(path)).mkdir(parents=True, exist_ok=True)
  wd.savez(path, digest=digest, **out)
  return out


def boundary_section(
  config, workdir, clf: common.Classifier, ds: data.Dataset, out_dir: str
) -> tuple[str, dict]:
  """Entropy curves during synthesis; entropy/margin of DSVs vs samples."""
  c = clf.info.num_classes
  k = config.report.detail_ipc
  zero = config.report.zero_shot_init
  curves = {}
  for init in ("real", zero):
    # Finished sub-runs of the few-shot section: read back, not re-run.
    _, _, run_dir = shot_run(config, workdir, init, k)
    with epath.Path(run_dir, "synthesize", "metrics.jsonl").open() as f:
      curves[f"{init} init, k={k}"] = [json.loads(line) for line in f]
  proto = entropy_protocol_run(config, workdir, clf, ds)
  order = np.argsort(-proto["lambdas"], kind="stable")
  n_top, n_low = min(5, len(order)), min(50, max(len(order) - 5, 1))
  top, low = order[:n_top], order[-n_low:]
  ent = proto["entropy"]
  proto_groups = {
    f"top-{n_top} lambda": ent[:, top].mean(1),
    f"lowest-{n_low} lambda": ent[:, low].mean(1),
    "all candidates": ent.mean(1),
  }
  fig = Figure(figsize=(9, 3))
  axes = fig.subplots(1, 2)
  ax = axes[0]
  for name, rws in curves.items():
    ax.plot([r["step"] for r in rws], [r["entropy"] for r in rws], label=name)
  ax.set_xlabel("synthesis step")
  ax.set_ylabel("mean predictive entropy")
  ax.set_title("synthesis (mean over candidates)", fontsize=8)
  ax.axhline(np.log(c), ls=":", c="grey", label="max (log C)")
  ax.legend(fontsize=7)
  ax = axes[1]
  for name, curve in proto_groups.items():
    ax.plot(proto["steps"], curve, label=name)
  ax.set_xlabel("step (x and lambda fitted, real candidates)")
  ax.set_title("the paper's protocol: grouped by final lambda", fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  distributed.primary_only(viz.save_png)(
    fig, os.path.join(out_dir, "entropy_curve.png")
  )

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
  proto_ends = {n: (float(v[0]), float(v[-1])) for n, v in proto_groups.items()}
  proto_txt = "; ".join(
    f"{n}: {a:.3f} -> {b:.3f}" for n, (a, b) in proto_ends.items()
  )
  md = (
    "## 3. Boundary evidence\n\n"
    "The paper reports that candidates' predictive entropy rises during "
    f"synthesis (about 0.2 to 1.0 on CIFAR-10). Measured here: {curve_txt}.\n\n"
    "The paper's own protocol (from its source): real training images as "
    "candidates, x and lambda fitted from a random lambda; the top-5-lambda "
    "candidates should gain entropy and the lowest-50 lose it. Measured on "
    f"{ent.shape[1]} candidates over {int(proto['steps'][-1])} steps: "
    f"{proto_txt}.\n\n"
    "![entropy during synthesis](entropy_curve.png)\n\n"
    "Entropy and logit margin (target logit minus the largest other) under "
    "the source classifier; higher entropy / lower margin = closer to the "
    "decision boundary.\n\n" + "\n".join(lines) + "\n"
  )
  return md, {
    "entropy_curves": firsts,
    "entropy_protocol": proto_ends,
    "groups": groups,
  }


def _per_class_accuracy(clf, ds) -> np.ndarray:
  pred = models.predict(clf.apply_fn, clf.params, ds.test["image"]).argmax(-1)
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
  r, p_r = float("nan"), float("nan")
  if np.std(sums) > 0 and np.std(acc) > 0 and c > 2:
    from scipy import stats

    r, p_r = (float(v) for v in stats.pearsonr(sums, acc))
  fig = Figure(figsize=(4, 3))
  ax = fig.subplots()
  ax.scatter(sums, acc)
  for k in range(c):
    ax.annotate(clf.info.class_names[k], (sums[k], acc[k]), fontsize=6)
  ax.set_xlabel("sum of lambda over the class")
  ax.set_ylabel("test accuracy of the class")
  ax.set_title(f"Pearson r = {r:.3f}", fontsize=9)
  fig.tight_layout()
  distributed.primary_only(viz.save_png)(
    fig, os.path.join(out_dir, "lambda_vs_accuracy.png")
  )
  lines = ["| class | sum lambda | test accuracy % |", "|---|---|---|"]
  for k in range(c):
    lines.append(
      f"| {clf.info.class_names[k]} | {sums[k]:.4g} | {100 * acc[k]:.2f} |"
    )
  md = (
    "## 4. Per-class sum of lambda vs per-class test accuracy\n\n"
    f"Pearson correlation **r = {r:.3f}** over {c} classes (two-sided p = "
    f"{p_r:.2g}; paper: 0.78 on CIFAR-10).\n\n"
    "![lambda vs accuracy](lambda_vs_accuracy.png)\n\n"
    + "\n".join(lines)
    + "\n"
  )
  return md, {
    "pearson": r,
    "pearson_p": p_r,
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
  with_counts: bool = False,
) -> dict[float, Any]:
  """How often `x + r ||x|| a / ||a||` is predicted as a's class.

  Every added image `a` (class `added_labels`) is added to every real image
  `x` of another class that the model classifies correctly.

  Returns:
    `{r: fraction of (a, x) pairs whose prediction flips to a's class}`;
    with `with_counts`, `{r: (flipped pairs, pairs)}`.
  """
  pred = models.predict(apply_fn, params, images).argmax(-1)
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
      p = models.predict(apply_fn, params, mixed).argmax(-1)
      hits += int(np.sum(p == la))
      total += len(x)
    out[float(r)] = (hits, total) if with_counts else hits / max(total, 1)
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
  kw = {
    "pixel_min": clf.info.pixel_min,
    "pixel_max": clf.info.pixel_max,
    "with_counts": True,
  }
  tx, ty = ds.test["image"][test_idx], ds.test["label"][test_idx]
  dsv_counts = flip_rates(
    clf.apply_fn, clf.params, imgs, labs, tx, ty, rc.flip_ratios, **kw
  )
  real_counts = flip_rates(
    clf.apply_fn,
    clf.params,
    ds.train["image"][real_idx],
    ds.train["label"][real_idx],
    tx,
    ty,
    rc.flip_ratios,
    **kw,
  )
  from scipy import stats

  lines = [
    "| added norm / image norm | DSV added: flip rate "
    "| real image added: flip rate | pairs | p (Fisher) |",
    "|---|---|---|---|---|",
  ]
  dsv_rates, real_rates, p_values, pairs = {}, {}, {}, {}
  for r in map(float, rc.flip_ratios):
    (hd, nd), (hr, nr) = dsv_counts[r], real_counts[r]
    dsv_rates[r], real_rates[r] = hd / max(nd, 1), hr / max(nr, 1)
    pairs[r] = nd
    p_values[r] = float(
      stats.fisher_exact([[hd, nd - hd], [hr, nr - hr]]).pvalue
    )
    lines.append(
      f"| {r:g} | {100 * dsv_rates[r]:.1f}% | {100 * real_rates[r]:.1f}% | "
      f"{nd} / {nr} | {p_values[r]:.2g} |"
    )
  md = (
    "## 5. Decision criteria (Appendix F)\n\n"
    f"One DSV per class (from the synthesize stage) added to {rc.flip_images} "
    "correctly classified test images of every other class at a norm "
    "relative to the image's; the flip rate counts predictions that change to "
    "the DSV's class. Control: one random real training image of the same "
    "class added at the same norm. p: two-sided Fisher exact test of the "
    "two flip counts (pairs share test images, so it is indicative).\n\n"
    + "\n".join(lines)
    + "\n"
  )
  return md, {
    "dsv": dsv_rates,
    "real": real_rates,
    "p": p_values,
    "pairs": pairs,
  }


def ablation_section(config, workdir, clf, rows: RetrainRows, out_dir: str):
  """Primal-only synthesis against the full DeepKKT loss."""
  k = config.report.detail_ipc
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
    pred = models.predict(indep.apply_fn, indep.params, x).argmax(-1)
    return float(np.mean(pred == y))

  res = {
    name: {
      "agreement": agreement(dsv),
      "classical_agreement": rows.classical_agreement(*_active_hard(dsv)),
      "retrain": rows(label, *_active_hard(dsv)),
    }
    for name, label, dsv in (
      ("full", f"full {zero} k={k}", full),
      ("primal_only", f"primal-only {zero} k={k}", primal),
    )
  }
  res["p_retrain"] = reproduction.welch_p(
    res["full"]["retrain"]["accuracies"],
    res["primal_only"]["retrain"]["accuracies"],
  )
  for name, d in (("full", full_dir), ("primal_only", primal_dir)):
    src = os.path.join(d, "synthesize", "grid.png")
    dst = os.path.join(out_dir, f"ablation_{name}.png")
    if distributed.is_primary():
      epath.Path(src).copy(dst, overwrite=True)
  md = (
    "## 6. Loss ablation: primal-only vs full DeepKKT\n\n"
    f"{k} candidates per class from {zero} init. Agreement: fraction of "
    "survivors an independently trained classifier (same recipe without the "
    "finishing phase, another "
    "seed) assigns to the target class; classical: the same for pixel "
    "classifiers fitted on the real training split (section 1). p: Welch "
    "t-test of the retrained accuracies.\n\n"
    "| loss | independent agreement | classical agreement | retrained test "
    "accuracy % |\n|---|---|---|---|\n"
    + "".join(
      f"| {title} | {res[n]['agreement']:.2f} | "
      f"{res[n]['classical_agreement']:.2f} | {_pct(res[n]['retrain'])} |\n"
      for n, title in (("full", "full DeepKKT"), ("primal_only", "primal only"))
    )
    + f"\np (full vs primal only) = {res['p_retrain']:.2g}.\n\n"
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
