"""Multi-process runs: 2 processes x 2 CPU devices against 1 process x 4.

Every process is a real `python -m dsv_jax.main --jax_distributed` on
localhost (JAX's multi-controller runtime, gloo collectives), so these
tests take minutes on 2 cores: marked `multiprocess`, run by `.ci/run` as
their own step (`pytest -m multiprocess`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dsv_jax.configs import digits as digits_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = (
  "train",
  "select",
  "synthesize",
  "edit",
  "interpolate",
  "retrain",
  "report",
)
# Orbax's own files: laid out per process (one OCDBT database each), so
# they are compared by content, not by name.
_ORBAX_DIRS = ("ckpt", "arrays", "dsv_orbax")

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: str) -> dict:
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "PYTHONPATH": os.pathsep.join(
      [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
    "JAX_COMPILATION_CACHE_DIR": cache,
  }
  return env


def _cmd(workdir, stage, *extra):
  return [
    sys.executable,
    "-m",
    "dsv_jax.main",
    "--config=digits:tiny",
    f"--workdir={workdir}",
    f"--stage={stage}",
    *extra,
  ]


def _launch(
  workdir, stage, cache, *overrides, processes, devices, timeout_s=40
):
  """Starts one command per process; returns the Popen objects.

  The barriers wait 5 x `timeout_s`: on 2 loaded cores one process can
  compile for a minute while the other waits
  (benchmarks/docs/multiprocess_soak.md).
  """
  port = _free_port()
  procs = []
  for i in range(processes):
    extra = overrides
    if processes > 1:
      extra += (
        "--jax_distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
        f"--distributed_timeout={timeout_s}",
      )
    procs.append(
      subprocess.Popen(
        _cmd(workdir, stage, *extra),
        cwd=REPO,
        env=_env(devices, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  return procs


def _finish(procs, what, timeout=240):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f"{what}, process {i}:\n{out[-3000:]}"
  return outs


def _pipeline(workdir, cache, processes, devices):
  for stage in STAGES:
    procs = _launch(workdir, stage, cache, processes=processes, devices=devices)
    # The report (a dozen sub-runs) takes minutes where the others take
    # seconds: 4 minutes on 2 loaded cores.
    timeout = 900 if stage == "report" else 240
    _finish(procs, f"{stage} on {processes} x {devices}", timeout)


def _plain_files(root):
  out = []
  for dirpath, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _ORBAX_DIRS]
    out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
  return sorted(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The stages on 1 x 4 and on 2 x 2 (both at once: 3 processes)."""
  root = tmp_path_factory.mktemp("multiprocess")
  cache = str(root / "xla_cache")
  single, multi = root / "single", root / "multi"
  errors = []

  def run(*args):
    try:
      _pipeline(*args)
    except BaseException as e:  # noqa: BLE001 -- reported below.
      errors.append(e)

  threads = [
    threading.Thread(target=run, args=(single, cache, 1, 4)),
    threading.Thread(target=run, args=(multi, cache, 2, 2)),
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return single, multi


def _npz(path):
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def test_two_processes_match_one(runs):
  single, multi = runs
  a = _npz(single / "select" / "lambdas.npz")
  b = _npz(multi / "select" / "lambdas.npz")
  np.testing.assert_allclose(b["lambdas"], a["lambdas"], rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(b["labels"], a["labels"])
  for stage in ("select", "synthesize"):
    da, db = _npz(single / stage / "dsv.npz"), _npz(multi / stage / "dsv.npz")
    np.testing.assert_allclose(db["images"], da["images"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
      db["lambdas"], da["lambdas"], rtol=1e-4, atol=1e-6
    )
  ea, eb = _npz(single / "edit" / "edit.npz"), _npz(multi / "edit" / "edit.npz")
  # Editing takes a few Adam steps from real images, and Adam moves a pixel
  # by about lr_x per step whatever the size of its gradient: where that
  # gradient is round-off (a background pixel), 1 x 4 and 2 x 2 devices,
  # which sum in different orders, can move it differently (seen: 3 of 640
  # pixels, by 7e-4, with jax 0.10.2). A sharding bug moves whole images
  # by whole steps.
  lr_x = digits_config.get_config("tiny").synth.image_lr_x
  d = np.abs(eb["edited"] - ea["edited"])
  assert (d > 1e-5).mean() < 0.02 and d.max() < lr_x, (
    (d > 1e-5).mean(),
    d.max(),
  )
  np.testing.assert_array_equal(eb["prediction"], ea["prediction"])
  ia = _npz(single / "interpolate" / "interpolate.npz")
  ib = _npz(multi / "interpolate" / "interpolate.npz")
  np.testing.assert_allclose(ib["images"], ia["images"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ib["probs"], ia["probs"], rtol=1e-4, atol=1e-6)
  ra, rb = (
    json.loads((d / "retrain" / "results.json").read_text())["rows"]
    for d in (single, multi)
  )
  rows = ["dsv", "random_dsv", "random_select", "select"]
  assert sorted(ra) == sorted(rb) == rows
  for name, row in ra.items():
    np.testing.assert_allclose(
      rb[name]["final_loss_mean"], row["final_loss_mean"], rtol=1e-4
    )
    # One test image of 539 is 0.0019: no more than one may flip.
    np.testing.assert_allclose(
      rb[name]["accuracies"], row["accuracies"], atol=2e-3
    )
  # The report's headline numbers (retraining accuracies, lambda-accuracy
  # correlation), all but its wall time.
  sa, sb = (
    json.loads((d / "stages" / "report.json").read_text())["results"]
    for d in (single, multi)
  )
  assert sorted(sa) == sorted(sb)
  for name in sa.keys() - {"report", "report_time_s"}:
    np.testing.assert_allclose(sb[name], sa[name], atol=2e-3, err_msg=name)
  # The classifiers (and their Orbax arrays, written by both processes).
  from dsv_jax.experiment import common

  ca, cb = (
    common.load_classifier(str(single)),
    common.load_classifier(str(multi)),
  )
  import jax

  for x, y in zip(
    jax.tree.leaves(ca.params), jax.tree.leaves(cb.params), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6
    )


def test_each_output_written_once(runs):
  single, multi = runs
  files = _plain_files(multi)
  # The same files as a single process writes: no per-process copies, no
  # leftover temporaries, and no lock left behind.
  assert files == _plain_files(single)
  assert not [f for f in files if ".tmp" in f or f.endswith(".lock")], files
  for stage in STAGES:
    assert f"stages/{stage}.json" in files
  for path in ("classifier/arrays", "select/dsv_orbax", "ckpt/select"):
    assert (multi / path).is_dir(), path


def test_two_processes_resume_and_extend_a_fit_as_one(runs):
  """A raised select.max_iters resumes from the last checkpoint (each
  process takes its rows of the restored state) and checkpoints on the
  way (the callback gathers every process's rows): the same lambdas as
  1 x 4 extended likewise."""
  single, multi = runs
  cache = str(single.parent / "xla_cache")
  more = "--config.select.max_iters=9"
  procs = _launch(single, "select", cache, more, processes=1, devices=4)
  procs += _launch(multi, "select", cache, more, processes=2, devices=2)
  _finish(procs, "select extended to 9 iterations")
  for root in (single, multi):
    with open(root / "stages" / "select.json") as f:
      res = json.load(f)["results"]
    assert res["resumed_from_iteration"] == 6 and res["iterations"] == 9
  a = _npz(single / "select" / "lambdas.npz")
  b = _npz(multi / "select" / "lambdas.npz")
  np.testing.assert_allclose(b["lambdas"], a["lambdas"], rtol=1e-4, atol=1e-7)


def _reader(proc):
  """Collects `proc`'s output lines in a list, from a thread."""
  lines = []
  threading.Thread(
    target=lambda: lines.extend(proc.stdout), daemon=True
  ).start()
  return lines


def _wait_for(text, lines, proc, timeout=180):
  deadline = time.monotonic() + timeout
  while not any(text in ln for ln in lines):
    assert proc.poll() is None, "".join(lines)[-3000:]
    assert time.monotonic() < deadline, "".join(lines)[-3000:]
    time.sleep(0.2)


@pytest.mark.parametrize("victim", [1, 0], ids=["peer", "coordinator"])
def test_killed_process_fails_the_other_fast(tmp_path, victim):
  """Killing one process ends the other within the timeout, status 2; a
  rerun resumes from the checkpoints."""
  timeout_s = 10
  workdir, cache = tmp_path / "wd", str(tmp_path / "cache")
  # Still training when killed; checkpoints every 3 steps (tiny config).
  steps = "--config.train.steps=100000"
  procs = _launch(
    workdir, "train", cache, steps, processes=2, devices=2, timeout_s=timeout_s
  )
  killed, survivor = procs[victim], procs[1 - victim]
  lines = _reader(survivor)
  _reader(killed)  # Never a full pipe.
  _wait_for("train step 20/", lines, survivor)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  t0 = time.monotonic()
  try:
    survivor.wait(timeout=3 * timeout_s + 30)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail("the surviving process hangs after its peer was killed")
  waited = time.monotonic() - t0
  time.sleep(0.5)  # The reader's last lines.
  out = "".join(lines)
  assert survivor.returncode == 2, out[-3000:]
  assert waited < 3 * timeout_s + 30
  last = [ln for ln in out.splitlines() if ln.startswith("dsv: error:")]
  assert last, out[-3000:]
  assert "distributed run" in last[-1], last[-1]
  if victim != 1:
    return
  # The same command again resumes (then is stopped: 100000 steps).
  procs = _launch(
    workdir, "train", cache, steps, processes=2, devices=2, timeout_s=timeout_s
  )
  outs = [_reader(p) for p in procs]
  try:
    _wait_for("Resumed training from step", outs[0], procs[0])
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
      p.wait()


def test_an_unreachable_coordinator_fails_in_one_line(tmp_path):
  port = _free_port()  # Nothing listens there.
  res = subprocess.run(
    _cmd(
      tmp_path / "wd",
      "train",
      "--jax_distributed",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      "--process_id=1",
      "--distributed_timeout=3",
    ),
    cwd=REPO,
    env=_env(2, str(tmp_path / "cache")),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert res.returncode == 2, res.stderr[-3000:]
  assert (
    res.stderr.strip()
    .splitlines()[-1]
    .startswith("dsv: error: Cannot reach the coordinator at 127.0.0.1:")
  ), res.stderr[-3000:]
  assert not (tmp_path / "wd").exists()  # Nothing written.


# Two processes of one run where one never reaches the other's wait: each
# reports through the CLI's own one-line error path (`main._fail`).
_STALL = """
import sys, time
from absl import flags
flags.FLAGS(["stall"])
from dsv_jax import distributed, main
pid, port, mode, timeout, ckpt = sys.argv[1:]
pid = int(pid)
address = f"127.0.0.1:{port}"
distributed.initialize(address, 2, pid, heartbeat_timeout=int(timeout))
print("connected", flush=True)
try:
  if mode == "barrier":  # 1 stalls (alive, beating) outside the barrier.
    if pid == 1:
      time.sleep(600)
    distributed.barrier("the barrier process 1 never reaches")
  elif pid == 0:  # 0 in a device collective, 1 in Orbax's barrier: the
    from jax.experimental import multihost_utils  # hang of issue 31.

    multihost_utils.sync_global_devices("a collective 1 never joins")
  else:
    from dsv_jax import checkpoints

    checkpoints.RunCheckpointer(ckpt)
except distributed.PeerTimeout as e:  # As the CLI reports them.
  main._fail(main._one_line(e))
except Exception as e:
  main._fail(main._runtime_error_line(e))
"""


@pytest.mark.parametrize("mode", ["barrier", "orbax"])
def test_a_peer_stalled_at_a_barrier_ends_both_in_one_line(tmp_path, mode):
  """Neither process hangs: the one waiting gives up after the barrier
  bound (5 distributed timeouts), and the other learns of it and ends."""
  timeout_s = 4
  bound = 5 * timeout_s
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-c",
        _STALL,
        str(i),
        str(port),
        mode,
        str(timeout_s),
        str(tmp_path / "ckpt"),
      ],
      cwd=REPO,
      env=_env(1, str(tmp_path / "cache")),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  assert procs[0].stdout.readline().strip() == "connected"
  assert procs[1].stdout.readline().strip() == "connected"
  t0 = time.monotonic()
  try:
    errs = [p.communicate(timeout=bound + 60)[1] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"a process still runs {bound + 60} s after connecting")
  waited = time.monotonic() - t0
  assert waited < bound + 30, waited
  for i, (p, err) in enumerate(zip(procs, errs, strict=True)):
    ours = [ln for ln in err.splitlines() if ln.startswith("dsv: error:")]
    assert p.returncode == 2, (i, err[-3000:])
    assert len(ours) == 1 and err.strip().splitlines()[-1] == ours[0], err
    assert "Traceback" not in err and "Check failed" not in err, err
  # Both name the barrier that was not reached.
  if mode == "barrier":
    assert all("process 1 never reaches" in e for e in errs), errs
  else:
    assert all(
      "Orbax's barrier 'CheckpointManager:create_directory'" in e for e in errs
    ), errs


# The report's sub-run of issue 31's hang (a classifier trained in its own
# folder), with process 1 arriving late: it must see the folders as process
# 0 found them, not as process 0 has since made them.
_LATE_SUB_RUN = """
import sys, time
from absl import flags
flags.FLAGS(["late"])
from dsv_jax import configs, distributed
pid, port, sub_dir = sys.argv[1:]
distributed.initialize(f"127.0.0.1:{port}", 2, int(pid), heartbeat_timeout=20)
from dsv_jax.experiment.report import cache
from dsv_jax.experiment.stages import train

config = configs.get_config("digits", "tiny")
config.train.finish_steps = 0
if pid == "1":
  time.sleep(15)  # Process 0 finds no checkpoints and starts training.
res = cache.run_stage_once(train, config, sub_dir)
print("trained", res["steps"], flush=True)
"""


def test_a_late_process_takes_the_same_branch_into_a_sub_run(tmp_path):
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _LATE_SUB_RUN, str(i), str(port), str(tmp_path)],
      cwd=REPO,
      env=_env(2, str(tmp_path / "cache")),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=600)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("the sub-run hangs")
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
    assert "trained 6" in out, out[-3000:]
