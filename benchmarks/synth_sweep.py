r"""Validation sweep of synthesis settings against k real images per class.

The paper's headline rows: DSVs synthesized from k real images per class
(`--init real`), from another data set (`--init other`, 0-shot) or from
noise (`--init noise`) against training on k real images. For every grid
point of settings (any `synth.*` or `kkt.*` keys) and every k, this script
synthesizes the DSVs from the classifier in `--workdir`, retrains K fresh
models on them with the config's retraining recipe and prints VALIDATION
accuracy next to the same recipe on the k real images the real-init DSVs
start from (the same images for every grid point and init: the candidates'
key depends only on the seed), and the DSVs' classical agreement (the
fraction that pixel classifiers fitted on the real training split assign
to their target; `dsv_jax.judges`, recorded by the synthesize stage) and
their pixel distance to the nearest real image of their class (real
validation images: `nn_distance_pixels_real`). Test accuracy is never
touched here.

Sub-runs are resumable and cached in `--out/<name>/` (a finished one with
the same settings is reused).

  python benchmarks/synth_sweep.py --config fashion_mnist --workdir W \
      --out /tmp/sweep --ipc 1,10 --grid synth.steps=50,200 \
      --grid synth.lr_x=0.003,0.01
  python benchmarks/synth_sweep.py --config digits --workdir W --out /tmp/s \
      --init noise --ipc 10 --grid synth.steps=300,2000 --grid kkt.beta_tv=0,1
"""

import argparse
import itertools
import os
import time

import ml_collections
import numpy as np

from dsv_jax import artifacts, configs
from dsv_jax.experiment import common
from dsv_jax.experiment.report import cache as report_cache
from dsv_jax.experiment.stages import retrain as retrain_stage
from dsv_jax.experiment.stages import synthesize as synthesize_stage


def parse_grid(items: list[str], config: ml_collections.ConfigDict):
  """``["synth.steps=50,200", ...]`` -> ``[("synth.steps", [50, 200]), ...]``.

  Values take the type of the config's current value.
  """
  grid = []
  for item in items:
    key, _, values = item.partition("=")
    section, _, field = key.partition(".")
    if section not in ("synth", "kkt") or field not in config[section]:
      raise SystemExit(f"--grid {item!r}: not a config.synth or kkt key.")
    kind = type(config[section][field])
    grid.append((key, [_parse(kind, v, item) for v in values.split(",")]))
  return grid


# An image init's recipe sets the prior weights from synth.image_priors /
# synth.other_priors (experiment.common.synthesis_recipe), so a grid value
# of these keys would be overwritten and the point would rerun another.
_RECIPE_OWNED = ("kkt.beta_tv", "kkt.beta_norm")


def check_keys(keys: list[str], init: str) -> None:
  """Refuses grid keys that ``init``'s recipe overwrites."""
  owned = [k for k in keys if k in _RECIPE_OWNED]
  if init != "noise" and owned:
    switch = "synth.other_priors" if init == "other" else "synth.image_priors"
    raise SystemExit(
      f"--grid {', '.join(owned)}: the {init} init's recipe sets the prior "
      f"weights itself; sweep {switch}=false,true instead."
    )


# For an image init, synth.steps / synth.lr_x of a grid point are its
# recipe's own keys: the synthesize stage derives the recipe from them
# (common.synthesis_recipe), as it does for the report's sub-runs.
_RECIPE_KEYS = {
  "real": {
    "synth.steps": "synth.image_steps",
    "synth.lr_x": "synth.image_lr_x",
  },
  "other": {
    "synth.steps": "synth.other_steps",
    "synth.lr_x": "synth.other_lr_x",
  },
}


def sub_config(config, init: str, settings: list[tuple[str, object]]):
  """The config a grid point runs, in the form the report's sub-runs pass
  to the synthesize stage: not yet derived, so the stage derives ``init``'s
  recipe from it once (deriving twice would reset a priors switch to its
  neutral value). synth.steps and synth.lr_x set the image recipe's keys
  for --init real or other; a priors switch chooses whether the config's
  prior weights apply."""
  sub = ml_collections.ConfigDict(config.to_dict())
  for key, value in settings:
    section, field = _RECIPE_KEYS.get(init, {}).get(key, key).split(".")
    sub[section][field] = value
  sub.synth.init = init
  return sub


