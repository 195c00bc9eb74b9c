r"""Benchmark: a DSV synthesis step of ResNet-50 at 224x224 (issue 19).

The model is `dsv_jax.resnet.ResNet50` (torchvision's layout), 1000
classes, random weights: cost and memory do not depend on the weights'
values, so no download is needed. BatchNorm runs on its running statistics
(`models.functional(model).eval_apply`), the mode DSV uses; the statistics
are closed over, so theta (what the stationarity condition differentiates)
is the ``nnx.Param`` leaves only, P = 25.6M.

The step is `synthesize.make_synthesizer(...).step` with the ImageNet
recipe: Adam on x and lambda, eta 5 (clean and augmented DeepKKT terms,
the fast stationarity VJP), `augment.make_augment` with the paper's
ImageNet strengths (translate 0.125, crop 0.2, cutout 0.15, flip 0.5,
noise 0.01), TV and norm priors, clipping to ImageNet's normalised pixel
range.

It reports:

* ``step``: for each --n, seconds per synthesis step (median of --steps
  calls after a warm-up call; wall-clock and process CPU time, all threads),
  with the compilation apart;
* ``memory``: for each --mem_n, XLA's ``memory_analysis()`` of the compiled
  step (compilation only, nothing runs): temporary buffers (activations and
  intermediates) and arguments (params, synthesis state), next to
  N x P x 4 bytes, what a method built on per-sample gradients would need
  for G alone, and the temporaries of a training step's gradient (mean
  cross-entropy w.r.t. params) on the same 2N images the synthesis step
  evaluates (clean and augmented): the activations of a plain backward
  pass, the yardstick. The synthesis temporaries grow with N x
  activations, not with N x P.

  python benchmarks/resnet50_step.py                    # the README numbers
  python benchmarks/resnet50_step.py --quick            # 64x64, ~4 minutes
  python benchmarks/resnet50_step.py --mem_n --n 4      # timing only
  python benchmarks/resnet50_step.py --n --mem_n 2 4 8  # memory only
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from dsv_jax import augment, kkt, models
from dsv_jax import synthesize as sz
from dsv_jax.data import imagenet

MIB = 2**20


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=224, help="Image side.")
  p.add_argument(
    "--n", type=int, nargs="*", default=[4], help="Ns to time (none: skip)."
  )
  p.add_argument(
    "--mem_n",
    type=int,
    nargs="*",
    default=[2, 4, 8],
    help="Ns whose compiled memory to report (none: skip).",
  )
  p.add_argument("--steps", type=int, default=3, help="Timed steps per N.")
  p.add_argument("--lr_x", type=float, default=0.01)
  p.add_argument("--lr_lambda", type=float, default=0.05)
  p.add_argument("--eta", type=float, default=5.0)
  p.add_argument("--beta_tv", type=float, default=40.0)
  p.add_argument("--beta_norm", type=float, default=1e-6)
  p.add_argument("--json", default=None, help="Also write the rows here.")
  p.add_argument(
    "--quick",
    action="store_true",
    help="Size 64, N = 4 timed for 2 steps, memory at N = 2, 4.",
  )
  args = p.parse_args(argv)
  if args.quick:
    args.size, args.steps, args.mem_n = 64, 2, [2, 4]
  return args


def build(args):
  """``(synth, apply_fn, params, info, P)``: the model and the recipe."""
  info = imagenet.imagenet_info(args.size)
  fm = models.functional(
    models.build_model(
      "resnet50",
      image_shape=info.image_shape,
      num_classes=info.num_classes,
      key=jax.random.key(0),
    )
  )
  state = fm.state

  def apply_fn(params, x):
    return fm.eval_apply(params, state, x)

  synth = sz.make_synthesizer(
    apply_fn,
    x_tx=optax.adam(args.lr_x),
    lambda_tx=optax.adam(args.lr_lambda),
    eta=args.eta,
    beta_tv=args.beta_tv,
    beta_norm=args.beta_norm,
    augment_fn=augment.make_augment(
      translate=0.125, crop=0.2, cutout=0.15, flip=0.5, noise=0.01
    ),
    pixel_min=info.pixel_min,
    pixel_max=info.pixel_max,
  )
  return synth, apply_fn, fm.params, info, models.num_params(fm.params)


def inputs(synth, params, info, n):
  key = jax.random.key(n)
  labels = jnp.arange(n, dtype=jnp.int32) * 97 % info.num_classes
  x0 = sz.noise_init(key, n, info.image_shape)
  return synth.init_fn(key, params, x0, labels), labels, key


def compile_step(synth, params, info, n):
  """The compiled step for N candidates, its compile seconds and inputs."""
  state, labels, key = inputs(synth, params, info, n)
  t0 = time.perf_counter()
  compiled = synth.step.lower(state, params, labels, key).compile()
  return compiled, time.perf_counter() - t0, (state, labels, key)


def time_step(synth, params, info, n, steps):
  compiled, compile_s, (state, labels, key) = compile_step(
    synth, params, info, n
  )
  state, _ = compiled(state, params, labels, key)  # Warm-up.
  jax.block_until_ready(state.x)
  wall, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, params, labels, key)
    jax.block_until_ready(state.x)
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {
    "n": n,
    "s_per_step": statistics.median(wall),
    "cpu_s_per_step": statistics.median(cpu),
    "all_s": wall,
    "compile_s": compile_s,
    "candidate_steps_per_s": n / statistics.median(wall),
    "finite": bool(jnp.isfinite(metrics["total"])),
  }


def train_temp_bytes(apply_fn, params, info, n):
  """Temporaries of a training step's gradient on n images (the yardstick)."""

  def train_grad(p, x, y):
    return jax.grad(lambda q: jnp.mean(kkt.cross_entropy(apply_fn(q, x), y)))(p)

  x = jnp.zeros((n, *info.image_shape))
  y = jnp.arange(n) % info.num_classes
  m = jax.jit(train_grad).lower(params, x, y).compile().memory_analysis()
  return None if m is None else m.temp_size_in_bytes


