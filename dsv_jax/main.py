"""Command line: `python -m dsv_jax.main --config CONFIG --workdir DIR`.

Also installed as the console script `dsv`. Flags:
  --config   a packaged config by name (`digits`, `digits:tiny`,
             `fashion_mnist`, ...; works from any directory) or a config
             file with `get_config(arg)`, e.g. `configs/digits.py:tiny`;
             override fields with `--config.train.steps=100` (an unknown
             key or a wrong type fails at once, naming the key).
  --workdir  where checkpoints and outputs go; re-running the same command
             resumes an interrupted run.
  --stage    which stage to run: train, select, synthesize, edit,
             interpolate, retrain, report, or all (every stage in order;
             the default, from the config's `stage`).

JAX's own options work as flags too (`--jax_platforms=cpu`,
`--jax_enable_x64`, ...). Compiled programs are cached on disk in
`--jax_compilation_cache_dir` (default ~/.cache/dsv_jax/xla, or the
JAX_COMPILATION_CACHE_DIR environment variable; an empty value turns it
off), so a second run of the same config, even in a fresh workdir, skips
most of its compilation.

Expected errors (a flag or config value, an unknown config, missing data,
a busy or damaged workdir) print one line and exit with status 2;
`--verbosity=1` shows the traceback. Ctrl-C (SIGINT) and SIGTERM stop the
run with one line (status 130 and 143); the same command resumes it.

Multi-process runs (JAX's multi-controller runtime; every process runs the
same command over one global mesh of all processes' devices):
  --jax_distributed       connect the processes first; without the three
                          flags below JAX fills them in where it detects
                          its environment (Cloud TPU pod slice, SLURM).
  --coordinator_address   host:port of process 0's coordinator.
  --num_processes, --process_id
  --distributed_timeout   seconds before a coordinator that cannot be
                          reached, or a peer that stopped, fails the run
                          (one line, status 2) instead of hanging; a
                          process waits for the others at a barrier 5
                          times as long.
Only process 0 writes records and outputs; every process takes part in
the Orbax checkpoints.
"""

import os
import re
import signal
import subprocess
import sys
import threading

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dsv_jax import checkpoints, configs, distributed
from dsv_jax.experiment import registry
from dsv_jax.experiment import workdir as wd

# Errors a user's input causes (bad config value or key, missing data or
# files, a busy workdir): one line, not a traceback.
_EXPECTED = (
  ValueError,
  KeyError,
  AttributeError,
  OSError,
  wd.WorkdirLocked,
  distributed.PeerTimeout,
)
# Flags that print the usage: `dsv` (the console script) hands them to
# `python -m dsv_jax.main`, whose usage lists this module's flags.
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
DEFAULT_COMPILATION_CACHE = "~/.cache/dsv_jax/xla"
_CONFIGS_DIR = os.path.join(os.path.dirname(__file__), "configs")

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "A packaged config by name (digits[:tiny], fashion_mnist, mnist, cifar10, "
  "cifar100, imagenet[:lowres|:tiny]) or a config file, e.g. "
  "configs/digits.py[:arg].",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output/resume directory.")
_STAGE = flags.DEFINE_enum(
  "stage",
  None,
  [*registry.STAGES, "all"],
  "Stage to run; default: config.stage.",
)
_JAX_DISTRIBUTED = flags.DEFINE_bool(
  "jax_distributed",
  False,
  "Connect several processes with jax.distributed.initialize before the "
  "run (auto-detected on TPU pod slices and SLURM when the three flags "
  "below are not given).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (--jax_distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Number of processes (--jax_distributed)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index (--jax_distributed)."
)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
  "distributed_timeout",
  distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
  "Seconds after which an unreachable coordinator or a silent peer fails "
  "the run (--jax_distributed); a barrier waits 5 times as long.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _use_compilation_cache() -> None:
  """Caches compiled programs on disk unless told otherwise.

  Our compiles (a stationarity step is a second-order program) take tens
  of seconds of a digits run; JAX caches nothing on disk by default. Every
  program is cached, not only those over JAX's 1 s default: on CPU most of
  ours compile in under a second, many times per run.
  """
  user = flags.FLAGS["jax_compilation_cache_dir"].present  # "" (off) too.
  if not user and jax.config.jax_compilation_cache_dir is None:  # Nor env.
    jax.config.update(
      "jax_compilation_cache_dir", os.path.expanduser(DEFAULT_COMPILATION_CACHE)
    )
  if not flags.FLAGS["jax_persistent_cache_min_compile_time_secs"].present:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _JAX_DISTRIBUTED.value:
    # Before anything touches a device: the backend must see every process.
    timeout = _DISTRIBUTED_TIMEOUT.value
    distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      auto_detect=True,
      initialization_timeout=timeout,
      heartbeat_timeout=timeout,
    )
  _use_compilation_cache()
  distributed.log_topology()
  logging.info("Devices: %s", jax.devices())
  results = registry.run(_CONFIG.value, _WORKDIR.value, _STAGE.value)
  for stage, res in results.items():
    summary = ", ".join(
      f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
      for k, v in res.items()
    )
    print(f"[{stage}] {summary}", flush=True)


