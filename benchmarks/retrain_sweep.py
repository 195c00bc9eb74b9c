r"""Validation sweep of the retraining recipe (`config.retrain`).

The report compares DSVs with random real images under ONE retraining recipe
(architecture, steps, augmentation, optimiser). This script picks that recipe
on the VALIDATION split: for every grid point (learning rate x batch size x
steps x augmentation) it retrains K fresh models of the classifier's
architecture on each set and prints validation accuracy mean +- std. Test
accuracy is never touched here.

Sets (rows):
  random<k>  k random real training images per class (fixed key); always.
  dsv        the workdir's synthesized set (synthesize/), if present.
  select     the workdir's selected set (select/), if present.
`--sets random` tunes on random images only: the recipe then cannot have
been chosen to favour DSVs.

  python benchmarks/retrain_sweep.py --config digits --workdir W \
      --learning_rates 1e-4,1e-3 --batch_sizes 32,256 --steps 200,400
"""

import argparse
import itertools
import os
import time

import jax
import numpy as np

from dsv_jax import artifacts, configs
from dsv_jax.experiment import common
from dsv_jax.experiment.stages import retrain as retrain_stage

SET_DIRS = {"dsv": "synthesize", "select": "select"}


def floats(s: str) -> list[float]:
  return [float(v) for v in s.split(",") if v]


def ints(s: str) -> list[int]:
  return [int(v) for v in s.split(",") if v]


def bools(s: str) -> list[bool]:
  out = []
  for v in s.split(","):
    if v.lower() not in ("true", "false", "1", "0"):
      raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")
    out.append(v.lower() in ("true", "1"))
  return out


def load_sets(args, config, ds, num_classes):
  """``{name: (images, int labels)}`` for the requested rows."""
  sets = {}
  key = jax.random.fold_in(jax.random.key(args.seed), 6)
  for name in args.sets:
    if name == "random":
      continue
    if name not in SET_DIRS:
      raise SystemExit(
        f"--sets: unknown set {name!r}; known: random, dsv, select."
      )
    path = os.path.join(args.workdir, SET_DIRS[name])
    if not os.path.exists(os.path.join(path, artifacts.NPZ)):
      raise SystemExit(f"--sets {name}: no DSV set at {path} (run its stage).")
    dsv, _ = artifacts.load_dsv(path)
    sets[name] = retrain_stage.set_rows(dsv, soft=False)
  if "random" in args.sets:
    for i, k in enumerate(args.ipc):
      labels = np.repeat(np.arange(num_classes, dtype=np.int32), k)
      sets[f"random{k}"] = retrain_stage.random_like(
        jax.random.fold_in(key, i), ds.train, labels
      )
  return sets


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="digits", help="packaged config name")
  p.add_argument("--workdir", required=True, help="has classifier/ (and sets)")
  p.add_argument(
    "--sets", default="random,dsv,select", type=lambda s: s.split(",")
  )
  p.add_argument(
    "--ipc",
    default="1,10",
    type=ints,
    help="images per class of the random rows",
  )
  p.add_argument("--learning_rates", default="1e-4,1e-3", type=floats)
  p.add_argument("--batch_sizes", default="32,256", type=ints)
  p.add_argument("--steps", default="200,400,1000", type=ints)
  p.add_argument(
    "--flip",
    default="false",
    type=bools,
    help="comma list of augmentation flip settings",
  )
  p.add_argument("--max_shift", default="1", type=ints)
  p.add_argument(
    "--weight_decay",
    default=None,
    type=float,
    help="default: the config's retrain.weight_decay",
  )
  p.add_argument("--num_models", default=5, type=int)
  p.add_argument(
    "--seed",
    default=None,
    type=int,
    help="default: the config's seed (sets and init seeds)",
  )
  args = p.parse_args()

  config = configs.get_config(args.config)
  r = config.retrain
  args.seed = config.seed if args.seed is None else args.seed
  wd = r.weight_decay if args.weight_decay is None else args.weight_decay
  clf = common.load_classifier(args.workdir)
  ds = common.load_data(config)
  sets = load_sets(args, config, ds, clf.info.num_classes)
  val = ds.split("validation")
  # Each grid point is the config's recipe with the swept keys replaced, run
  # by the retrain stage's own `retrain_sets` on the validation split.
  config.seed = args.seed
  r.update(eval_split="validation", num_models=args.num_models, weight_decay=wd)
  print(
    f"config {args.config}, classifier {args.workdir}, "
    f"validation n={len(val['label'])}, K={args.num_models}, wd={wd:g}, "
    f"JAX {jax.__version__} on {jax.devices()[0].platform}"
  )
  print("| set | n | lr | batch | steps | flip | shift | val acc | time |")
  print("|---|---|---|---|---|---|---|---|---|")
  t_all = time.perf_counter()
  grid = itertools.product(
    args.learning_rates,
    args.batch_sizes,
    args.steps,
    args.flip,
    args.max_shift,
  )
  for lr, bs, steps, flip, shift in grid:
    r.update(
      learning_rate=lr, batch_size=bs, steps=steps, flip=flip, max_shift=shift
    )
    rows = retrain_stage.retrain_sets(config, clf, ds, sets)
    for name, row in rows.items():
      print(
        f"| {name} | {row['num_images']} | {lr:g} | {bs} | {steps} | {flip} | "
        f"{shift} | {100 * row['mean']:.1f} +- {100 * row['std']:.1f} | "
        f"{row['time_s']:.0f} s |",
        flush=True,
      )
  print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
  main()
