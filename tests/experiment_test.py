"""The experiment layer and the CLI: smoke run, stage records and hashes,
SIGKILL resume, the workdir lock, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import checkpoints, configs
from dsv_jax.experiment import common, registry
from dsv_jax.experiment import workdir as wdir
from dsv_jax.experiment.report import validate_report_config
from dsv_jax.experiment.stages import retrain as retrain_stage
from dsv_jax.experiment.stages import select as select_stage
from dsv_jax.experiment.stages import synthesize as synthesize_stage

# A workdir with nothing in it: hashes of configs alone.
NOWHERE = "/nonexistent-workdir"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(
  workdir, *overrides, config="configs/digits.py:tiny", wait=True, env=None
):
  cmd = [
    sys.executable,
    "-m",
    "dsv_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]
  if not wait:
    return subprocess.Popen(
      cmd,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
  return subprocess.run(
    cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env
  )


def _tiny(**train):
  c = configs.get_config("digits", "tiny")
  for k, v in train.items():
    c.train[k] = v
  return c


def _home_env(home):
  env = {**os.environ, "HOME": str(home)}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def test_cli_smoke_train_stage(tmp_path):
  # `all` (every stage, with the report) is tested in report_test.py.
  wd = tmp_path / "wd"
  # JAX's own options are flags too; compiled programs go to the default
  # on-disk cache.
  flags = ("--stage=train", "--jax_platforms=cpu")
  res = _cli(wd, *flags, env=_home_env(tmp_path / "home"))
  assert res.returncode == 0, res.stdout + res.stderr
  assert os.listdir(tmp_path / "home" / ".cache" / "dsv_jax" / "xla")
  res_off = _cli(
    tmp_path / "wd_off",
    *flags,
    "--config.train.steps=2",
    "--jax_compilation_cache_dir=",
    env=_home_env(tmp_path / "home_off"),
  )
  assert res_off.returncode == 0, res_off.stderr[-2000:]
  assert not os.path.exists(tmp_path / "home_off" / ".cache" / "dsv_jax")
  assert "[train]" in res.stdout and "test_accuracy=" in res.stdout
  assert os.path.exists(wd / "classifier" / "meta.json")
  record = wdir.stage_record(str(wd), "train")
  assert record["config_hash"] == registry.stage_hash(_tiny(), wd, "train")
  rows = [json.loads(line) for line in open(wd / "train_metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 6]
  # The classifier loads back as an apply_fn usable by DeepKKT code.
  clf = common.load_classifier(str(wd))
  assert clf.info.name == "digits"
  logits = clf.apply_fn(clf.params, np.zeros((2, 8, 8, 1), np.float32))
  assert logits.shape == (2, 10)
  # Classifier health on every split, in the record and in meta.json, and
  # in the log line of the stage.
  results = record["results"]
  for split in ("train", "val", "test"):
    for key in ("entropy", "margin", "logit_std", "accuracy", "loss"):
      assert np.isfinite(results[f"{split}_{key}"]), (split, key)
  assert 0 <= results["train_entropy"] <= results["max_entropy"]
  np.testing.assert_allclose(results["max_entropy"], np.log(10))
  assert clf.meta["results"]["train_entropy"] == results["train_entropy"]
  assert clf.meta["train"]["weight_decay"] == _tiny().train.weight_decay
  assert "health on training images: entropy" in res.stderr
  # The tiny run's finishing phase ran on the leaves a lambda can represent.
  assert results["finish_iterations"] >= 1
  assert results["represented_excluded"] == []


def test_config_change_redoes_stage(tmp_path):
  wd = str(tmp_path / "wd")
  registry.run(_tiny(), wd, "train")
  out = registry.run(_tiny(steps=4, ckpt_every=2), wd, "train")
  assert out["train"]["steps"] == 4
  assert wdir.stage_record(wd, "train")["results"]["steps"] == 4


def test_a_new_option_at_its_neutral_default_keeps_old_hashes():
  # A config from before kkt.norm_center existed hashes as one with it at
  # "mean" (what it did before), so finished runs are not redone; "min"
  # changes synthesis and must redo it.
  new = configs.get_config("digits")
  old = configs.get_config("digits")
  with old.unlocked():
    del old.kkt["norm_center"]

  def h(c):
    return registry.stage_hash(c, NOWHERE, "synthesize")

  assert h(new) == h(old)
  new.kkt.norm_center = "min"
  assert h(new) != h(old)


def test_progress_keys_do_not_change_the_stage_hashes():
  base = configs.get_config("digits")
  for stage in registry.STAGES:
    c = configs.get_config("digits")
    for section in ("train", "synth", "select", "retrain", "baseline"):
      for key in ("log_every", "ckpt_every", "eval_every"):
        if key in c[section]:
          c[section][key] += 7

    def h(c, stage=stage):
      return registry.stage_hash(c, NOWHERE, stage)

    assert h(c) == h(base)
    c.train.steps += 1  # Every stage depends on the classifier's recipe.
    assert h(c) != h(base)


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.train.stepz=3", "stepz"),
    ("--config.train.steps=abc", "steps"),
    ("--config.model.name=vgg", "model.name"),
    ("--config.train.batch_size=0", "train.batch_size"),
    ("--config.data.name=cifar11", "cifar11"),
  ],
)
def test_cli_config_errors_name_the_key(tmp_path, override, message):
  res = _cli(tmp_path / "wd", override)
  # One line, status 2, from flag parsing or the config's validation.
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("dsv: error:") and message in last, last


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_cli_user_errors_are_one_line_and_configs_resolve_by_name(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  cases = [
    (["--config=nonexistent.py", f"--workdir={tmp_path}"], "nonexistent.py"),
    (["--config=digits:tiny", f"--workdir={a_file}"], "is a file"),
  ]
  for args, message in cases:
    res = subprocess.run(
      [sys.executable, "-m", "dsv_jax.main", *args],
      cwd=tmp_path,  # Outside the clone: packaged configs by name.
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert message in res.stderr.strip().splitlines()[-1]
  # A packaged config by name runs from any directory.
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "dsv_jax.main",
      "--config=digits:tiny",
      f"--workdir={tmp_path / 'wd'}",
      "--stage=train",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  assert "[train]" in res.stdout
  # --verbosity=1 keeps the traceback for debugging.
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "dsv_jax.main",
      "--config=digits:tiny",
      f"--workdir={a_file}",
      "--verbosity=1",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert "Traceback" in res.stderr and "is a file" in res.stderr


def test_unknown_config_arg():
  with pytest.raises(ValueError, match="Unknown config arg 'huge'"):
    configs.get_config("digits", "huge")
  with pytest.raises(ValueError, match="Unknown config 'imagenet21k'"):
    configs.get_config("imagenet21k")


@pytest.mark.parametrize("name", configs.CONFIGS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_packaged_config_passes_every_stage_check(name, arg):
  # A config only the long runs use (fashion_mnist, cifar) must not fail
  # its validation hours into `all`.
  c = configs.get_config(name, arg)
  common.validate_config(c)
  select_stage.validate_select_config(c)
  retrain_stage.validate_retrain_config(c)
  validate_report_config(c)


def test_missing_classifier_error(tmp_path):
  with pytest.raises(
    FileNotFoundError, match="run `--stage train` for this workdir"
  ):
    common.load_classifier(str(tmp_path))


def test_mismatched_classifier_checkpoint(tmp_path):
  wd = str(tmp_path / "wd")
  registry.run(_tiny(), wd, "train")
  meta_path = os.path.join(wd, "classifier", "meta.json")
  meta = json.load(open(meta_path))
  meta["model"]["kwargs"]["width"] = 16  # Not the architecture stored.
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(ValueError, match="does not match the model"):
    common.load_classifier(wd)


def test_interrupted_run_of_other_config_is_not_silently_resumed(tmp_path):
  wd = str(tmp_path / "wd")
  ckptr = checkpoints.RunCheckpointer(os.path.join(wd, "ckpt", "train"))
  ckptr.save(3, {"x": np.zeros(2)}, {"config_hash": "0123456789abcdef"})
  ckptr.close()
  with pytest.raises(ValueError, match="different config"):
    registry.run(_tiny(), wd)


def _kill_after_first_checkpoint(proc, ckpt_dir):
  """SIGKILLs `proc` as soon as a finished checkpoint step exists."""
  deadline = time.time() + 240
  while _latest_step(ckpt_dir) is None and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "run finished before the kill"


def _latest_step(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return None
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
  return max(steps) if steps else None


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted(tmp_path):
  steps = 400
  overrides = (
    f"--config.train.steps={steps}",
    "--config.train.ckpt_every=5",
    "--stage=train",
  )
  killed = tmp_path / "killed"
  proc = _cli(killed, *overrides, wait=False)
  ckpt_dir = os.path.join(killed, "ckpt", "train")
  _kill_after_first_checkpoint(proc, ckpt_dir)

  res = _cli(killed, *overrides)
  assert res.returncode == 0, res.stderr
  resumed_from = wdir.stage_record(str(killed), "train")["results"][
    "resumed_from_step"
  ]
  assert 0 < resumed_from < steps
  rows = [json.loads(line) for line in open(killed / "train_metrics.jsonl")]
  logged = [r["step"] for r in rows]
  assert logged == sorted(set(logged)) and logged[-1] == steps

  clean = tmp_path / "clean"
  res = _cli(clean, *overrides)
  assert res.returncode == 0, res.stderr
  a = common.load_classifier(str(killed)).params
  b = common.load_classifier(str(clean)).params
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b
  )


# ----------------------------------------------------------------------------
# Synthesis, editing and interpolation stages.


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
  """A workdir holding the tiny digits classifier of the `train` stage."""
  wd = tmp_path_factory.mktemp("clf")
  registry.run(_tiny(), str(wd), "train")
  return wd


def _with_classifier(tiny_classifier, wd):
  import shutil

  shutil.copytree(tiny_classifier / "classifier", wd / "classifier")
  return wd


def _synth_cli(workdir, *overrides, cache, wait=True):
  # The killed, resumed and clean runs compile the same step: share it
  # (the CLI caches every program, whatever its compile time).
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
  return _cli(workdir, "--stage=synthesize", *overrides, wait=wait, env=env)


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_synthesize_sigkill_resume_equals_uninterrupted(
  tmp_path, tiny_classifier
):
  from dsv_jax import artifacts

  steps = 100
  overrides = (
    f"--config.synth.steps={steps}",
    "--config.synth.ckpt_every=5",
    "--config.synth.log_every=25",
    # Soft targets (1 - delta) y_c + delta y_{c+1} through the whole stage.
    "--config.synth.delta=0.6",
  )
  cache = tmp_path / "cache"
  killed = _with_classifier(tiny_classifier, tmp_path / "killed")
  proc = _synth_cli(killed, *overrides, cache=cache, wait=False)
  ckpt_dir = os.path.join(killed, "ckpt", "synthesize")
  _kill_after_first_checkpoint(proc, ckpt_dir)

  res = _synth_cli(killed, *overrides, cache=cache)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "candidate_steps_per_s=" in res.stderr  # Progress output.
  record = wdir.stage_record(str(killed), "synthesize")["results"]
  assert 0 < record["resumed_from_step"] < steps
  rows = [
    json.loads(line) for line in open(killed / "synthesize" / "metrics.jsonl")
  ]
  logged = [r["step"] for r in rows]
  assert logged == sorted(set(logged)) and logged[-1] == steps
  for key in ("stationarity", "primal", "stationarity_aug", "entropy"):
    assert key in rows[-1]
  assert "num_active" in rows[-1]
  # The judges that share nothing with the classifier (and the sample
  # quality distances, next to those of real validation images).
  assert 0.0 <= record["classical_agreement"] <= 1.0
  for key in ("pixels", "features"):
    assert record[f"nn_distance_{key}"] > 0
    assert record[f"nn_distance_{key}_real"] > 0

  clean = _with_classifier(tiny_classifier, tmp_path / "clean")
  res = _synth_cli(clean, *overrides, cache=cache)
  assert res.returncode == 0, res.stderr[-3000:]
  a, meta = artifacts.load_dsv(killed / "synthesize")
  b, _ = artifacts.load_dsv(clean / "synthesize")
  for name in ("images", "lambdas", "active", "entropy"):
    np.testing.assert_allclose(
      getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6
    )
  # The artifact and the drawings.
  assert a.images.shape == (20, 8, 8, 1) and a.targets.shape == (20, 10)
  np.testing.assert_allclose(a.targets[0, :2], [0.4, 0.6], rtol=1e-6)
  assert set(a.source) == {"noise"} and (a.source_index == -1).all()
  assert meta["dataset"] == "digits" and meta["config_hash"]
  orb, _ = artifacts.load_dsv(killed / "synthesize", orbax=True)
  np.testing.assert_array_equal(orb.images, a.images)
  for name in ("grid.png", "curves.png", "dsv.npz"):
    assert os.path.getsize(killed / "synthesize" / name) > 0


class _Stopped(Exception):
  pass


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_synthesis_checkpointed_on_4_devices_resumes_on_2(
  tmp_path, tiny_classifier, monkeypatch
):
  """`synth.num_devices` sets the mesh: 30 candidates pad to 32 on 4
  devices, to 30 on 2. A synthesis stopped at its checkpoint on 4 resumes
  on 2 (the same hash) and ends with an uninterrupted run's DSVs."""
  from dsv_jax import artifacts

  def config(devices):
    c = _tiny()
    c.synth.num_per_class = 3
    c.synth.num_devices = devices
    return c

  save = checkpoints.RunCheckpointer.save

  def save_then_stop(self, step, state, meta):
    save(self, step, state, meta)
    raise _Stopped

  stopped = _with_classifier(tiny_classifier, tmp_path / "stopped")
  with monkeypatch.context() as m:
    m.setattr(checkpoints.RunCheckpointer, "save", save_then_stop)
    with pytest.raises(_Stopped):
      registry.run(config(4), str(stopped), "synthesize")
  out = registry.run(config(2), str(stopped), "synthesize")["synthesize"]
  assert out["resumed_from_step"] == 3
  clean = _with_classifier(tiny_classifier, tmp_path / "clean")
  registry.run(config(4), str(clean), "synthesize")
  a, _ = artifacts.load_dsv(stopped / "synthesize")
  b, _ = artifacts.load_dsv(clean / "synthesize")
  assert a.images.shape[0] == 30
  for name in ("images", "lambdas", "active"):
    np.testing.assert_allclose(
      getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6
    )


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_each_init_stage_runs_its_own_recipe(tmp_path, tiny_classifier):
  from dsv_jax import artifacts

  def synth(name, init, **synth_kv):
    c = _tiny()
    c.synth.init = init
    for k, v in synth_kv.items():
      c.synth[k] = v
    wd = _with_classifier(tiny_classifier, tmp_path / name)
    out = synthesize_stage.run(c, str(wd))
    return out, artifacts.load_dsv(str(wd / "synthesize"))[0].images

  kinds = {"steps": 6, "image_steps": 3, "other_steps": 4}
  real, _ = synth("real", "real", **kinds)
  noise, _ = synth("noise", "noise", **kinds)
  other, _ = synth("other", "other", **kinds)
  assert (real["steps"], noise["steps"], other["steps"]) == (3, 6, 4)
  # The image lr replaces synth.lr_x, whatever synth.lr_x says.
  _, a = synth("a", "real", lr_x=0.5, image_lr_x=0.01)
  _, b = synth("b", "real", lr_x=0.01, image_lr_x=0.0)
  _, c = synth("c", "real", lr_x=0.01, image_lr_x=0.5)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(b, c)


