"""Selection over several processes: time and bytes communicated per iteration.

Runs `select.fit_lambdas` on digits (the digits config's ConvNet, width 64,
depth 2, random weights) as 1 process x 2 CPU devices and as 2 processes x
1 device (localhost, JAX's multi-controller runtime, gloo collectives),
for each N, each process streaming only its own rows (`process_rows`).
Prints per setting the median seconds per iteration and the bytes
communicated per iteration and device:

  * collectives: what XLA compiled into the per-iteration programs
    (`parallel.collective_bytes` of the operator's programs, times their
    calls per iteration: one matvec per step tried, one rmatvec);
  * host gathers: the bytes `multihost_utils.process_allgather` gathered
    between two iterations (the solver's scalar reductions), measured.

  python benchmarks/select_multiprocess.py [--n 500 1000] [--iters 8]
"""

import argparse
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args):
  import jax
  import numpy as np

  from dsv_jax import distributed

  if args.num_processes > 1:
    distributed.initialize(
      f"127.0.0.1:{args.port}", args.num_processes, args.process_id
    )
  from jax.experimental import multihost_utils

  from dsv_jax import data, models, parallel, select

  ds = data.load_dataset("digits", max_train=args.n[0])
  model = models.build_model(
    "convnet",
    image_shape=ds.info.image_shape,
    num_classes=ds.info.num_classes,
    key=jax.random.key(0),
    width=64,
    depth=2,
    norm="none",
    pool="max",
  )
  apply_fn, params = models.nnx_apply_fn(model)
  x, y = ds.train["image"], np.asarray(ds.train["label"], np.int32)
  n, mesh = len(y), parallel.make_mesh()
  rows = select.process_rows(n, chunk_size=args.chunk, mesh=mesh)

  # Host-side gathers, counted from the end of the first iteration on.
  gathered = [0]
  counting = [False]
  allgather = multihost_utils.process_allgather

  def counted(tree, **kw):
    if counting[0]:
      gathered[0] += sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))
    return allgather(tree, **kw)

  multihost_utils.process_allgather = counted

  def on_metrics(row):
    # The last iteration's callback stops it: the fit's final gather of
    # every sample's results (once per fit) is not per-iteration traffic.
    counting[0] = row["step"] < args.iters

  _, fit = select.fit_lambdas(
    apply_fn,
    params,
    x[rows],
    y[rows],
    num_samples=n,
    wrt="all",
    max_iters=args.iters,
    tol=0.0,
    chunk_size=args.chunk,
    on_metrics=on_metrics,
  )
  host = gathered[0]
  layout = select.layout.make_layout(n, args.chunk, mesh, jax.process_index())
  op = select.operator.make_operator(
    apply_fn,
    params,
    x[rows],
    y[rows],
    layout=layout,
    mesh=mesh,
    strategy=select.resolve_strategy("auto"),
  )
  names = {"matvec": ("zeros", "add_grad", "total", "matvec_all")}
  per_product = {"matvec": 0, "rmatvec": 0}
  for name, (text, calls) in op.programs().items():
    size = sum(parallel.collective_bytes(text).values()) * calls
    per_product["matvec" if name in names["matvec"] else "rmatvec"] += size
  steps = [1 + r["backtracks"] for r in fit.history]
  s_per_iter = [r["s_per_iter"] for r in fit.history[1:]]
  collectives = (
    per_product["matvec"] * float(np.mean(steps)) + per_product["rmatvec"]
  )
  if jax.process_index() == 0:
    print(
      "RESULT "
      + json.dumps(
        {
          "n": n,
          "processes": jax.process_count(),
          "devices": len(jax.devices()),
          "params": sum(a.size for a in jax.tree.leaves(params)),
          "s_per_iter": float(np.median(s_per_iter)),
          "collective_bytes_per_iter": collectives,
          "host_gather_bytes_per_iter": host / max(len(fit.history) - 1, 1),
          "matvec_bytes": per_product["matvec"],
          "rmatvec_bytes": per_product["rmatvec"],
          "steps_per_iter": float(np.mean(steps)),
        }
      ),
      flush=True,
    )


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(n, processes, devices, args):
  port = _free_port()
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "PYTHONPATH": os.pathsep.join(
      [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  }
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        f"--n={n}",
        f"--iters={args.iters}",
        f"--chunk={args.chunk}",
        f"--num_processes={processes}",
        f"--process_id={i}",
        f"--port={port}",
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  outs = [p.communicate(timeout=1200)[0] for p in procs]
  for p, out in zip(procs, outs, strict=True):
    if p.returncode:
      raise SystemExit(f"worker failed:\n{out[-3000:]}")
  line = [ln for ln in outs[0].splitlines() if ln.startswith("RESULT ")]
  return json.loads(line[-1][len("RESULT ") :])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, nargs="+", default=[500, 1000])
  parser.add_argument("--iters", type=int, default=8)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--worker", action="store_true")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()
  if args.worker:
    return _worker(args)
  print(
    f"digits ConvNet, chunk {args.chunk}, {args.iters} iterations (median "
    "s/iter over all but the first); bytes per iteration and device"
  )
  print(
    f"{'N':>5} {'processes x devices':>20} {'P':>7} {'s/iter':>8} "
    f"{'collectives B':>14} {'host gathers B':>15} {'matvec B':>9} "
    f"{'rmatvec B':>10}"
  )
  for n in args.n:
    for processes, devices in ((1, 2), (2, 1)):
      r = _run(n, processes, devices, args)
      print(
        f"{r['n']:>5} {f'{processes} x {devices}':>20} {r['params']:>7} "
        f"{r['s_per_iter']:>8.3f} {r['collective_bytes_per_iter']:>14.0f} "
        f"{r['host_gather_bytes_per_iter']:>15.0f} {r['matvec_bytes']:>9} "
        f"{r['rmatvec_bytes']:>10}",
        flush=True,
      )


if __name__ == "__main__":
  main()
