"""Several processes, one run: JAX's multi-controller runtime.

Every process runs the same program over a global mesh of all processes'
devices (`jax.devices()`); `initialize` connects them before anything
touches a device. Orbax coordinates its own saves and restores (every
process takes part); everything else a stage writes (records, jsonl,
npz, PNGs) is written by process 0 alone (`is_primary`, `primary_only`),
and `barrier` keeps the others from reading it before it exists.

With a single process (no `initialize`) every helper is a no-op, so the
single-machine code paths are unchanged.

No wait of one process for the others is unbounded: `barrier` (ours) and
Orbax's own barriers wait in the coordinator's key-value store, at most
`BARRIER_TIMEOUT_FACTOR` distributed timeouts; a process stuck in a device
collective (whose peer stopped, failed or waits elsewhere) is ended by the
watchdog.
Any process that fails tells the others (`fail_now`), so every process of
the run ends with one line and status 2, never a hang.
"""

import atexit
import contextlib
import functools
import itertools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from absl import logging

# A process that stops heartbeating for this long is declared dead and
# the others fail instead of waiting forever (JAX's default is 100 s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# How long a process keeps trying to reach the coordinator at start-up
# (JAX's default is 300 s).
DEFAULT_INITIALIZATION_TIMEOUT_S = 120