# ----------------------------------------------------------------------------
# Workdir bookkeeping: the hash, the lock, the writers.


def test_the_hash_covers_the_classifier_content_and_the_version(
  tmp_path, tiny_classifier, monkeypatch
):
  import dsv_jax

  ext = _with_classifier(tiny_classifier, tmp_path / "external")
  c = _tiny()
  c.synth.classifier = str(ext)
  before = registry.stage_hash(c, NOWHERE, "synthesize")
  # Retraining an external classifier redoes the stages that inverted it.
  meta = ext / "classifier" / "meta.json"
  meta.write_text(meta.read_text().replace('"seed": 0', '"seed": 7'))
  assert registry.stage_hash(c, NOWHERE, "synthesize") != before
  after = registry.stage_hash(c, NOWHERE, "synthesize")
  monkeypatch.setattr(dsv_jax, "__version__", "99.0")
  assert registry.stage_hash(c, NOWHERE, "synthesize") != after
  # Downstream records are inputs: a redone upstream redoes the report.
  wd = _with_classifier(tiny_classifier, tmp_path / "wd")
  h = registry.stage_hash(_tiny(), str(wd), "retrain")
  wdir.mark_done(str(wd), "synthesize", "abc", {})
  assert registry.stage_hash(_tiny(), str(wd), "retrain") != h


