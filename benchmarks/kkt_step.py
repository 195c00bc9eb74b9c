r"""Benchmark: one DeepKKT gradient step against one training step.

For each N (number of candidates) and each ConvNet variant, times, side by
side in one process (all jitted, compilation excluded and reported apart,
runs interleaved, medians over --repeats):

* ``train``: value and gradient of the mean cross-entropy w.r.t. params (the
  plain training step on the same batch);
* ``kkt_fast``: value and gradient of ``kkt.deepkkt_loss`` w.r.t. x and
  lambdas with ``method="fast"`` (the custom VJP: forward-over-reverse);
* ``kkt_reverse``: the same with ``method="reverse"`` (reverse-over-reverse);
* ``kkt_fast_chunked``: ``kkt_fast`` streaming over --chunk_size candidates
  at a time (``lax.scan``), the bounded-memory mode;
* ``kkt_per_sample`` (only at --per_sample_n): the same loss built from
  explicit per-sample gradients (``jax.vmap`` of ``jax.grad``).

Times are wall-clock and process CPU time (all threads); on a machine
shared with other jobs the CPU time is the steadier of the two.

Memory: XLA's ``compiled.memory_analysis()`` of every executable (temporary
buffers, i.e. activations and intermediates; arguments and outputs apart),
compared with N x P x 4 bytes, the size of a materialised per-sample
gradient matrix.

  python benchmarks/kkt_step.py                # the README numbers
  python benchmarks/kkt_step.py --quick        # a smoke run in ~1 minute
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from dsv_jax import kkt, models

VARIANTS = {"instance-avg": ("instance", "avg"), "none-max": ("none", "max")}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 500])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--variants",
    nargs="+",
    default=["instance-avg"],
    choices=sorted(VARIANTS),
  )
  parser.add_argument(
    "--per_sample_n",
    type=int,
    nargs="*",
    default=[10],
    help="Ns at which to also time the explicit per-sample (vmap) step "
    "(slow: about 100x the training step, so small N only).",
  )
  parser.add_argument(
    "--distance", default="l1_mean", choices=list(kkt.DISTANCES)
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="N=10,50, width 32, 2 repeats, instance-avg only.",
  )
  parser.add_argument(
    "--chunk_size",
    type=int,
    default=0,
    help="Also time kkt_fast with this chunk_size where it is < N (0: off; "
    "slow on XLA:CPU, see README).",
  )
  parser.add_argument("--json", default=None, help="Write results here.")
  args = parser.parse_args(argv)
  if args.quick:
    args.n, args.width, args.repeats = [10, 50], 32, 2
    args.chunk_size = 10
    args.variants, args.per_sample_n = ["instance-avg"], [10]
  return args


def flat_distance(params, g, distance):
  """kkt.stationarity_loss's distances on explicit flattened vectors."""
  theta, g = ravel_pytree(params)[0], ravel_pytree(g)[0]
  if distance == "l1_mean":
    return jnp.mean(jnp.abs(theta + g))
  if distance == "l2_sq":
    return jnp.sum(jnp.square(theta + g))
  return 1.0 + theta @ g / (jnp.linalg.norm(theta) * jnp.linalg.norm(g))


def make_steps(apply_fn, distance, chunk_size):
  """The jitted steps, each a function of (params, x, targets, lambdas)."""

  def train_loss(params, x, targets):
    return optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(params, x), targets
    ).mean()

  def train(params, x, targets, lambdas):
    del lambdas
    return jax.value_and_grad(train_loss)(params, x, targets)

  def kkt_step(method, chunk_size=None):
    def loss(x, lambdas, params, targets):
      return kkt.deepkkt_loss(
        apply_fn,
        params,
        x,
        targets,
        lambdas,
        distance=distance,
        method=method,
        chunk_size=chunk_size,
      )

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return lambda params, x, targets, lambdas: grad_fn(
      x, lambdas, params, targets
    )

  def per_sample_loss(x, lambdas, params, targets):
    # The obvious formulation: materialise G (N x P), contract with lambda.
    per_sample = kkt.per_sample_grads(apply_fn, params, x, targets)
    g = jax.tree.map(lambda gi: jnp.tensordot(lambdas, gi, 1), per_sample)
    stationarity = flat_distance(params, g, distance)
    primal = kkt.primal_loss(apply_fn(params, x), targets)
    return stationarity + primal

  per_sample_grad = jax.value_and_grad(per_sample_loss, argnums=(0, 1))

  return {
    "train": train,
    "kkt_fast": kkt_step("fast"),
    "kkt_reverse": kkt_step("reverse"),
    "kkt_fast_chunked": kkt_step("fast", chunk_size),
    "kkt_per_sample": lambda params, x, targets, lambdas: per_sample_grad(
      x, lambdas, params, targets
    ),
  }


