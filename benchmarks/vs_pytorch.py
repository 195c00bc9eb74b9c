r"""Benchmark: the DeepKKT step in dsv_jax against the same loss in PyTorch.

One process, one CPU core, one thread per framework: the script pins
itself to ``--cpu`` (as ``taskset -c``) and sets the thread counts before
JAX and PyTorch are imported (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
``torch.set_num_threads(1)``, XLA's
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``).

Model: the ConvNet of ``benchmarks/kkt_step.py`` in both frameworks (3 x
[conv3x3-128, instance norm with affine, ReLU, 2x2 average pool], dense
to 10 classes; 32x32x3 inputs; float32), the PyTorch one built from the
same weights (ported from the JAX ``models.ConvNet``).

Loss: ``kkt.deepkkt_loss`` with its defaults: cosine stationarity distance
``1 - cos(theta*, -sum_i lambda_i grad_theta L_i)`` plus the gated mean
cross-entropy. PyTorch computes it as the existing PyTorch implementations
of DeepKKT do: ``torch.autograd.grad(..., create_graph=True)`` for the
weighted gradient, then a second backward to ``x`` and ``lambda`` (double
backward). The two are checked to agree on the same weights and inputs
(value and both gradients) before anything is timed.

Steps, timed interleaved (medians over ``--repeats`` of wall-clock and of
process CPU time; compilation and a warm-up run excluded):

* ``jax_train`` / ``torch_train``: value and gradient of the mean
  cross-entropy with respect to the parameters (a training step);
* ``jax_kkt`` / ``torch_kkt``: value and gradients of the DeepKKT loss
  with respect to ``x`` and ``lambda``;
* ``jax_kkt_reverse`` (``--reverse``): ``method="reverse"``.

Needs PyTorch, a benchmark-only extra (``pip install -e .[bench]``; the
CPU wheel: ``pip install torch --index-url
https://download.pytorch.org/whl/cpu``).

  python benchmarks/vs_pytorch.py              # N = 100, the README numbers
  python benchmarks/vs_pytorch.py --n 10 --repeats 2   # a smoke run
"""

import argparse
import functools
import json
import os
import platform
import statistics
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, nargs="+", default=[100])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--cpu", type=int, default=0, help="The core to use.")
  parser.add_argument(
    "--reverse", action="store_true", help="Also time method='reverse'."
  )
  parser.add_argument("--json", default=None, help="Write results here.")
  return parser.parse_args(argv)


def pin_to_one_thread(cpu):
  """One core, one thread for both frameworks; before they are imported."""
  os.sched_setaffinity(0, {cpu})
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"
  flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}"


def torch_convnet(params, *, depth):
  """The PyTorch ConvNet with the weights of the JAX one (NCHW layout)."""
  import numpy as np
  import torch
  from torch import nn

  layers = []
  for i in range(depth):
    kernel = np.asarray(params["convs"][i]["kernel"])  # HWIO
    conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
    conv.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
    conv.bias.data = torch.tensor(np.asarray(params["convs"][i]["bias"]))
    width = kernel.shape[3]
    # Instance norm with a learned affine, as the JAX GroupNorm(C groups).
    norm = nn.GroupNorm(width, width, eps=1e-5)
    norm.weight.data = torch.tensor(np.asarray(params["norms"][i]["scale"]))
    norm.bias.data = torch.tensor(np.asarray(params["norms"][i]["bias"]))
    layers += [conv, norm, nn.ReLU(), nn.AvgPool2d(2)]
  head = np.asarray(params["head"]["kernel"])  # [(h, w, c), K]
  side = int(round((head.shape[0] / width) ** 0.5))
  linear = nn.Linear(head.shape[0], head.shape[1])
  # JAX flattens NHWC as (h, w, c), PyTorch NCHW as (c, h, w).
  chw = head.reshape(side, side, width, -1).transpose(2, 0, 1, 3)
  linear.weight.data = torch.tensor(chw.reshape(head.shape[0], -1).T.copy())
  linear.bias.data = torch.tensor(np.asarray(params["head"]["bias"]))
  return nn.Sequential(*layers, nn.Flatten(), linear)


def torch_steps(model):
  import torch
  import torch.nn.functional as F

  params = list(model.parameters())
  tiny = torch.finfo(torch.float32).tiny

  def train(x, targets, lambdas):
    del lambdas
    loss = F.cross_entropy(model(x), targets)
    return loss, torch.autograd.grad(loss, params)

  def kkt(x, targets, lambdas):
    x = x.detach().requires_grad_(True)
    lambdas = lambdas.detach().requires_grad_(True)
    logits = model(x)
    losses = F.cross_entropy(logits, targets, reduction="none")
    g = torch.autograd.grad((lambdas * losses).sum(), params, create_graph=True)
    dot = sum((p.detach() * q).sum() for p, q in zip(params, g, strict=True))
    p_sq = sum((p.detach() ** 2).sum() for p in params)
    g_sq = sum((q * q).sum() for q in g)
    stationarity = 1 + dot / torch.sqrt(torch.clamp(p_sq * g_sq, min=tiny))
    correct = logits.argmax(-1) == targets
    primal = torch.where(correct, torch.zeros_like(losses), losses).mean()
    total = stationarity + primal
    gx, gl = torch.autograd.grad(total, (x, lambdas))
    return total, gx, gl

  return {"torch_train": train, "torch_kkt": kkt}