def test_metrics_rows_stay_json_when_a_value_is_not_finite(tmp_path):
  # lambda_min of a run with no active candidate is inf: strict JSON
  # readers reject Infinity, so the row holds null.
  path = str(tmp_path / "metrics.jsonl")
  write = wdir.jsonl_writer(path, keep_through_step=0)
  write({"step": 1, "lambda_min": float("inf"), "loss": float("nan")})
  write({"step": 2, "lambda_min": 0.5, "loss": 1.0})

  def strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(c))

  rows = [strict(line) for line in open(path)]
  assert rows[0]["lambda_min"] is None and rows[0]["loss"] is None
  assert rows[1]["lambda_min"] == 0.5


def test_a_resumed_run_logs_each_step_once(tmp_path):
  # A fallback past a damaged checkpoint resumes before the newest step
  # on disk: the redone steps replace the rows the first run logged.
  path = str(tmp_path / "metrics.jsonl")
  write = wdir.jsonl_writer(path, keep_through_step=0)
  for step in range(1, 8):
    write({"step": step, "run": 1})
  write = wdir.jsonl_writer(path, keep_through_step=6)  # Step 7 is gone.
  assert [r["step"] for r in map(json.loads, open(path))] == list(range(1, 7))
  write({"step": 4, "run": 2})  # Resumed from step 3.
  write({"step": 5, "run": 2})
  rows = [json.loads(line) for line in open(path)]
  assert [(r["step"], r["run"]) for r in rows] == [
    (1, 1),
    (2, 1),
    (3, 1),
    (4, 2),
    (5, 2),
  ]