def convnet(variant, args):
  """``(apply_fn, params)`` of the benchmark ConvNet (seed 0)."""
  norm, pool = VARIANTS[variant]
  model = models.ConvNet(
    in_channels=3,
    num_classes=10,
    image_size=args.image_size,
    width=args.width,
    depth=args.depth,
    norm=norm,
    pool=pool,
    rngs=nnx.Rngs(0),
  )
  return models.nnx_apply_fn(model)


def bench_variant(variant, args):
  apply_fn, params = convnet(variant, args)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  steps = make_steps(apply_fn, args.distance, args.chunk_size)
  rows = []
  for n in args.n:
    kx, kl = jax.random.split(jax.random.key(n))
    shape = (n, args.image_size, args.image_size, 3)
    x = jax.random.normal(kx, shape)
    targets = jnp.arange(n) % 10
    lambdas = jax.random.uniform(kl, (n,), minval=0.1, maxval=1.0)
    inputs = (params, x, targets, lambdas)
    names = ["train", "kkt_fast", "kkt_reverse"]
    if args.chunk_size and args.chunk_size < n:
      names.append("kkt_fast_chunked")
    if n in args.per_sample_n:
      names.append("kkt_per_sample")
    compiled, compile_s, memory = {}, {}, {}
    for name in names:
      start = time.perf_counter()
      compiled[name] = jax.jit(steps[name]).lower(*inputs).compile()
      compile_s[name] = time.perf_counter() - start
      analysis = compiled[name].memory_analysis()
      memory[name] = None if analysis is None else analysis.temp_size_in_bytes
      jax.block_until_ready(compiled[name](*inputs))  # warm-up run
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    repeats = {name: args.repeats for name in names}
    repeats["kkt_per_sample"] = max(1, min(2, args.repeats))
    for r in range(args.repeats):
      for name in names:  # interleaved: machine noise hits all alike
        if r >= repeats[name]:
          continue
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled[name](*inputs))
        times[name].append(time.perf_counter() - start)
        cpu_times[name].append(time.process_time() - cpu_start)
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu = {name: statistics.median(t) for name, t in cpu_times.items()}
    row = {
      "variant": variant,
      "n": n,
      "num_params": num_params,
      "median_s": median,
      "ratio_to_train": {k: v / median["train"] for k, v in median.items()},
      "median_cpu_s": cpu,
      "cpu_ratio_to_train": {k: v / cpu["train"] for k, v in cpu.items()},
      "compile_s": compile_s,
      "temp_bytes": memory,
      "per_sample_matrix_bytes": n * num_params * 4,
    }
    rows.append(row)
    print_row(row, flush=True)
  return rows


def print_row(row, flush=False):
  parts = [f"{row['variant']:>12} N={row['n']:<4}"]
  for name, t in row["median_s"].items():
    ratio = row["ratio_to_train"][name]
    mib = row["temp_bytes"][name]
    mib = "?" if mib is None else f"{mib / 2**20:.0f}MiB"
    cpu_ratio = row["cpu_ratio_to_train"][name]
    parts.append(
      f"{name}={t * 1e3:.0f}ms ({ratio:.2f}x; cpu {cpu_ratio:.2f}x, {mib})"
    )
  print("  ".join(parts), flush=flush)


def machine():
  model = platform.processor() or "unknown"
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {
    "cpu": model,
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
  }


def main(argv=None):
  args = parse_args(argv)
  info = machine()
  print(json.dumps(info))
  rows = []
  for variant in args.variants:
    rows.extend(bench_variant(variant, args))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {"machine": info, "args": vars(args), "rows": rows}, f, indent=1
      )


if __name__ == "__main__":
  main()
