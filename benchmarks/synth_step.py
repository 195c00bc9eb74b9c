r"""Benchmark: one DSV synthesis step against the DeepKKT step at 2N.

A synthesis step (``synthesize.make_synthesizer(...).step_fn``: DeepKKT
terms on the N clean and on the N augmented candidates, TV and norm priors,
the Adam updates of x and lambda, clipping, the dual-feasibility mask)
evaluates the DeepKKT objective on 2N images, so its reference is the
``kkt_step`` benchmark's DeepKKT step (value and gradient of
``kkt.deepkkt_loss`` w.r.t. x and lambdas, ``method="fast"``) at 2N
candidates. Target (issue 4): synthesis step <= 1.2x that step.

Both are jitted, compiled outside the timing, run interleaved; medians
over --repeats rounds of --iters calls. Also reports candidate-steps/s
(N / synthesis step time).

Settings (``--setting``):
  * ``bench``: the kkt_step model, ConvNet width 128, depth 3 on 32x32x3
    (random weights);
  * a workdir holding a trained classifier (``--clf DIR``), e.g. the digits
    or Fashion-MNIST classifier of the `train` stage.

  python benchmarks/synth_step.py --n 100                 # bench model
  python benchmarks/synth_step.py --clf WORKDIR --n 100   # a classifier
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from dsv_jax import augment, kkt, models
from dsv_jax import synthesize as sz
from dsv_jax.experiment import common


def _model(args):
  if args.clf:
    clf = common.load_classifier(args.clf)
    info = clf.info
    return (
      clf.apply_fn,
      clf.params,
      info.image_shape,
      info.num_classes,
      (
        info.pixel_min,
        info.pixel_max,
      ),
    )
  net = models.build_model(
    "convnet",
    image_shape=(args.image_size, args.image_size, 3),
    num_classes=10,
    key=jax.random.key(0),
    width=args.width,
    depth=args.depth,
  )
  apply_fn, params = models.nnx_apply_fn(net)
  shape = (args.image_size, args.image_size, 3)
  return apply_fn, params, shape, 10, (None, None)


def _time(fn, iters):
  t = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def run(args, n):
  apply_fn, params, shape, c, (lo, hi) = _model(args)
  key = jax.random.key(0)
  labels = jnp.arange(n, dtype=jnp.int32) % c
  x = sz.noise_init(key, n, shape)
  synth = sz.make_synthesizer(
    apply_fn,
    x_tx=optax.adam(0.01),
    lambda_tx=optax.adam(0.05),
    eta=5.0,
    beta_tv=1e-3,
    beta_norm=1e-4,
    distance=args.distance,
    dual=args.dual,
    lambda_init=(0.5, 1.0),
    augment_fn=augment.make_augment(flip=0.5),
    pixel_min=lo,
    pixel_max=hi,
  )
  state = synth.init_fn(key, params, x, labels)
  step = synth.step

  x2 = jnp.concatenate([x, x])
  l2 = jnp.concatenate([labels, labels])
  lam2 = jnp.full((2 * n,), 0.5)

  def kkt_loss(xx, lam):
    return kkt.deepkkt_loss(
      apply_fn, params, xx, l2, lam, distance=args.distance
    )[0]

  kkt_step = jax.jit(jax.value_and_grad(kkt_loss, argnums=(0, 1)))

  t0 = time.perf_counter()
  state, _ = step(state, params, labels, key)
  jax.block_until_ready(state.x)
  compile_synth = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(kkt_step(x2, lam2))
  compile_kkt = time.perf_counter() - t0

  holder = {"state": state}

  def synth_call():
    holder["state"], m = step(holder["state"], params, labels, key)
    return holder["state"].x

  times = {"synth": [], "kkt_2n": []}
  for _ in range(args.repeats):
    times["synth"].append(_time(synth_call, args.iters))
    times["kkt_2n"].append(_time(lambda: kkt_step(x2, lam2), args.iters))
  med = {k: statistics.median(v) for k, v in times.items()}
  return {
    "setting": args.clf or f"bench w{args.width} d{args.depth}",
    "image_shape": list(shape),
    "num_params": models.num_params(params),
    "n": n,
    "distance": args.distance,
    "synth_step_ms": 1e3 * med["synth"],
    "kkt_step_2n_ms": 1e3 * med["kkt_2n"],
    "ratio": med["synth"] / med["kkt_2n"],
    "candidate_steps_per_s": n / med["synth"],
    "compile_s": {"synth": compile_synth, "kkt_2n": compile_kkt},
    "all_times_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
    "machine": f"{platform.machine()} {jax.devices()[0].device_kind} "
    f"x{jax.device_count()}",
    "date": time.strftime("%Y-%m-%d"),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clf", default="")
  p.add_argument("--n", type=int, nargs="+", default=[100])
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=3)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--distance", default="cosine", choices=kkt.DISTANCES)
  p.add_argument("--dual", default="softplus", choices=sz.DUALS)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--iters", type=int, default=5)
  args = p.parse_args()
  for n in args.n:
    print(json.dumps(run(args, n)), flush=True)


if __name__ == "__main__":
  main()