def _parse(kind: type, text: str, item: str):
  """``text`` as a value of ``kind``; booleans by name (``bool("False")``
  is True)."""
  if kind is not bool:
    return kind(text)
  names = {"true": True, "1": True, "false": False, "0": False}
  if text.strip().lower() not in names:
    raise SystemExit(f"--grid {item!r}: {text!r} is not true or false.")
  return names[text.strip().lower()]


def synthesize(config, out_dir):
  """Runs (or reuses) a synthesis sub-run; returns (DSV set, its record).

  The report's own sub-run runner: a finished run with the same settings is
  reused, an interrupted one resumes.
  """
  results = report_cache.run_stage_once(synthesize_stage, config, out_dir)
  dsv, _ = artifacts.load_dsv(os.path.join(out_dir, "synthesize"))
  return dsv, results


def real_shots(config, clf, k):
  """Training indices of the k real images per class a real init starts
  from (the same candidates' key as the synthesize stage)."""
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.synth.init, sub.synth.num_per_class = "real", k
  key = common.synthesis_key(sub)
  return np.asarray(common.initial_candidates(sub, clf, key)[3])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="digits", help="packaged config name")
  p.add_argument("--workdir", required=True, help="has classifier/")
  p.add_argument("--out", required=True, help="folder of the sub-runs")
  p.add_argument("--ipc", default="1,10", help="comma list of k")
  p.add_argument(
    "--init",
    default="real",
    choices=("real", "other", "noise"),
    help="synth.init of the DSVs (real: k-shot; other, noise: 0-shot)",
  )
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
  check_keys(keys, args.init)
  clf = common.load_classifier(args.workdir)
  ds = common.load_data(config)
  r = config.retrain
  print(
    f"config {args.config}, classifier {args.workdir}, recipe lr "
    f"{r.learning_rate:g} batch {r.batch_size} steps {r.steps} flip {r.flip} "
    f"shift {r.max_shift}, K={r.num_models}, validation accuracy %"
  )
  print(
    f"| k | {' | '.join(keys) or 'settings'} | DSV ({args.init} init) | "
    "k real images | DSV - real | classical agreement | nn pixel distance "
    "(real: validation) |"
  )
  print(f"|---|{'---|' * max(len(keys), 1)}---|---|---|---|---|")
  t0 = time.perf_counter()
  real_rows = {}
  for k in (int(v) for v in args.ipc.split(",")):
    for values in itertools.product(*(v for _, v in grid)):
      settings = list(zip(keys, values, strict=True))
      sub = sub_config(config, args.init, settings)
      sub.synth.classifier = os.path.abspath(args.workdir)
      sub.synth.num_per_class = k
      name = "_".join([f"{args.init}_k{k}", *(f"{a}{b}" for a, b in settings)])
      dsv, record = synthesize(sub, os.path.join(args.out, name))
      sets = {"dsv": retrain_stage.set_rows(dsv, soft=False)}
      idx = real_shots(sub, clf, k)
      if k not in real_rows:
        sets["real"] = (ds.train["image"][idx], ds.train["label"][idx])
      rows = retrain_stage.retrain_sets(config, clf, ds, sets)
      real_rows.setdefault(k, (idx, rows.get("real")))
      if not np.array_equal(real_rows[k][0], idx):
        raise RuntimeError("The real shots differ between grid points.")
      d, real = rows["dsv"], real_rows[k][1]
      cells = " | ".join(str(v) for v in values) or "config"
      agree = record.get("classical_agreement", float("nan"))
      print(
        f"| {k} | {cells} | {100 * d['mean']:.1f} +- {100 * d['std']:.1f} | "
        f"{100 * real['mean']:.1f} +- {100 * real['std']:.1f} | "
        f"{100 * (d['mean'] - real['mean']):+.1f} | {agree:.2f} | "
        f"{record.get('nn_distance_pixels', float('nan')):.2f} "
        f"({record.get('nn_distance_pixels_real', float('nan')):.2f}) |",
        flush=True,
      )
  print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
