"""The report's sections about the decision boundary: the entropy protocol,
lambda against per-class accuracy, prediction flips and the loss ablation."""

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from matplotlib.figure import Figure

from dsv_jax import (
  artifacts,
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
  independent_classifier,
  shot_run,
  sub_config,
  synth_run,
)
from dsv_jax.experiment.report.section_utils import (
  active_hard,
  load_selection,
  pct,
)
from dsv_jax.experiment.stages import synthesize as synthesize_stage


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
  imgs, labs = active_hard(dsv)
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
    x, y = active_hard(dsv)
    if not len(x):
      return 0.0
    pred = models.predict(indep.apply_fn, indep.params, x).argmax(-1)
    return float(np.mean(pred == y))

  res = {
    name: {
      "agreement": agreement(dsv),
      "classical_agreement": rows.classical_agreement(*active_hard(dsv)),
      "retrain": rows(label, *active_hard(dsv)),
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
      f"{res[n]['classical_agreement']:.2f} | {pct(res[n]['retrain'])} |\n"
      for n, title in (("full", "full DeepKKT"), ("primal_only", "primal only"))
    )
    + f"\np (full vs primal only) = {res['p_retrain']:.2g}.\n\n"
    "Full: ![full](ablation_full.png)\n\nPrimal only: "
    "![primal only](ablation_primal_only.png)\n"
  )
  return md, res
