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