def jax_steps(apply_fn, reverse):
  # kkt_step.py's steps (this folder is on sys.path when run as a script),
  # with deepkkt_loss's default distance.
  import kkt_step

  from dsv_jax import kkt

  steps = kkt_step.make_steps(apply_fn, kkt.DEFAULT_DISTANCE, None)
  names = {"jax_train": "train", "jax_kkt": "kkt_fast"}
  if reverse:
    names["jax_kkt_reverse"] = "kkt_reverse"
  return {name: steps[key] for name, key in names.items()}


def check_agreement(jax_out, torch_out):
  """Relative max-differences of the value and both gradients."""
  import numpy as np

  ((value, _), (gx, gl)), (t_value, t_gx, t_gl) = jax_out, torch_out
  pairs = {
    "value": (np.asarray(value), t_value.detach().numpy()),
    "grad_x": (np.asarray(gx), t_gx.numpy().transpose(0, 2, 3, 1)),
    "grad_lambda": (np.asarray(gl), t_gl.numpy()),
  }
  return {
    name: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
    for name, (a, b) in pairs.items()
  }


def bench(args):
  import jax
  import kkt_step
  import numpy as np
  import torch

  torch.set_num_threads(1)
  torch.set_num_interop_threads(1)
  apply_fn, params = kkt_step.convnet("instance-avg", args)
  # A non-trivial affine in the norms (init is scale 1, bias 0).
  rng = np.random.default_rng(0)
  params["norms"] = jax.tree.map(
    lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype),
    params["norms"],
  )
  t_model = torch_convnet(params, depth=args.depth)
  j_steps = {
    name: jax.jit(step)
    for name, step in jax_steps(apply_fn, args.reverse).items()
  }
  t_steps = torch_steps(t_model)
  rows = []
  for n in args.n:
    shape = (n, args.image_size, args.image_size, 3)
    x = rng.standard_normal(shape).astype(np.float32)
    targets = (np.arange(n) % 10).astype(np.int32)
    lambdas = rng.uniform(0.1, 1.0, n).astype(np.float32)
    j_in = (params, jax.numpy.asarray(x), targets, lambdas)
    t_in = (
      torch.tensor(x.transpose(0, 3, 1, 2).copy()),
      torch.tensor(targets, dtype=torch.long),
      torch.tensor(lambdas),
    )
    calls = {k: functools.partial(f, *j_in) for k, f in j_steps.items()}
    calls.update({k: functools.partial(f, *t_in) for k, f in t_steps.items()})
    compile_s = {}
    for name in j_steps:
      start = time.perf_counter()
      jax.block_until_ready(calls[name]())  # compile + warm-up
      compile_s[name] = time.perf_counter() - start
    agreement = check_agreement(calls["jax_kkt"](), calls["torch_kkt"]())
    print(f"N={n} agreement (relative max-difference): {agreement}")
    if max(agreement.values()) > 1e-3:
      raise SystemExit("the JAX and PyTorch losses disagree: not timing.")
    calls["torch_train"]()  # warm-up
    times = {"wall": {k: [] for k in calls}, "cpu": {k: [] for k in calls}}
    for _ in range(args.repeats):
      for name, call in calls.items():  # interleaved
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(call())
        times["wall"][name].append(time.perf_counter() - start)
        times["cpu"][name].append(time.process_time() - cpu_start)
    row = {"n": n, "agreement": agreement, "compile_s": compile_s}
    for clock, samples in times.items():
      # Process CPU time is the steadier clock on a machine shared with
      # other jobs (one thread: it is the step's own computing time).
      median = {name: statistics.median(t) for name, t in samples.items()}
      row[clock] = {
        "median_s": median,
        "torch_kkt_over_jax_kkt": median["torch_kkt"] / median["jax_kkt"],
        "jax_kkt_over_train": median["jax_kkt"] / median["jax_train"],
        "torch_kkt_over_train": median["torch_kkt"] / median["torch_train"],
        "samples_s": samples,
      }
      print(
        f"N={n} {clock:>4}: "
        + "  ".join(f"{k}={v:.3f}s" for k, v in median.items())
        + f"  torch_kkt/jax_kkt={median['torch_kkt'] / median['jax_kkt']:.2f}x"
        + f"  jax kkt/train={median['jax_kkt'] / median['jax_train']:.2f}x"
        + "  torch kkt/train="
        + f"{median['torch_kkt'] / median['torch_train']:.2f}x",
        flush=True,
      )
    rows.append(row)
  info = {
    "cpu": platform.processor() or "unknown",
    "cpu_affinity": sorted(os.sched_getaffinity(0)),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "load_average": os.getloadavg(),
  }
  print(json.dumps(info))
  return info, rows


def main(argv=None):
  args = parse_args(argv)
  pin_to_one_thread(args.cpu)
  info, rows = bench(args)
  if args.json:
    with open(args.json, "w") as f:
      out = {"machine": info, "args": vars(args), "rows": rows}
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