def test_a_second_run_on_a_workdir_fails_naming_the_holder(tmp_path):
  wd = str(tmp_path / "wd")
  with wdir.lock(wd):
    with pytest.raises(wdir.WorkdirLocked, match=f"pid {os.getpid()} on"):
      registry.run(_tiny(), wd, "train")
    # Not taken over either: the holder is alive.
    assert json.load(open(os.path.join(wd, ".lock")))["pid"] == os.getpid()
  assert not os.path.exists(os.path.join(wd, ".lock"))
  # A lock left by a killed run of this host is taken over.
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
  ).stdout.strip()
  import socket

  with open(os.path.join(wd, ".lock"), "w") as f:
    json.dump({"pid": int(dead), "host": socket.gethostname()}, f)
  with wdir.lock(wd):
    assert json.load(open(os.path.join(wd, ".lock")))["pid"] == os.getpid()
  # One from another host is not guessed about.
  with open(os.path.join(wd, ".lock"), "w") as f:
    json.dump({"pid": 1, "host": "elsewhere", "started": "x"}, f)
  with pytest.raises(wdir.WorkdirLocked, match="on elsewhere since x"):
    with wdir.lock(wd):
      pass


def test_a_crash_while_saving_the_classifier_keeps_the_old_one(
  tmp_path, tiny_classifier, monkeypatch
):
  from dsv_jax.experiment.stages import train as train_stage

  wd = _with_classifier(tiny_classifier, tmp_path / "wd")
  clf = common.load_classifier(str(wd))
  before = clf.params
  arrays = {"params": clf.params, "model_state": clf.functional.state}
  save = checkpoints.save_classifier

  def crash_after_arrays(path, arrays, meta):
    save(path, arrays, {**meta, "seed": 123})
    os.remove(os.path.join(path, "meta.json"))  # Half written.
    raise OSError("disk full")

  monkeypatch.setattr(checkpoints, "save_classifier", crash_after_arrays)
  with pytest.raises(OSError, match="disk full"):
    train_stage._save_classifier_atomically(str(wd), arrays, clf.meta)
  after = common.load_classifier(str(wd))
  assert after.meta["seed"] == 0
  jax.tree.map(np.testing.assert_array_equal, before, after.params)


