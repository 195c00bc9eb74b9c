"""Which ConvNet norm/pooling to default to: measured on the validation split.

The DSV paper's ConvNet uses max pooling; the dataset-distillation baselines
(DC/DSA/DM) use instance norm and average pooling. This trains each variant
with the dataset's default recipe over several seeds and prints validation
accuracy (mean +- std) and the time per training step, side by side.

  python benchmarks/convnet_variants.py --dataset=digits --seeds=3
  python benchmarks/convnet_variants.py --dataset=fashion_mnist --seeds=2 \
      --steps=1500 --max_train=20000
"""

import time

import jax
import numpy as np
from absl import app, flags

from dsv_jax import configs, data, models, train

_DATASET = flags.DEFINE_string("dataset", "digits", "Dataset config name.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per variant.")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps (0: config's).")
_MAX_TRAIN = flags.DEFINE_integer("max_train", 0, "Train subset (0: all).")

VARIANTS = (
  ("instance", "avg"),
  ("instance", "max"),
  ("none", "max"),
  ("batch", "max"),
  ("batch", "avg"),
)


def main(_):
  c = configs.get_config(_DATASET.value)
  steps = _STEPS.value or c.train.steps
  ds = data.load_dataset(
    c.data.name, max_train=_MAX_TRAIN.value or c.data.max_train or None
  )
  print(
    f"{c.data.name}: train {len(ds.train['label'])}, validation "
    f"{len(ds.validation['label'])}; ConvNet width {c.model.width} depth "
    f"{c.model.depth}; {steps} steps, batch {c.train.batch_size}; "
    f"{jax.devices()[0].device_kind}"
  )
  print(
    "| norm | pool | val accuracy (mean +- std) | ms / step (incl. compile) |"
  )
  print("|---|---|---|---|")
  for norm, pool in VARIANTS:
    accs, times = [], []
    for seed in range(_SEEDS.value):
      model = models.build_model(
        "convnet",
        image_shape=ds.info.image_shape,
        num_classes=ds.info.num_classes,
        key=jax.random.key(seed),
        width=c.model.width,
        depth=c.model.depth,
        norm=norm,
        pool=pool,
      )
      fm = models.functional(model)
      t0 = time.perf_counter()
      state, _ = train.train_classifier(
        fm,
        ds.train,
        jax.random.key(seed),
        steps=steps,
        batch_size=c.train.batch_size,
        learning_rate=c.train.learning_rate,
        lr_schedule=c.train.lr_schedule,
        weight_decay=c.train.weight_decay,
        flip=c.train.flip,
        max_shift=c.train.max_shift,
        log_every=steps,
      )
      times.append((time.perf_counter() - t0) / steps * 1e3)
      ev = train.make_eval_fn(fm)(
        state.params, state.model_state, ds.validation
      )
      accs.append(ev["accuracy"])
    print(
      f"| {norm} | {pool} | {100 * np.mean(accs):.2f} +- "
      f"{100 * np.std(accs):.2f} | {np.median(times):.1f} |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
