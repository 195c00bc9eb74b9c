r"""The accelerator benchmark: one script, one JSON, under 8 minutes on a GPU.

Run it whenever a GPU or TPU is available, and record the JSON (date and
hardware are in it) in benchmarks/README.md:

  python benchmarks/device_suite.py --out device_suite.json
  python benchmarks/device_suite.py --quick   # CPU smoke run, ~2 minutes

What it measures, every timing a median over --repeats after a warm-up
call (compilation reported apart), on all local devices:

* ``kkt``: the DeepKKT step (value and gradient of `kkt.deepkkt_loss` w.r.t.
  x and lambdas, the fast method) against a training step (value and
  gradient of the mean cross-entropy w.r.t. params) on the same batch, for
  the ConvNet (3 x conv3x3-128, instance norm, avg-pool) and ResNet-18 at
  32x32x3, N = 100 and 1000; the ratio is the number to watch.
* ``select``: `select.fit_lambdas` seconds per FISTA iteration for both
  strategies (host streaming, device-resident) and per forward+backward
  pass over the set, on N samples of the ConvNet.
* ``synthesis``: candidates x steps per second of `synthesize.synthesize`
  (augmentation on, the paper's eta 5).
* ``retrain``: models x steps per second of `retrain.retrain` (K models,
  vmap, split over the devices).
* ``resnet50``: the synthesis step of ResNet-50 (torchvision layout,
  random weights, BatchNorm in inference mode) at 224x224, N = 4 and 16,
  with the ImageNet recipe of `benchmarks/resnet50_step.py`: seconds per
  step and XLA's compiled memory (temporaries, arguments) against the
  N x P x 4 bytes of per-sample gradients. Skipped by --quick: its compile
  alone takes about a minute on a 2-core CPU (resnet50_step.py --quick is
  its CPU smoke run).
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# The ResNet-50 recipe and measurements live in the script next to this
# one (run as a script, its folder is on sys.path), so both report the
# same step.
import resnet50_step

from dsv_jax import augment, kkt, models, retrain, select, synthesize


def _median_time(fn, repeats):
  jax.block_until_ready(fn())  # Warm-up (compiles).
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _compile_time(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def _model(name, args):
  kw = {"width": args.width, "depth": 3} if name == "convnet" else {}
  return models.build_model(
    name,
    image_shape=(args.size, args.size, 3),
    num_classes=10,
    key=jax.random.key(0),
    **kw,
  )


def bench_kkt(name, n, args):
  apply_fn, params = models.nnx_apply_fn(_model(name, args))
  x = jax.random.normal(jax.random.key(1), (n, args.size, args.size, 3))
  y = jnp.arange(n) % 10
  lam = jnp.full((n,), 0.5)

  @jax.jit
  def train(p, x, y):
    def loss(p):
      return jnp.mean(kkt.cross_entropy(apply_fn(p, x), y))

    return jax.value_and_grad(loss)(p)

  @jax.jit
  def kkt_step(p, x, lam, y):
    def loss(x, lam):
      return kkt.deepkkt_loss(apply_fn, p, x, y, lam)[0]

    return jax.value_and_grad(loss, argnums=(0, 1))(x, lam)

  out = {
    "compile_train_s": _compile_time(lambda: train(params, x, y)),
    "compile_kkt_s": _compile_time(lambda: kkt_step(params, x, lam, y)),
  }
  out["train_s"] = _median_time(lambda: train(params, x, y), args.repeats)
  out["kkt_s"] = _median_time(lambda: kkt_step(params, x, lam, y), args.repeats)
  out["kkt_over_train"] = out["kkt_s"] / out["train_s"]
  return out


def bench_select(args):
  apply_fn, params = models.nnx_apply_fn(_model("convnet", args))
  n = args.select_n
  x = np.asarray(
    jax.random.normal(jax.random.key(2), (n, args.size, args.size, 3))
  )
  y = np.arange(n) % 10
  out = {"n": n}
  for strategy in ("host", "device"):
    kw = {"chunk_size": args.chunk, "tol": 0.0, "strategy": strategy}
    _, fit = select.fit_lambdas(
      apply_fn, params, x, y, max_iters=args.select_iters, **kw
    )
    # The median iteration: the first ones also compile the solver's
    # programs, which fit_lambdas builds per call.
    out[f"{strategy}_s_per_iter"] = statistics.median(
      row["s_per_iter"] for row in fit.history[1:] or fit.history
    )

  @jax.jit
  def fwd_bwd(p, xc, yc):
    return jax.grad(lambda q: jnp.sum(kkt.cross_entropy(apply_fn(q, xc), yc)))(
      p
    )

  xc, yc = jnp.asarray(x[: args.chunk]), jnp.asarray(y[: args.chunk])
  per_chunk = _median_time(lambda: fwd_bwd(params, xc, yc), args.repeats)
  out["fwd_bwd_pass_s"] = per_chunk * n / args.chunk
  for strategy in ("host", "device"):
    out[f"{strategy}_iter_over_pass"] = (
      out[f"{strategy}_s_per_iter"] / out["fwd_bwd_pass_s"]
    )
  return out


def bench_synthesis(args):
  apply_fn, params = models.nnx_apply_fn(_model("convnet", args))
  n = args.synth_n
  synth = synthesize.make_synthesizer(
    apply_fn, augment_fn=augment.make_augment(flip=0.5)
  )
  x0 = synthesize.noise_init(jax.random.key(3), n, (args.size, args.size, 3))
  y = jnp.arange(n) % 10
  synthesize.synthesize(synth, params, jax.random.key(0), x0, y, steps=1)
  t0 = time.perf_counter()
  state = synthesize.synthesize(
    synth, params, jax.random.key(0), x0, y, steps=args.synth_steps
  )
  jax.block_until_ready(state.x)
  wall = time.perf_counter() - t0
  return {
    "n": n,
    "steps": args.synth_steps,
    "candidate_steps_per_s": n * args.synth_steps / wall,
  }


def bench_retrain(args):
  def model_fn(seed):
    return models.functional(
      models.build_model(
        "convnet",
        image_shape=(args.size, args.size, 3),
        num_classes=10,
        key=jax.random.key(seed),
        width=args.width,
        depth=3,
      )
    )

  x = np.asarray(
    jax.random.normal(jax.random.key(4), (100, args.size, args.size, 3))
  )
  y = np.arange(100) % 10
  kw = {
    "num_models": args.models,
    "batch_size": 100,
    "weight_decay": 5e-4,
    "flip": False,
    "max_shift": 2,
    "seed": 0,
    "vectorize": "auto",
  }
  retrain.retrain(model_fn, x, y, x[:10], y[:10], steps=2, **kw)  # Compile.
  res = retrain.retrain(
    model_fn, x, y, x[:10], y[:10], steps=args.retrain_steps, **kw
  )
  return {
    "models": args.models,
    "steps": args.retrain_steps,
    "vectorize": retrain.resolve_vectorize("auto"),
    "model_steps_per_s": args.models * args.retrain_steps / res.time_s,
  }


def bench_resnet50(args):
  r50 = resnet50_step.parse_args(["--size", "224", "--steps", "5"])
  synth, apply_fn, params, info, num_params = resnet50_step.build(r50)
  out = {"size": r50.size, "num_params": num_params}
  for n in (4, 16):
    step = resnet50_step.time_step(synth, params, info, n, r50.steps)
    # The training-gradient yardstick is left to resnet50_step.py: two more
    # compiles of ResNet-50 here would cost more than the step itself.
    mem = resnet50_step.step_memory(
      synth, apply_fn, params, info, n, num_params, step["compile_s"], False
    )
    out[f"n{n}"] = {
      "s_per_step": step["s_per_step"],
      "candidate_steps_per_s": step["candidate_steps_per_s"],
      "compile_s": step["compile_s"],
      "temp_bytes": mem["temp_bytes"],
      "argument_bytes": mem["argument_bytes"],
      "per_sample_bytes": mem["per_sample_bytes"],
      "finite": step["finite"],
    }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="CPU smoke run.")
  parser.add_argument("--out", default="device_suite.json")
  args = parser.parse_args()
  quick = args.quick
  args.size = 32
  args.width = 32 if quick else 128
  args.repeats = 2 if quick else 5
  args.kkt_n = [8] if quick else [100, 1000]
  args.kkt_models = ["convnet"] if quick else ["convnet", "resnet18"]
  args.select_n, args.chunk, args.select_iters = (
    (64, 32, 2) if quick else (10_000, 1000, 10)
  )
  args.synth_n, args.synth_steps = (8, 3) if quick else (500, 50)
  args.models, args.retrain_steps = (2, 3) if quick else (8, 100)
  dev = jax.devices()
  result = {
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in dev],
    "jax": jax.__version__,
    "host": platform.node(),
    "quick": quick,
    "kkt": {},
  }
  t_start = time.perf_counter()
  for name in args.kkt_models:
    for n in args.kkt_n:
      row = bench_kkt(name, n, args)
      result["kkt"][f"{name}_n{n}"] = row
      print(f"kkt {name} N={n}: {row}", flush=True)
  for key, fn in (
    ("select", bench_select),
    ("synthesis", bench_synthesis),
    ("retrain", bench_retrain),
  ):
    result[key] = fn(args)
    print(f"{key}: {result[key]}", flush=True)
  if quick:
    result["resnet50"] = {"skipped": "--quick"}
  else:
    result["resnet50"] = bench_resnet50(args)
  print(f"resnet50: {result['resnet50']}", flush=True)
  result["total_s"] = time.perf_counter() - t_start
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
  main()