def step_memory(
  synth, apply_fn, params, info, n, num_params, compile_s=None, yardstick=True
):
  """The compiled step's memory for N; yardstick: also the training grad's.

  compile_s: where this N was timed already, jit's cache makes this compile
  free, so the first compile's time is passed in.
  """
  compiled, seconds, _ = compile_step(synth, params, info, n)
  m = compiled.memory_analysis()
  row = {
    "n": n,
    "compile_s": seconds if compile_s is None else compile_s,
    "per_sample_bytes": n * num_params * 4,
    "train_2n_temp_bytes": train_temp_bytes(apply_fn, params, info, 2 * n)
    if yardstick
    else None,
  }
  if m is None:  # Some backends do not report it.
    return {**row, "temp_bytes": None, "argument_bytes": None}
  return {
    **row,
    "temp_bytes": m.temp_size_in_bytes,
    "argument_bytes": m.argument_size_in_bytes,
    "output_bytes": m.output_size_in_bytes,
  }


def machine():
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
    "jax": jax.__version__,
    "date": time.strftime("%Y-%m-%d %H:%M"),
  }


def table(result):
  p = result["num_params"]
  lines = [
    f"ResNet-50 {result['size']}x{result['size']}x3, P = {p / 1e6:.1f}M",
    "| N | temp MiB | argument MiB | N x P x 4 MiB | train grad at 2N, "
    "temp MiB | compile s |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["memory"]:
    temp = r["temp_bytes"]
    temp = "?" if temp is None else f"{temp / MIB:.0f}"
    arg = r["argument_bytes"]
    arg = "?" if arg is None else f"{arg / MIB:.0f}"
    train = r["train_2n_temp_bytes"]
    train = "?" if train is None else f"{train / MIB:.0f}"
    lines.append(
      f"| {r['n']} | {temp} | {arg} | {r['per_sample_bytes'] / MIB:.0f} | "
      f"{train} | {r['compile_s']:.0f} |"
    )
  for r in result["step"]:
    lines.append(
      f"N = {r['n']}: {r['s_per_step']:.2f} s/step wall, "
      f"{r['cpu_s_per_step']:.2f} s CPU, compile {r['compile_s']:.0f} s"
    )
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  synth, apply_fn, params, info, num_params = build(args)
  result = {
    "machine": machine(),
    "size": args.size,
    "num_params": num_params,
    "recipe": {
      k: getattr(args, k)
      for k in ("lr_x", "lr_lambda", "eta", "beta_tv", "beta_norm")
    },
    "step": [],
    "memory": [],
  }
  print(json.dumps(result["machine"]), flush=True)
  for n in args.n:
    row = time_step(synth, params, info, n, args.steps)
    result["step"].append(row)
    print(json.dumps({"step": row}), flush=True)
  timed = {r["n"]: r["compile_s"] for r in result["step"]}
  for n in args.mem_n:
    row = step_memory(
      synth, apply_fn, params, info, n, num_params, timed.get(n)
    )
    result["memory"].append(row)
    print(json.dumps({"memory": row}), flush=True)
  mem = [r for r in result["memory"] if r["temp_bytes"] is not None]
  if len(mem) >= 2:
    # The growth of the temporaries per added candidate: activations of the
    # clean and augmented passes, against the 4 P bytes of one more
    # per-sample gradient.
    lo, hi = mem[0], mem[-1]
    per_n = (hi["temp_bytes"] - lo["temp_bytes"]) / (hi["n"] - lo["n"])
    result["temp_bytes_per_candidate"] = per_n
    result["temp_per_candidate_over_4p"] = per_n / (4 * num_params)
    if lo["train_2n_temp_bytes"] is not None:
      # The same growth of the training gradient on the candidate's 2
      # images: how many plain backward passes' activations a candidate
      # costs.
      train_n = hi["train_2n_temp_bytes"] - lo["train_2n_temp_bytes"]
      train_n /= hi["n"] - lo["n"]
      result["temp_per_candidate_over_train"] = per_n / train_n
  print(json.dumps(result), flush=True)
  print(table(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