F = TypeVar("F", bound=Callable[..., Any])


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto_detect: bool = False,
  initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S,
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
  shutdown_timeout: int = 30,
) -> None:
  """Connects this process to the others (`jax.distributed.initialize`).

  Call before anything touches a device. With `coordinator_address`,
  `num_processes` and `process_id` all given, those are used; with
  `auto_detect` and any of them missing, JAX fills them in where it
  detects its environment (a Cloud TPU pod slice, SLURM, Open MPI), as a
  bare `jax.distributed.initialize()` does there.

  On CPU the cross-process collectives need an implementation: gloo (the
  one bundled with jaxlib) is selected unless one was chosen already.

  Raises:
    ValueError: arguments missing without `auto_detect`, or JAX detected
      no cluster to fill them in.
  """
  given = (coordinator_address, num_processes, process_id)
  if None in given and not auto_detect:
    raise ValueError(
      "distributed.initialize needs coordinator_address, num_processes and "
      "process_id, or auto_detect=True where JAX detects the cluster (TPU "
      f"pod slice, SLURM); got {coordinator_address!r}, {num_processes!r}, "
      f"{process_id!r}."
    )
  global _timeout_s
  _timeout_s = BARRIER_TIMEOUT_FACTOR * heartbeat_timeout
  # The preemption service takes SIGTERM for itself ("SIGTERM caught at
  # ...") and lets the run go on: a SIGTERM must end the run.
  jax.config.update("jax_enable_preemption_service", False)
  _bound_orbax_barriers(_timeout_s)
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    # Without one, a computation over several processes' CPU devices fails
    # (jax 0.10 defaults to gloo; older versions had none). Harmless on
    # accelerators: their collectives do not use it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address and process_id:  # Process 0 starts the service.
    _wait_for_coordinator(coordinator_address, initialization_timeout)
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=initialization_timeout,
    # The runtime's own detection aborts the process (a C++ fatal error
    # and a core dump); the watchdog below, at half the time, ends it
    # first with one line and status 2.
    heartbeat_timeout_seconds=2 * heartbeat_timeout,
    shutdown_timeout_seconds=shutdown_timeout,
  )
  if jax.process_count() > 1:
    _start_watchdog(heartbeat_timeout)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once `address` accepts connections; raises after `timeout`.

  The runtime's client aborts the process (a C++ fatal error) when it
  cannot connect in time; this check fails first, with one line.

  Raises:
    ConnectionError: nothing listens at `address` within `timeout` s.
  """
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConnectionError(
          f"Cannot reach the coordinator at {address} within {timeout:.0f} s "
          f"({e.strerror or e}): start process 0 there, or check "
          "--coordinator_address."
        ) from e
      time.sleep(0.5)


def _bound_orbax_barriers(timeout: float) -> None:
  """Orbax's barriers wait in the key-value store, at most `timeout` s.

  By default Orbax syncs processes with a device collective that has no
  timeout: a process whose peer runs something else waits there forever.
  Orbax reads its switch as an absl flag: it takes effect once absl has
  parsed the flags (the CLI; `absl.app.run`), as every flag does.
  """
  from absl import flags
  from orbax.checkpoint._src.multihost import multihost as orbax_multihost

  flags.FLAGS.set_default("experimental_orbax_use_distributed_barrier", True)
  # Orbax has no option for its barriers' timeout (300 s): its module
  # constant is the one place it reads it from.
  orbax_multihost._DEFAULT_BARRIER_TIMEOUT = int(timeout)  # noqa: SLF001


# Status of a run that a dead peer or coordinator ends.
PEER_FAILURE_EXIT_STATUS = 2
_ALIVE_KEY = "dsv_jax/alive/{}"
# Set by a process that fails; every other process's watchdog ends it.
_FAILED_KEY = "dsv_jax/failed"
# Whether this process is ending (`fail_now`): its watchdog stays quiet.
_failing = False
# A barrier waits this many distributed timeouts (`initialize`'s
# `heartbeat_timeout`). Not one: processes drift apart legitimately between
# two barriers (each compiles, and retrains the report's models, on its
# own; process 0 alone writes the outputs), and on 2 loaded cores by more
# than a minute: benchmarks/docs/multiprocess_soak.md.
BARRIER_TIMEOUT_FACTOR = 5
_timeout_s: float = BARRIER_TIMEOUT_FACTOR * DEFAULT_HEARTBEAT_TIMEOUT_S


# How often the watchdog beats and looks at the others.
_WATCH_INTERVAL_S = 1.0


class PeerTimeout(RuntimeError):
  """A barrier was not reached by every process within the timeout."""


def _client():
  # JAX keeps its client private; the public API has no key-value access.
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state.client


def fail_now(
  message: str,
  *,
  status: int = PEER_FAILURE_EXIT_STATUS,
  prefix: str = "dsv: error: ",
) -> None:
  """Prints `dsv: error: message` and ends the process with `status`.

  The other processes of a distributed run learn of it (their watchdogs
  end them) instead of waiting for this one in their next collective.

  `os._exit`, not `sys.exit`: a normal exit runs JAX's shutdown barrier,
  which waits (up to its timeout) for peers that may be gone, and a
  runtime thread cannot raise into the main thread anyway.
  """
  global _failing
  _failing = True
  line = f"{prefix}{message}"
  sys.stderr.write(f"{line}\n")
  sys.stderr.flush()
  sys.stdout.flush()
  if is_distributed():
    # The first failure is the one every process reports; the key exists
    # already when this one follows it (or the coordinator is gone).
    with contextlib.suppress(Exception):
      _client().key_value_set(_FAILED_KEY, f"{jax.process_index()}\n{line}")
    if jax.process_index() == 0:
      # It hosts the key-value store: the others' watchdogs read the
      # failure there before it goes (else their runtime aborts them).
      time.sleep(3 * _WATCH_INTERVAL_S)
  os._exit(status)


def _start_watchdog(
  timeout: float, interval: float = _WATCH_INTERVAL_S
) -> None:
  """Ends this process when a peer or the coordinator stops answering.

  A daemon thread bumps this process's counter in the coordinator's
  key-value store every `interval` seconds and reads the others'. A peer
  whose counter has not moved for `timeout` seconds (killed, hung, its
  host gone), or a coordinator that no longer answers, ends the run here
  with one line (`fail_now`) instead of a hang in the next collective.
  """
  client = _client()
  me, count = jax.process_index(), jax.process_count()
  stop = threading.Event()
  # Stopped before JAX's own exit handler shuts the client down
  # (handlers run last registered first).
  atexit.register(stop.set)

  def watch():
    seen = {p: (None, time.monotonic()) for p in range(count) if p != me}
    beat = 0
    while not stop.wait(interval):
      beat += 1
      try:
        client.key_value_set(
          _ALIVE_KEY.format(me), str(beat), allow_overwrite=True
        )
        failed = _try_get(client, _FAILED_KEY)
        who, _, why = (failed or "").partition("\n")
        if failed is not None and who != str(me) and not _failing:
          fail_now(f"{why} (process {me} stops with it)", prefix="")
        now = time.monotonic()
        for p, (last, since) in seen.items():
          value = _try_get(client, _ALIVE_KEY.format(p))
          if value != last:
            seen[p] = (value, now)
          elif now - since > timeout and not stop.is_set():
            fail_now(
              f"distributed run failed on process {me}: process {p} has "
              f"not responded for {timeout:.0f} s (it stopped or hangs)."
            )
      except Exception as e:  # noqa: BLE001 -- the coordinator is gone.
        if stop.is_set():
          return
        fail_now(
          f"distributed run failed on process {me}: the coordinator "
          f"(process 0) does not answer ({_first_line(e)})."
        )

  threading.Thread(target=watch, name="dsv_jax-watchdog", daemon=True).start()


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except jax.errors.JaxRuntimeError:  # Not set (yet).
    return None


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def is_initialized() -> bool:
  """Whether `initialize` connected this process (JAX's own record)."""
  return jax.distributed.is_initialized()


def is_distributed() -> bool:
  """Whether more than one process takes part in the run.

  False without `initialize`, without touching a device (the helpers
  below may run before anything else initialises JAX's backends).
  """
  return is_initialized() and jax.process_count() > 1


def is_primary() -> bool:
  """Whether this is process 0, the one that writes plain files."""
  return not is_initialized() or jax.process_index() == 0


def primary_only(fn: F) -> F:
  """`fn` runs on process 0 only; elsewhere the call returns None.

  For writes of plain files (records, jsonl, npz, PNGs): one copy each,
  never N processes racing on the same path. Never for Orbax saves, in
  which every process must take part.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if is_primary():
      return fn(*args, **kwargs)
    return None

  return wrapper  # type: ignore[return-value]


# How many barriers this process has passed: every process passes the same
# ones in the same order, so `<count>: <name>` names the same barrier on
# each, and a process that took another branch waits at another one.
_barriers = itertools.count()


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (no-op alone).

  After process 0 writes a file the others read (a stage record, the
  metrics a stage plots), so none reads it before it exists.

  Raises:
    PeerTimeout: not every process reached this barrier within the
      distributed timeout (one stopped, hangs, or runs something else).
  """
  if not is_distributed():
    return
  key = f"dsv_jax/barrier/{next(_barriers)}: {name}"
  try:
    _client().wait_at_barrier(key, int(_timeout_s * 1000))
  except jax.errors.JaxRuntimeError as e:
    raise _peer_timeout(f"not every process reached {name!r}", "one") from e


def primary_value(name: str, fn: Callable[[], Any]) -> Any:
  """`fn()` evaluated on process 0 and returned on every process.

  For a branch every process must take alike but that reads something
  another process may be changing (is a folder there yet?): each process
  looking for itself can see it before or after process 0 created it.
  `fn`'s value must be JSON-able. Waits at most the distributed timeout.

  Raises:
    PeerTimeout: process 0 did not publish the value in time.
  """
  if not is_distributed():
    return fn()
  key = f"dsv_jax/value/{next(_barriers)}: {name}"
  if is_primary():
    value = fn()
    _client().key_value_set(key, json.dumps(value))
    return value
  try:
    return json.loads(
      _client().blocking_key_value_get(key, int(_timeout_s * 1000))
    )
  except jax.errors.JaxRuntimeError as e:
    raise _peer_timeout(f"process 0 did not reach {name!r}", "it") from e


def _peer_timeout(what: str, who: str) -> PeerTimeout:
  """The one line of a wait that timed out: ``what`` did not happen, and
  ``who`` (a process) stopped, hangs or runs something else."""
  return PeerTimeout(
    f"distributed run failed on process {jax.process_index()}: {what} "
    f"within {_timeout_s:.0f} s ({BARRIER_TIMEOUT_FACTOR} x "
    f"--distributed_timeout): {who} stopped, hangs or runs something else."
  )


def describe() -> str:
  """One line: process index/count and local/global device counts."""
  return (
    f"process {jax.process_index()}/{jax.process_count()}, "
    f"{jax.local_device_count()} local / {jax.device_count()} global "
    f"{jax.default_backend()} device(s)"
  )


def log_topology() -> None:
  logging.info("JAX %s: %s.", jax.__version__, describe())


__all__ = [
  "BARRIER_TIMEOUT_FACTOR",
  "PEER_FAILURE_EXIT_STATUS",
  "PeerTimeout",
  "barrier",
  "describe",
  "fail_now",
  "initialize",
  "is_distributed",
  "is_initialized",
  "is_primary",
  "log_topology",
  "primary_only",
  "primary_value",
]
