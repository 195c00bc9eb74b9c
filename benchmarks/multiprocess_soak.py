"""Soak test: the README's 2-process localhost run, every stage, N times.

Each run starts two `python -m dsv_jax.main --stage=all --jax_distributed`
processes (localhost coordinator, 2 CPU devices each) in a fresh workdir and
waits for both. A run passes when both exit 0, fails when either exits
otherwise, and hangs when they are still running after `--hang_s` (both are
then killed). Prints one line per run and a summary; with `--out`, appends
one JSON row per run there.

  nice -n 10 python benchmarks/multiprocess_soak.py --runs 10 \\
    --out /tmp/soak.jsonl
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_once(args, workdir: str, cache: str) -> dict:
  port = _free_port()
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "JAX_COMPILATION_CACHE_DIR": cache,
    "PYTHONPATH": os.pathsep.join(
      [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  }
  procs, logs = [], []
  for i in range(2):
    log = open(os.path.join(workdir, f"process{i}.log"), "w")  # noqa: SIM115
    logs.append(log)
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          "-m",
          "dsv_jax.main",
          f"--config={args.config}",
          f"--workdir={os.path.join(workdir, 'wd')}",
          "--stage=all",
          "--jax_distributed",
          f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={i}",
          f"--distributed_timeout={args.distributed_timeout}",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    )
  t0 = time.monotonic()
  deadline = t0 + args.hang_s
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(1)
  hung = any(p.poll() is None for p in procs)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  for log in logs:
    log.close()
  codes = [p.returncode for p in procs]
  outcome = "hang" if hung else ("pass" if codes == [0, 0] else "fail")
  last = []
  for i in range(2):
    with open(os.path.join(workdir, f"process{i}.log")) as f:
      lines = [ln.rstrip() for ln in f if ln.strip()]
    last.append(lines[-1][:300] if lines else "")
  return {
    "outcome": outcome,
    "exit_codes": codes,
    "seconds": round(time.monotonic() - t0, 1),
    "last_lines": last,
  }


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--config", default="digits:tiny")
  p.add_argument("--distributed_timeout", type=int, default=60)
  p.add_argument(
    "--hang_s", type=float, default=1800, help="A run still going: a hang."
  )
  p.add_argument("--out", help="Append one JSON row per run here.")
  p.add_argument("--keep", action="store_true", help="Keep the workdirs.")
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix="dsv_soak_")
  cache = os.path.join(root, "xla_cache")
  counts = {"pass": 0, "fail": 0, "hang": 0}
  for i in range(args.runs):
    workdir = os.path.join(root, f"run{i}")
    os.makedirs(workdir)
    row = {"run": i, **_run_once(args, workdir, cache)}
    counts[row["outcome"]] += 1
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    if not args.keep and row["outcome"] == "pass":
      shutil.rmtree(workdir)
  print(f"{args.runs} runs: {counts} (logs of the others in {root})")
  return 0 if counts["pass"] == args.runs else 1


if __name__ == "__main__":
  sys.exit(main())
