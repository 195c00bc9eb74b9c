r"""The candidate-count regime of DSV synthesis, on two axes.

KKT reconstruction recovers training images when the candidates can
represent theta*: about twice as many candidates as training samples, on a
small training set. This script measures noise-init DSVs (the config's
noise recipe) with the report's own section (`experiment.report.regime`:
retrained test accuracy, classical agreement, best-match SSIM against
training and as many held-out images per class):

1. against the classifier's training-set size (`--train_sizes`, images per
   class; a fresh classifier of the config's recipe is trained on a
   stratified subset of that size), at twice its training samples per
   class (the cheap axis, first);
2. against the candidates per class (`--counts`; 0 = twice the training
   samples per class), for the classifier in `--workdir`.

Every synthesis, classifier and retraining row is cached under `--out`, so
an interrupted run resumes.

  python benchmarks/candidate_regime.py --workdir W --out /tmp/regime \
      --counts 10,50,100,0 --train_sizes 10,30
"""

import argparse
import json
import os
import shutil
import time

from dsv_jax import configs
from dsv_jax.experiment import common
from dsv_jax.experiment.report import regime
from dsv_jax.experiment.report.cache import RetrainRows, run_stage_once
from dsv_jax.experiment.stages import train as train_stage


def measure(config, workdir):
  """The regime section of `config` on the classifier in `workdir`."""
  clf = common.load_classifier(workdir)
  ds = common.load_data(config)
  rows = RetrainRows(config, workdir, clf, ds)
  md, res = regime.regime_section(config, workdir, rows, workdir)
  return md, res


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="digits", help="packaged config name")
  p.add_argument("--workdir", required=True, help="has classifier/")
  p.add_argument("--out", required=True, help="folder of the sub-runs")
  p.add_argument("--counts", default="10,50,100,0")
  p.add_argument("--train_sizes", default="10,30", help="images per class")
  args = p.parse_args()
  t0 = time.perf_counter()
  out = {}

  # 1. The classifier's training-set size, at twice as many candidates.
  info_classes = None
  for n in (int(v) for v in args.train_sizes.split(",") if v):
    sub = configs.get_config(args.config)
    info_classes = info_classes or common.load_data(sub).info.num_classes
    sub.data.max_train = n * info_classes
    sub.report.candidate_counts = (0,)
    wd = os.path.join(args.out, f"train_{n}")
    run_stage_once(train_stage, sub, wd)
    md, res = measure(sub, wd)
    out[f"train_{n}"] = res
    print(f"### Classifier trained on {n} images per class\n\n{md}", flush=True)
  # 2. Candidates per class, on the given classifier (copied: the
  # sub-runs and retraining rows live beside it, in --out).
  counts_dir = os.path.join(args.out, "counts")
  if not os.path.isdir(os.path.join(counts_dir, "classifier")):
    shutil.copytree(
      os.path.join(args.workdir, "classifier"),
      os.path.join(counts_dir, "classifier"),
    )
  sub = configs.get_config(args.config)
  sub.report.candidate_counts = tuple(int(c) for c in args.counts.split(","))
  md, out["counts"] = measure(sub, counts_dir)
  print(md, flush=True)

  with open(os.path.join(args.out, "regime.json"), "w") as f:
    json.dump(out, f, indent=1, default=float)
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