def test_only_per_candidate_state_is_sharded():
  # An optimiser whose own state happens to have one row per candidate
  # (here 4 rows for 4 candidates) keeps it replicated.
  import optax

  from dsv_jax import parallel, synthesize
  from dsv_jax.experiment import synthesis_loop

  def counter_tx():
    def init(params):
      del params
      return jnp.zeros((4,), jnp.float32)  # Not per candidate.

    def update(updates, state, params=None):
      del params
      return updates, state + 1

    return optax.GradientTransformation(init, update)

  apply_fn = lambda p, x: x.reshape(len(x), -1) @ p  # noqa: E731
  params = jnp.ones((64, 10), jnp.float32) / 64
  synth = synthesize.make_synthesizer(
    apply_fn, x_tx=optax.chain(optax.adam(0.01), counter_tx())
  )
  mesh = parallel.make_mesh()
  n = parallel.num_shards(mesh)
  x0 = jnp.zeros((n, 8, 8, 1), jnp.float32)
  t = jnp.arange(n, dtype=jnp.int32)
  valid = jnp.ones((n,), bool)
  sh = synthesis_loop.state_shardings(
    lambda k, x, tt, v: synth.init_fn(k, params, x, tt, active=v),
    x0,
    t,
    valid,
    jax.random.key(0),
    mesh,
  )
  batch = parallel.batch_sharding(mesh)
  assert sh.x == batch and sh.lambda_param == batch and sh.active == batch
  adam_state, counter = sh.opt_x
  assert adam_state[0].mu == batch  # Adam's moments follow x.
  assert counter == parallel.replicated_sharding(mesh)