def resolve_config_arg(argv: list[str]) -> list[str]:
  """`--config NAME[:arg]` of a packaged config -> the packaged file.

  A value that is an existing file is left alone, so paths keep working;
  a bare name (`digits`, `digits:tiny`) resolves inside the installed
  package, from any directory.
  """
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      prefix, value = "--config=", a[len("--config=") :]
    elif a == "--config" and i + 1 < len(out):
      prefix, value, i = "", out[i + 1], i + 1
    else:
      continue
    path, colon, arg = value.partition(":")
    packaged = os.path.join(_CONFIGS_DIR, f"{path}.py")
    if os.path.exists(path):
      continue
    if not os.path.exists(packaged):
      raise UsageProblem(
        f"--config {value}: no such config file, nor a packaged config; "
        f"packaged: {', '.join(configs.CONFIGS)} (e.g. --config digits:tiny)."
      )
    out[i] = f"{prefix}{packaged}{colon}{arg}"
  return out


class UsageProblem(ValueError):
  """A command line no run can start from (one line, status 2)."""


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors (a bad value, an unknown flag, a
  config file's `get_config` raising) as one `UsageProblem` line.

  absl prints them as "FATAL Flags parsing error" with status 1, a config
  file's error with its whole traceback.
  """
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:  # ml_collections' overrides.
    raise UsageProblem(
      f"a --config.KEY=VALUE override names no key of the config: "
      f"{_one_line(e)}"
    ) from e
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # A config file's error ends its traceback; absl's own are one line.
    last = lines[-1] if lines else type(e).__name__
    # "ValueError: message" of a config file's get_config: the message.
    head, sep, rest = last.partition(": ")
    if sep and head.isidentifier() and head.endswith("Error"):
      last = rest
    raise UsageProblem(last) from e


def _one_line(e: BaseException) -> str:
  text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
  # ml_collections nests a KeyError's repr in its AttributeError: undo the
  # quoting and escapes so the line reads as the message it is.
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1].replace("\\'", "'").replace("\\n", " ")
  text = " ".join(text.split())
  return text or type(e).__name__


def _verbose(argv: list[str]) -> bool:
  return any(
    a.startswith(("--verbosity=", "-v=")) and a.split("=", 1)[1] not in ("0",)
    for a in argv
  ) or any(a in ("--verbosity", "-v") for a in argv)


def _define_jax_flags() -> None:
  # JAX's options as absl flags, applied after parsing; once per process
  # (a second definition of a flag is an error).
  if "jax_compilation_cache_dir" not in flags.FLAGS:
    jax.config.config_with_absl()


# Set in the child that `_supervise` starts.
_SUPERVISED = "DSV_JAX_SUPERVISED"


def _die_with_parent() -> None:
  # Linux: the child gets SIGKILL when its supervisor dies (killed), so a
  # killed process of a distributed run never leaves its worker behind.
  try:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _supervise(argv: list[str]) -> int:
  """Runs this command in a child process and reports how it ended.

  When a peer of a distributed run dies, the CPU collectives (gloo) and
  the runtime's own failure detection abort the surviving processes from
  a C++ thread (SIGABRT): no Python handler runs. The supervisor turns
  such an end into one line and status 2; the child's own report stays
  above it on stderr.
  """
  cmd = [sys.executable, "-m", "dsv_jax.main", *argv[1:]]
  child = subprocess.Popen(
    cmd, env={**os.environ, _SUPERVISED: "1"}, preexec_fn=_die_with_parent
  )
  received = []

  def forward(sig, _):
    received.append(sig)
    child.send_signal(sig)

  # Ctrl-C reaches the child directly (same process group); a SIGTERM
  # (scancel, kill) sent to this process alone is passed on.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, forward)
  rc = _wait(child, received)
  if rc in (0, 1, 2, *_STOPPED.values()):  # The child said why (one line).
    return rc
  if rc < 0 and (received or -rc == signal.SIGINT):
    sig = signal.Signals(received[0] if received else -rc)
    sys.stderr.write(f"dsv: stopped by {sig.name}\n")
    return 128 + sig
  how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
  sys.stderr.write(
    f"dsv: error: this process of the distributed run ended abnormally "
    f"({how}): a peer process stopped or the coordinator went away, so "
    "its collectives failed. Rerun the same command on every process to "
    "resume.\n"
  )
  return 2


# A child stopped by a signal whose Python handler could not run (its main
# thread inside a collective) gets this long to end before SIGKILL.
_GRACE_S = 10


def _wait(child: subprocess.Popen, received: list) -> int:
  while True:
    try:
      return child.wait(timeout=_GRACE_S if received else None)
    except subprocess.TimeoutExpired:
      child.kill()


# Exit statuses of a run stopped by a signal (the shell's 128 + number).
_STOPPED = {
  signal.SIGINT: 128 + signal.SIGINT,
  signal.SIGTERM: 128 + signal.SIGTERM,
}


class Stopped(BaseException):
  """A SIGTERM arrived: unwinds like Ctrl-C (checkpoints close cleanly)."""


# A signal's exception unwinds the run so that checkpoints close cleanly.
# Python raises it wherever the main thread happens to be: inside Orbax's
# I/O it left a half-started save whose exit hung (seen in CI), so
# `checkpoints.raise_stop` holds it until the checkpoint call returns.
# Anywhere else it could still be swallowed (a finaliser) or land in
# another library's locking, so a stop also arms a timer that ends the
# process this long after the signal, with the same line and status; a
# second signal ends it at once.
_UNWIND_GRACE_S = 20
_stopping: list[signal.Signals] = []
_stop_reported: list[bool] = []


def _on_stop_signal(signum, _):
  sig = signal.Signals(signum)
  if _stopping:
    _hard_stop(_stopping[0])
  _stopping.append(sig)
  timer = threading.Timer(_UNWIND_GRACE_S, _hard_stop, args=(sig,))
  timer.daemon = True
  timer.start()
  # Held while a checkpoint call is under way (see `checkpoints`).
  checkpoints.raise_stop(
    KeyboardInterrupt() if sig == signal.SIGINT else Stopped(signum)
  )


def _stop_message(sig: signal.Signals) -> str:
  return (
    f"dsv: stopped by {sig.name}; the same command resumes the run "
    "from its last checkpoint."
  )


def _hard_stop(sig: signal.Signals) -> None:
  """Ends the process now (no unwinding), with the stop's one line."""
  if not _stop_reported:
    sys.stderr.write(f"{_stop_message(sig)}\n")
    sys.stderr.flush()
  os._exit(_STOPPED[sig])


def run_main():
  """Entry point of the `dsv` console script."""
  if any(a in _HELP_FLAGS for a in sys.argv[1:]) and __name__ != "__main__":
    # Same usage as `python -m dsv_jax.main --help` (absl lists the flags
    # of the module run as __main__; here that is the console script).
    os.execv(
      sys.executable, [sys.executable, "-m", "dsv_jax.main", *sys.argv[1:]]
    )
  try:
    argv = resolve_config_arg(sys.argv)
  except UsageProblem as e:
    _fail(str(e))
  if _is_multiprocess(argv) and not os.environ.get(_SUPERVISED):
    sys.exit(_supervise(sys.argv))
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(registry.LibraryChatterFilter())
  _define_jax_flags()
  signal.signal(signal.SIGINT, _on_stop_signal)
  signal.signal(signal.SIGTERM, _on_stop_signal)
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except (KeyboardInterrupt, Stopped) as e:
    signum = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
    _stop(signal.Signals(signum))
  except _EXPECTED as e:
    if _verbose(argv):
      raise
    _fail(_one_line(e))
  except jax.errors.JaxRuntimeError as e:
    # A coordinator that cannot be reached or a peer that died surfaces as
    # a runtime error of the next collective (or of the connection).
    if not _is_multiprocess(argv) or _verbose(argv):
      raise
    _fail(_runtime_error_line(e))


def _runtime_error_line(e: BaseException) -> str:
  """One line for a runtime error of a distributed run."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  where = f"distributed run failed on process {_process_index()}"
  barrier = re.search(r"Barrier timed out\. Id: (\S+?)(::\d+)?\.? ", text)
  if barrier:  # Orbax's: the runtime's message is a paragraph.
    return (
      f"{where}: not every process reached Orbax's barrier "
      f"{barrier.group(1)!r} within "
      f"{distributed.BARRIER_TIMEOUT_FACTOR} x --distributed_timeout: one "
      "stopped, hangs or runs something else."
    )
  return (
    f"{where} (a peer process stopped or the coordinator is unreachable): "
    f"{text}"
  )


def _is_multiprocess(argv: list[str]) -> bool:
  return any(
    a in ("--jax_distributed", "--jax_distributed=true", "--jax_distributed=1")
    for a in argv
  )


def _process_index() -> str:
  try:
    return str(jax.process_index())
  except Exception:  # noqa: BLE001 -- the runtime itself may be gone.
    return "?"


def _stop(sig: signal.Signals) -> None:
  message = _stop_message(sig)
  if distributed.is_initialized():
    distributed.fail_now(message, status=_STOPPED[sig], prefix="")
  sys.stderr.write(f"{message}\n")
  _stop_reported.append(True)
  sys.exit(_STOPPED[sig])


def _fail(message: str) -> None:
  if distributed.is_initialized():
    distributed.fail_now(message)  # Without JAX's shutdown barrier.
  sys.stderr.write(f"dsv: error: {message}\n")
  sys.exit(2)


if __name__ == "__main__":
  run_main()
