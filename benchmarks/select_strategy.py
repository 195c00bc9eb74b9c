"""Selection's two strategies side by side: host streaming vs device-resident.

`select.fit_lambdas(strategy="host")` streams each chunk from host memory on
every pass; `"device"` keeps the set on the devices and runs a pass as one
program over its chunks (`lax.scan` / `lax.map`). `"auto"` picks host on CPU
and device on GPU/TPU; this script measures both on whatever backend runs
it, interleaved, and prints the median seconds per FISTA iteration and
their ratio.

  python benchmarks/select_strategy.py [--n 2000] [--iters 10] [--repeats 3]
"""

import argparse
import statistics
import time

import jax
import numpy as np

from dsv_jax import data, models, select


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=2000)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  ds = data.load_dataset("fashion_mnist", max_train=args.n)
  model = models.build_model(
    "convnet",
    image_shape=ds.info.image_shape,
    num_classes=ds.info.num_classes,
    key=jax.random.key(0),
    width=32,
    depth=3,
  )
  apply_fn, params = models.nnx_apply_fn(model)
  x, y = ds.train["image"], ds.train["label"]
  times = {"host": [], "device": []}
  for _ in range(args.repeats):
    for strategy in times:
      t0 = time.perf_counter()
      _, fit = select.fit_lambdas(
        apply_fn,
        params,
        x,
        y,
        max_iters=args.iters,
        tol=0.0,
        chunk_size=args.chunk,
        strategy=strategy,
      )
      times[strategy].append((time.perf_counter() - t0) / fit.iterations)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(
    f"backend {jax.default_backend()}, {len(jax.devices())} device(s), "
    f"N {len(x)}, chunk {args.chunk}, {args.iters} iterations, "
    f"{args.repeats} repeats (first call includes compilation)"
  )
  for k, v in med.items():
    print(f"  {k:6s}: {v:.3f} s/iteration (all: {np.round(times[k], 3)})")
  print(f"  device / host: {med['device'] / med['host']:.2f}x")


if __name__ == "__main__":
  main()