def test_retraining_rows_are_keyed_by_the_model_and_data_too():
  # After --config.model.width=... the random-real rows must not come back
  # from the cache of the old architecture.
  c = _tiny()
  images = np.zeros((2, 8, 8, 1), np.float32)
  labels = np.array([0, 1], np.int32)
  key = retrain_stage.row_key(c, images, labels)
  wider = _tiny()
  wider.model.width *= 2
  assert retrain_stage.row_key(wider, images, labels) != key
  other_data = _tiny()
  other_data.data.max_train = 7
  assert retrain_stage.row_key(other_data, images, labels) != key
  assert retrain_stage.row_key(_tiny(), images, labels) == key


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_the_python_api_shows_progress_without_library_chatter(tmp_path):
  # From a script or a notebook (no absl flags parsed), run() logs its
  # progress to stderr; progress=False keeps it quiet.
  script = f"""
import sys
from dsv_jax import configs
from dsv_jax.experiment import registry
c = configs.get_config("digits", "tiny")
registry.run(c, {str(tmp_path / "a")!r}, "train")
print("--quiet--", file=sys.stderr, flush=True)
registry.run(c, {str(tmp_path / "b")!r}, "train", progress=False)
"""
  res = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, res.stderr[-2000:]
  loud, quiet = res.stderr.split("--quiet--")
  assert "Stage train: starting" in loud and "train step 6/6" in loud
  assert "CheckpointManager" not in loud  # Orbax's per-save lines.
  assert "Stage train" not in quiet


# Tens of seconds on 2 cores: with the slow tests (`.ci/run`).
@pytest.mark.slow
def test_damaged_training_checkpoints_resume_or_fail_in_one_line(tmp_path):
  import glob

  wd = tmp_path / "wd"
  flags = ("--stage=train", "--config.train.ckpt_every=2")
  assert _cli(wd, *flags).returncode == 0  # Steps 4 and 6 stay.
  ckpt = os.path.join(wd, "ckpt", "train")

  def damage(step):
    files = glob.glob(
      os.path.join(ckpt, str(step), "state", "**", "manifest.ocdbt"),
      recursive=True,
    )
    assert files
    for path in files:
      open(path, "wb").close()

  # A fresh process each time: tensorstore caches what it read in-process.
  damage(6)
  res = _cli(wd, *flags)
  assert res.returncode == 0, res.stderr[-2000:]
  record = wdir.stage_record(str(wd), "train")["results"]
  assert record["resumed_from_step"] == 4
  assert res.stderr.count("do not restore") == 1
  rows = [json.loads(line) for line in open(wd / "train_metrics.jsonl")]
  train_steps = [r["step"] for r in rows if "loss" in r]
  assert train_steps == sorted(set(train_steps)), train_steps
  damage(4)
  damage(6)
  out = _cli(wd, *flags)
  assert out.returncode == 2
  lines = out.stderr.splitlines()
  ours = [ln for ln in lines if ln.startswith("dsv: error")]
  assert len(ours) == 1 and "No checkpoint step in" in ours[0]
  assert len(ours[0]) < 800
  # Nothing from Orbax's failed reads around it (it was 100-250 lines of
  # asyncio tracebacks in most runs): only our INFO log lines.
  assert all(ln[:1] == "I" or ln in ours for ln in lines), out.stderr[-3000:]
