r"""Benchmark: memory and per-iteration cost of selection against N.

For every N, a fresh subprocess loads N Fashion-MNIST training images,
builds a ConvNet (width 32, depth 3, instance norm, average pooling; random
initialisation: memory and cost do not depend on the weights' values),
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), and runs
`select.fit_lambdas` for a few iterations. It reports:

* the process RSS with the data loaded, and the peak RSS during selection
  (``VmHWM``) minus that: the solver's own memory, which must not grow
  with N (G, P x N, is never formed; passes stream over chunks);
* the median seconds per solver iteration (after the first, which
  compiles) and the median seconds of one forward+backward pass of the
  mean cross-entropy over the same N samples in the same chunks (jitted,
  host loop; timed between solver iterations, so both see the same load),
  and their ratio (target: <= 3). With ``--passes > 0`` the peak RSS also
  covers those reference passes (bounded by the chunk as well); use
  ``--passes 0`` for the solver alone.

  python benchmarks/select_memory.py                       # N = 1k, 10k, 60k
  python benchmarks/select_memory.py --n 1000 --iters 2    # a smoke run
  python benchmarks/select_memory.py --n 60000 --iters 1 --passes 0 \
      --init zero                                          # memory only
"""

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def child(
  n: int, iters: int, chunk_size: int, width: int, passes: int, init: str
) -> dict:
  """One measurement in this process (run in a fresh subprocess)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dsv_jax import data, kkt, models, parallel, select

  ds = data.load_dataset("fashion_mnist", max_train=n)
  x = np.ascontiguousarray(ds.train["image"])
  labels = np.asarray(ds.train["label"], np.int32)
  del ds  # Keep only the N training images (and labels).
  model = models.build_model(
    "convnet",
    image_shape=x.shape[1:],
    num_classes=10,
    key=jax.random.key(0),
    width=width,
    depth=3,
  )
  apply_fn, params = models.nnx_apply_fn(model)
  mesh = parallel.make_mesh()

  # The reference: one forward+backward pass of the mean cross-entropy over
  # the same N samples, in the same chunks, accumulated over a host loop.
  @jax.jit
  def train_grad(acc, p, xc, tc):
    g = jax.grad(lambda q: jnp.mean(kkt.cross_entropy(apply_fn(q, xc), tc)))(p)
    return jax.tree.map(jnp.add, acc, g)

  def one_pass():
    acc = jax.tree.map(jnp.zeros_like, params)
    for s in range(0, n, chunk_size):
      xc, tc = x[s : s + chunk_size], labels[s : s + chunk_size]
      acc = train_grad(acc, params, xc, tc)
    jax.block_until_ready(acc)

  pass_times = []
  if passes:
    one_pass()  # Compile.

  def interleaved_pass(row):
    # Timed between solver iterations (outside their own timing), so both
    # see the same machine load.
    if len(pass_times) < passes and row["step"] >= 1:
      t0 = time.perf_counter()
      one_pass()
      pass_times.append(time.perf_counter() - t0)

  rss_data = _rss_mib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Reset VmHWM to the current RSS.
  t0 = time.perf_counter()
  _, info = select.fit_lambdas(
    apply_fn,
    params,
    x,
    labels,
    distance="l2_sq",
    init=init,
    max_iters=iters,
    tol=0.0,
    chunk_size=chunk_size,
    mesh=mesh,
    on_metrics=interleaved_pass,
  )
  total = time.perf_counter() - t0
  peak = _rss_mib("VmHWM")
  per_iter = [r["s_per_iter"] for r in info.history[1:]] or [
    info.history[0]["s_per_iter"]
  ]
  per_iter.sort()
  pass_times.sort()
  s_iter = per_iter[len(per_iter) // 2]
  s_pass = pass_times[len(pass_times) // 2] if passes else float("nan")
  return {
    "n": n,
    "num_params": models.num_params(params),
    "devices": jax.device_count(),
    "rss_with_data_mib": rss_data,
    "peak_rss_mib": peak,
    "solver_mib": peak - rss_data,
    "data_mib": x.nbytes / 2**20,
    "s_per_iter": s_iter,
    "s_per_pass": s_pass,
    "ratio": s_iter / s_pass,
    "fit_total_s": total - sum(pass_times),
    "iterations": info.iterations,
    "backtracks": sum(r["backtracks"] for r in info.history),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 60000])
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--chunk_size", type=int, default=1024)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument(
    "--passes",
    type=int,
    default=2,
    help="Timed reference passes (0: skip, e.g. for a memory-only run).",
  )
  parser.add_argument("--init", default="uniform", choices=["uniform", "zero"])
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    out = child(
      args.n[0], args.iters, args.chunk_size, args.width, args.passes, args.init
    )
    print("RESULT " + json.dumps(out), flush=True)
    return
  rows = []
  for n in args.n:
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      "--child",
      f"--n={n}",
      f"--iters={args.iters}",
      f"--chunk_size={args.chunk_size}",
      f"--width={args.width}",
      f"--passes={args.passes}",
      f"--init={args.init}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
      print(res.stdout[-3000:], res.stderr[-3000:])
      raise SystemExit(f"N={n} failed with exit code {res.returncode}")
    row = json.loads(lines[-1][len("RESULT ") :])
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(
    "\n| N | data MiB | RSS with data | peak RSS | solver MiB | s/iter | "
    "s/pass | iter/pass |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['n']} | {r['data_mib']:.0f} | {r['rss_with_data_mib']:.0f} | "
      f"{r['peak_rss_mib']:.0f} | {r['solver_mib']:.0f} | "
      f"{r['s_per_iter']:.2f} | {r['s_per_pass']:.2f} | {r['ratio']:.2f} |"
    )


if __name__ == "__main__":
  main()
