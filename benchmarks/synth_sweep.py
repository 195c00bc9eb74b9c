r"""Validation sweep of k-shot synthesis settings against their real shots.

The paper's headline row: DSVs synthesized from k real images per class
(init "real") against training on those k images themselves. For every
grid point of synthesis settings (any `synth.*` keys) and every k, this
script synthesizes the k-shot DSVs from the classifier in `--workdir`,
retrains K fresh models on them with the config's retraining recipe and
prints VALIDATION accuracy next to the same recipe on the k real images the
DSVs started from (the same images for every grid point: the candidates'
key depends only on the seed). Test accuracy is never touched here.

Sub-runs are resumable and cached in `--out/<name>/` (a finished one with
the same settings is reused).

  python benchmarks/synth_sweep.py --config fashion_mnist --workdir W \
      --out /tmp/sweep --ipc 1,10 --grid synth.steps=50,200 \
      --grid synth.lr_x=0.003,0.01
"""

import argparse
import itertools
import os
import time

import ml_collections
import numpy as np

from dsv_jax import artifacts, configs, pipelines, report, retrain_stage


def parse_grid(items: list[str], config: ml_collections.ConfigDict):
  """``["synth.steps=50,200", ...]`` -> ``[("synth.steps", [50, 200]), ...]``.

  Values take the type of the config's current value.
  """
  grid = []
  for item in items:
    key, _, values = item.partition("=")
    section, _, field = key.partition(".")
    if section != "synth" or field not in config.synth:
      raise SystemExit(f"--grid {item!r}: not a config.synth key.")
    kind = type(config.synth[field])
    grid.append((key, [kind(v) for v in values.split(",")]))
  return grid


def synthesize(config, out_dir):
  """Runs (or reuses) a real-init synthesis sub-run; returns its DSV set.

  The report's own sub-run runner: a finished run with the same settings is
  reused, an interrupted one resumes.
  """
  report._run_stage_once(
    pipelines.run_synthesize, config, out_dir, "synthesize"
  )
  dsv, _ = artifacts.load_dsv(os.path.join(out_dir, "synthesize"))
  return dsv


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="digits", help="packaged config name")
  p.add_argument("--workdir", required=True, help="has classifier/")
  p.add_argument("--out", required=True, help="folder of the sub-runs")
  p.add_argument("--ipc", default="1,10", help="comma list of k")
  p.add_argument(
    "--grid",
    action="append",
    default=[],
    help="synth.<key>=v1,v2 (repeatable); none: the config's settings",
  )
  args = p.parse_args()

  config = configs.get_config(args.config)
  config.retrain.eval_split = "validation"
  grid = parse_grid(args.grid, config)
  keys = [k for k, _ in grid]
  clf = pipelines.load_classifier(args.workdir)
  ds = pipelines.load_data(config)
  r = config.retrain
  print(
    f"config {args.config}, classifier {args.workdir}, recipe lr "
    f"{r.learning_rate:g} batch {r.batch_size} steps {r.steps} flip {r.flip} "
    f"shift {r.max_shift}, K={r.num_models}, validation accuracy %"
  )
  print(
    f"| k | {' | '.join(keys) or 'settings'} | DSV (real init) | "
    "its k real images | DSV - real |"
  )
  print(f"|---|{'---|' * max(len(keys), 1)}---|---|---|")
  t0 = time.perf_counter()
  real_rows = {}
  for k in (int(v) for v in args.ipc.split(",")):
    for values in itertools.product(*(v for _, v in grid)):
      sub = ml_collections.ConfigDict(config.to_dict())
      sub.synth.classifier = os.path.abspath(args.workdir)
      sub.synth.init = "real"
      # As the report's k-shot sub-runs (report.shot_run).
      sub.synth.steps = config.report.synth_steps or config.synth.steps
      sub.synth.num_per_class = k
      settings = list(zip(keys, values, strict=True))
      for key, value in settings:
        sub.synth[key.split(".")[1]] = value
      name = "_".join([f"k{k}", *(f"{a}{b}" for a, b in settings)])
      dsv = synthesize(sub, os.path.join(args.out, name))
      sets = {"dsv": retrain_stage.set_rows(dsv, soft=False)}
      idx = np.asarray(dsv.source_index)
      if k not in real_rows:
        sets["real"] = (ds.train["image"][idx], ds.train["label"][idx])
      rows = retrain_stage.retrain_sets(config, clf, ds, sets)
      real_rows.setdefault(k, (idx, rows.get("real")))
      if not np.array_equal(real_rows[k][0], idx):
        raise RuntimeError("The real shots differ between grid points.")
      d, real = rows["dsv"], real_rows[k][1]
      cells = " | ".join(str(v) for v in values) or "config"
      print(
        f"| {k} | {cells} | {100 * d['mean']:.1f} +- {100 * d['std']:.1f} | "
        f"{100 * real['mean']:.1f} +- {100 * real['std']:.1f} | "
        f"{100 * (d['mean'] - real['mean']):+.1f} |",
        flush=True,
      )
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
