"""The command line's promise: a mistake is one line and status 2, a stop
(Ctrl-C, SIGTERM) one line, and `dsv --help` the module's usage."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dsv_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join(
      [REPO, *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
  }


def _dsv(*args, cwd, timeout=120):
  """`dsv ARGS` as its console script runs it (`run_main` outside -m)."""
  code = "import sys; from dsv_jax.main import run_main; run_main()"
  return subprocess.run(
    [sys.executable, "-c", code, *args],
    cwd=cwd,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "args,message",
  [
    (["--config=digits:tiny", "--config.train.steps=abc"], "steps=abc"),
    (["--config=digits:tinny"], "Unknown config arg 'tinny'"),
    (["--config=nosuch"], "packaged: " + ", ".join(configs.CONFIGS)),
    (
      ["--config=digits:tiny", "--config.nokey=1"],
      "no key of the config: nokey",
    ),
    (["--config=digits:tiny", "--stage=bogus"], "--stage=bogus"),
    (["--config=digits:tiny", "--nosuchflag"], "nosuchflag"),
  ],
  ids=[
    "bad-value",
    "bad-arg",
    "unknown-config",
    "unknown-key",
    "stage",
    "flag",
  ],
)
def test_a_mistake_is_one_line_and_status_2(tmp_path, args, message):
  res = _dsv(*args, f"--workdir={tmp_path / 'wd'}", cwd=tmp_path)
  assert res.returncode == 2, res.stderr[-2000:]
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1, res.stderr[-2000:]
  assert lines[0].startswith("dsv: error: ") and message in lines[0], lines
  assert not (tmp_path / "wd").exists()


def test_dsv_help_is_the_module_usage(tmp_path):
  res = _dsv("--help", cwd=tmp_path)
  module = subprocess.run(
    [sys.executable, "-m", "dsv_jax.main", "--help"],
    cwd=tmp_path,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert res.returncode == module.returncode  # absl's usage exits 1.
  assert res.stdout == module.stdout
  assert "--workdir" in res.stdout and "--distributed_timeout" in res.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_a_signal_stops_the_run_in_one_line(tmp_path, sig):
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "dsv_jax.main",
      "--config=digits:tiny",
      "--config.train.steps=100000",
      f"--workdir={tmp_path / 'wd'}",
      "--stage=train",
    ],
    cwd=tmp_path,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = []
  threading.Thread(
    target=lambda: lines.extend(proc.stderr), daemon=True
  ).start()
  deadline = time.monotonic() + 120
  while not any("train step" in ln for ln in lines):
    assert proc.poll() is None, "".join(lines)[-2000:]
    assert time.monotonic() < deadline, "".join(lines)[-2000:]
    time.sleep(0.1)
  proc.send_signal(sig)
  assert proc.wait(timeout=60) == 128 + sig
  time.sleep(0.2)  # The reader's last lines.
  err = "".join(lines)
  assert "Traceback" not in err, err[-2000:]
  assert (
    err.strip()
    .splitlines()[-1]
    .startswith(f"dsv: stopped by {sig.name}; the same command resumes")
  ), err[-2000:]


# A run whose unwinding never ends, as when the signal's exception lands
# inside a library's own locking and its cleanup then waits forever.
_HANGS_WHILE_UNWINDING = """
import signal, threading, time
from dsv_jax import main
main._UNWIND_GRACE_S = {grace}
signal.signal(signal.SIGINT, main._on_stop_signal)
signal.signal(signal.SIGTERM, main._on_stop_signal)
try:
  print("ready", flush=True)  # Inside: a signal may come at once.
  while True:
    time.sleep(0.05)
finally:
  threading.Event().wait()
"""


def _start_hanging_run(tmp_path, grace):
  proc = subprocess.Popen(
    [sys.executable, "-c", _HANGS_WHILE_UNWINDING.format(grace=grace)],
    cwd=tmp_path,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
  return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_whose_unwinding_hangs_still_ends_in_one_line(tmp_path, sig):
  proc = _start_hanging_run(tmp_path, grace=1)
  t0 = time.monotonic()
  proc.send_signal(sig)
  assert proc.wait(timeout=30) == 128 + sig
  assert time.monotonic() - t0 >= 1  # The grace to unwind came first.
  err = proc.stderr.read().strip().splitlines()
  assert err == [
    f"dsv: stopped by {sig.name}; the same command resumes the run from "
    "its last checkpoint."
  ]


def test_a_second_signal_ends_a_stopping_run_at_once(tmp_path):
  proc = _start_hanging_run(tmp_path, grace=600)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=30) == 128 + signal.SIGTERM
  assert len(proc.stderr.read().strip().splitlines()) == 1
