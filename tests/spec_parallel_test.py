"""Specification test of `parallel.to_host`, `put`, `process_sum` and
`process_max` across processes: two real JAX processes on localhost (2 CPU
devices each, gloo collectives), one small script, no pipeline.

`to_host` promises every leaf as a numpy array holding the whole global
value: an array sharded over both processes' devices is gathered in its
global order, a replicated one and host values are converted as they are.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys
import numpy as np
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from dsv_jax import distributed, parallel

pid, port = int(sys.argv[1]), sys.argv[2]
distributed.initialize(f"127.0.0.1:{port}", 2, pid)
mesh = parallel.make_mesh()
assert jax.process_count() == 2 and parallel.num_shards(mesh) == 4
rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
cube = np.arange(8 * 2 * 2, dtype=np.int32).reshape(8, 2, 2) * 7 - 50
data = parallel.batch_sharding(mesh)
sharded = parallel.put({"rows": rows, "cube": cube}, data)
assert not sharded["rows"].is_fully_addressable
# A value computed on the mesh, still sharded over both processes.
doubled = jax.jit(
  lambda a: a[::-1] * 2, out_shardings=NamedSharding(mesh, P("data"))
)(sharded["rows"])
tree = {
  "sharded": sharded,
  "computed": doubled,
  "replicated": parallel.replicate(rows + 100, mesh),
  "host": rows[:2] + pid,  # a per-process host value: returned as it is
  "scalar": 3.5,
}
out = parallel.to_host(tree)
result = {
  "types": sorted({type(v).__name__ for v in jax.tree.leaves(out)}),
  "rows": out["sharded"]["rows"].tolist(),
  "cube": out["sharded"]["cube"].tolist(),
  "cube_dtype": str(out["sharded"]["cube"].dtype),
  "computed": out["computed"].tolist(),
  "replicated": out["replicated"].tolist(),
  "host": out["host"].tolist(),
  "scalar": float(out["scalar"]),
  "sum": parallel.process_sum(pid + 1.5, 2.0),
  "max": parallel.process_max(pid, -pid),
}
print("RESULT " + json.dumps(result), flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_to_host_gathers_arrays_sharded_over_two_processes(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = str(_free_port())
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "PYTHONPATH": REPO,
  }
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), port],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  results = []
  for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    results.append(json.loads(line.removeprefix("RESULT ")))
  rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  cube = np.arange(8 * 2 * 2, dtype=np.int32).reshape(8, 2, 2) * 7 - 50
  for pid, r in enumerate(results):
    assert r["types"] == ["ndarray"]
    np.testing.assert_array_equal(r["rows"], rows)
    np.testing.assert_array_equal(r["cube"], cube)
    assert r["cube_dtype"] == "int32"
    np.testing.assert_array_equal(r["computed"], rows[::-1] * 2)
    np.testing.assert_array_equal(r["replicated"], rows + 100)
    np.testing.assert_array_equal(r["host"], rows[:2] + pid)
    assert r["scalar"] == 3.5
    assert r["sum"] == [4.0, 4.0] and r["max"] == [1, 0]
