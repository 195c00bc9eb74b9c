"""The paper's experiments (Tables 1-2, figures, Appendix F) as one report.

`run_report(config, workdir)` is the `report` stage: it reads what the
earlier stages wrote into `workdir` (classifier, selection, DSV set, edit and
interpolation strips), runs the extra sub-experiments a table needs in
`workdir/report/runs/<name>/` (`report.cache`: each a resumable stage of its
own, skipped when already finished with the same config) and writes
`workdir/report/report.md` with its figures (`report.sections`) and
`results.json`, from which `report.reproduction` writes the README's
reproduction table.

Fairness rules, enforced by construction:
  * every retraining row uses the same recipe (`config.retrain`: the
    classifier's architecture, steps, augmentation, learning rate) and the
    same seeds; only the training images differ;
  * hard labels everywhere (soft targets only where a row says so);
  * the report evaluates on the test split only; settings are chosen on the
    validation split beforehand and fixed in the config.
"""

import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from dsv_jax import checkpoints, data, distributed
from dsv_jax.experiment import common, sources
from dsv_jax.experiment import workdir as wd
from dsv_jax.experiment.report.cache import RetrainRows
from dsv_jax.experiment.report.regime import regime_section
from dsv_jax.experiment.report.sections import (
  ZERO_SHOT_INITS,
  ablation_section,
  boundary_section,
  coreset_section,
  decision_section,
  few_shot_section,
  health_lines,
  lambda_accuracy_section,
  strips_section,
)

SECTIONS = (
  "seed",
  "data",
  "model",
  "train",
  "kkt",
  "synth",
  "select",
  "edit",
  "interpolate",
  "retrain",
  "baseline",
  "report",
)
# Stages whose outputs the report reads (their records are in its hash).
INPUTS = ("train", "select", "synthesize", "edit", "interpolate", "retrain")


def stage_hash(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The report's hash: every section, the records of the stages it reads
  and the classifier."""
  inputs = {s: wd.record_digest(workdir, s) for s in INPUTS}
  inputs["classifier"] = wd.classifier_digest(workdir)
  return wd.config_hash(config, SECTIONS, inputs)


def validate_report_config(config: ml_collections.ConfigDict) -> None:
  rc = config.report
  for key in ("ipc", "coreset_ipc"):
    if not rc[key] or any(int(k) < 1 for k in rc[key]):
      raise ValueError(
        f"Config key report.{key}: need sizes >= 1, got {rc[key]}."
      )
  for key in ("el2n_models", "el2n_steps", "protocol_candidates"):
    if rc[key] < 1:
      raise ValueError(f"Config key report.{key}: must be >= 1.")
  if rc.zero_shot_init not in ZERO_SHOT_INITS:
    raise ValueError(
      f"Config key report.zero_shot_init: {rc.zero_shot_init!r} not in "
      f"{ZERO_SHOT_INITS}."
    )
  if rc.detail_ipc not in rc.ipc:
    raise ValueError(
      f"Config key report.detail_ipc: {rc.detail_ipc} must be one of "
      f"report.ipc {tuple(rc.ipc)}."
    )
  if config.synth.other_dataset not in data.KNOWN_NAMES and not str(
    config.synth.other_dataset
  ).startswith("tfds:"):
    raise ValueError(
      f"Config key synth.other_dataset: unknown dataset "
      f"{config.synth.other_dataset!r}; known: {', '.join(data.KNOWN_NAMES)}."
    )
  if rc.flip_images < 1 or not rc.flip_ratios:
    raise ValueError("Config keys report.flip_images / flip_ratios: empty.")
  if any(int(k) < 0 for k in rc.candidate_counts):
    raise ValueError(
      "Config key report.candidate_counts: need counts >= 0 (0: twice the "
      f"training samples per class), got {tuple(rc.candidate_counts)}."
    )


def run_report(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes `workdir/report/report.md` with every section and its figures."""
  common.validate_config(config)
  validate_report_config(config)
  workdir = checkpoints.abspath(workdir)
  digest = stage_hash(config, workdir)
  if sources.is_external(config):
    return common.skipped(
      "report",
      "its experiments retrain and compare classifiers of this config's "
      f"recipe against the trained one; model.source={config.model.source}.",
    )
  if common.try_load_data(config) is None:
    return common.skipped(
      "report", f"it needs the {config.data.name} data, not here."
    )
  for stage in ("train", "select", "synthesize"):
    if wd.stage_record(workdir, stage) is None:
      raise FileNotFoundError(
        f"The report needs the {stage!r} stage's outputs in {workdir}; run "
        f"--stage={stage} (or --stage=all) first."
      )
  t0 = time.perf_counter()
  clf = common.load_classifier(workdir)
  ds = common.load_data(config)
  out_dir = os.path.join(workdir, "report")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
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
    *(
      [("regime", lambda: regime_section(config, workdir, rows, out_dir))]
      if config.report.candidate_counts
      else []
    ),
  ):
    ts = time.perf_counter()
    md, res = fn()
    logging.info(
      "Report section %s done in %.1f s.", name, time.perf_counter() - ts
    )
    sections.append(md)
    results[name] = res
  train_res = wd.stage_record(workdir, "train")["results"]
  header = (
    f"# DSV report: {clf.info.name}\n\n"
    + (
      "**Smoke run (tiny config): a few training steps on tiny models. "
      "The numbers test the plumbing, not the method.**\n\n"
      if config.report.smoke
      else ""
    )
    + f"Classifier: {clf.meta['model']['name']} "
    f"{json.dumps(clf.meta['model']['kwargs'], sort_keys=True)}, test "
    f"accuracy {100 * train_res['test_accuracy']:.2f}%. Seed {config.seed}; "
    f"config hash {digest}; written "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
    f"on {jax.device_count()} {jax.devices()[0].platform} device(s).\n"
    "Settings were fixed on the validation split; every accuracy here is on "
    "the test split.\n\n"
    + health_lines(train_res, wd.stage_record(workdir, "select"))
  )
  if distributed.is_primary():  # One copy, whatever the processes.
    with epath.Path(out_dir, "report.md").open("w") as f:
      f.write(header + "\n".join(sections))
  results["report_time_s"] = time.perf_counter() - t0
  results["meta"] = {
    "dataset": clf.info.name,
    "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"{os.cpu_count()} CPU cores",
    "config_hash": digest,
    "seed": config.seed,
  }
  results = json.loads(json.dumps(results, default=float))
  wd.write_json(os.path.join(out_dir, "results.json"), results, indent=1)
  summary = _summary(results, os.path.join(out_dir, "report.md"))
  wd.mark_done(workdir, "report", digest, summary)
  return summary


def _summary(results: dict, path: str) -> dict[str, Any]:
  """The headline numbers of a report (the stage record and CLI output)."""
  out = {"report": path, "report_time_s": round(results["report_time_s"], 1)}
  for name, row in results["few_shot"].items():
    out[f"few_shot/{name}"] = round(row["mean"], 4)
  for k, pair in results["coreset"].items():
    for which, row in pair.items():
      if isinstance(row, dict):
        out[f"coreset/{k}/{which}"] = round(row["mean"], 4)
      else:
        out[f"coreset/{k}/{which}"] = round(row, 4)
  out["lambda_accuracy_pearson"] = round(
    results["lambda_accuracy"]["pearson"], 3
  )
  return out


__all__ = [
  "INPUTS",
  "SECTIONS",
  "run_report",
  "stage_hash",
  "validate_report_config",
]
