"""Classifier health of every packaged config, at its own image shape.

A classifier can be accurate and still near-uniform (mean predictive
entropy on its own training images close to ln C); then every boundary
measurement of DSV is void. This script trains each packaged config's
classifier with its own model and recipe (the `train` stage, finishing
phase included) and prints the health numbers the stage records: mean
entropy and margin on the training and validation images, logit scale,
accuracy, and the finishing phase's relative gradient.

Where a config's data is not available offline (mnist, cifar10, cifar100
on these machines), the classifier is trained on a stand-in of the same
shape: Fashion-MNIST's real images mapped to that shape (bilinear resize,
grey repeated to RGB; `synthesize.other_init`) with their 10 labels. The
stand-in tests the architecture and recipe at that input shape, not the
accuracy on the real data set.

  python benchmarks/config_health.py                     # every config
  python benchmarks/config_health.py --configs mnist cifar10 --max_steps 1500
  python benchmarks/config_health.py --configs cifar100 --max_steps 600 \
    --max_train 6000 --max_finish_steps 30
"""

import argparse
import os
import tempfile
import time

import jax

from dsv_jax import configs, data, synthesize
from dsv_jax.experiment import common
from dsv_jax.experiment.stages import train as train_stage

# Shapes and class counts of the configs whose data may be missing offline.
SHAPES = {
  "mnist": ((28, 28, 1), 10),
  "cifar10": ((32, 32, 3), 10),
  "cifar100": ((32, 32, 3), 100),
}


def stand_in(name: str, source: data.Dataset) -> data.Dataset:
  """`source`'s real images and labels in the shape of dataset `name`."""
  shape, num_classes = SHAPES[name]
  info = data.DatasetInfo(
    name=name,
    num_classes=num_classes,
    class_names=tuple(str(i) for i in range(num_classes)),
    image_shape=shape,
    mean=(0.5,) * shape[-1],
    std=(0.25,) * shape[-1],
    source="idx",
  )
  splits = {}
  for split in data.SPLITS:
    part = source.split(split)
    x, idx = synthesize.other_init(
      jax.random.key(0),
      part["image"],
      len(part["image"]),
      src_info=source.info,
      dst_info=info,
    )
    splits[split] = {"image": x, "label": part["label"][idx]}
  return data.Dataset(info=info, **splits)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(configs.CONFIGS))
  parser.add_argument(
    "--max_steps",
    type=int,
    default=0,
    help="cap on training steps (0: the config's own)",
  )
  parser.add_argument(
    "--max_train", type=int, default=0, help="cap on training images"
  )
  parser.add_argument(
    "--max_finish_steps",
    type=int,
    default=-1,
    help="cap on finishing iterations (-1: the config's own)",
  )
  parser.add_argument("--workdir", default="")
  args = parser.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="config_health_")
  rows = []
  fashion = None
  for name in args.configs:
    c = configs.get_config(name)
    if args.max_steps:
      c.train.steps = min(c.train.steps, args.max_steps)
    if args.max_finish_steps >= 0:
      c.train.finish_steps = min(c.train.finish_steps, args.max_finish_steps)
    if args.max_train:
      c.data.max_train = args.max_train
    source = "real"
    if name in SHAPES:
      try:
        common.load_data(c)
      except (FileNotFoundError, ValueError, RuntimeError):
        if fashion is None:
          fashion = data.load_dataset(
            "fashion_mnist", max_train=args.max_train or None
          )
        ds = stand_in(name, fashion)
        common.load_data = lambda cfg, ds=ds: ds
        source = "Fashion-MNIST stand-in"
    t0 = time.perf_counter()
    res = train_stage.run(c, os.path.join(root, name))
    common.load_data = _LOAD_DATA
    rows.append((name, source, c.train.steps, res, time.perf_counter() - t0))
    print(f"# {name} done in {rows[-1][-1]:.0f} s", flush=True)
  print(
    "\n| config | data | steps | val acc | entropy train / val (max ln C) "
    "| margin train | logit std train | finishing rel. grad | s |"
  )
  print("|---" * 9 + "|")
  for name, source, steps, r, secs in rows:
    fin = (
      f"{r['finish_rel_grad_before']:.3g} -> {r['finish_rel_grad_after']:.3g}"
      if "finish_rel_grad_after" in r
      else "-"
    )
    print(
      f"| {name} | {source} | {steps} | {100 * r['val_accuracy']:.2f} | "
      f"{r['train_entropy']:.3f} / {r['val_entropy']:.3f} "
      f"({r['max_entropy']:.3f}) | {r['train_margin']:.2f} | "
      f"{r['train_logit_std']:.2f} | {fin} | {secs:.0f} |"
    )


_LOAD_DATA = common.load_data

if __name__ == "__main__":
  main()
