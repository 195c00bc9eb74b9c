r"""Mutation check: does the default test suite catch plausible bugs?

Every entry of `MUTATIONS` is a bug someone could plausibly write: one or
more exact string replacements in the package (each anchor must occur
exactly once, so that a mutation cannot silently stop applying when the code
moves) and the test files, or test ids, that must catch it. For each
mutation this script copies the repository (the files git tracks or does
not ignore) to a scratch folder, applies the mutation there, runs those
tests with `PYTHONPATH` pointing at the copy, and prints whether they
failed (the mutation is killed) or passed (it survived); then a markdown
table of all of them. A baseline run of every listed test on the unmutated
copy comes first: a kill means something only if those tests pass without
the mutation.

The tests named here are the ones written to catch each bug; the default
suite contains them all. tests/mutation_check_test.py, in the default
suite, checks that every anchor still matches exactly once and that every
named test exists.

  python benchmarks/mutation_check.py                   # every mutation
  python benchmarks/mutation_check.py --only retrain    # names with it
  python benchmarks/mutation_check.py --list            # names and tests
  python benchmarks/mutation_check.py --no-baseline -j 1

Slow: about 25 minutes for the whole list on 2 shared CPU cores (the
baseline 5 of them; compilation of the tiny models dominates).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutation(NamedTuple):
  """A plausible bug and the tests that must catch it.

  Attributes:
    name: what the bug does, in a few words.
    edits: ``(path, anchor, replacement)`` triples; ``anchor`` must occur
      exactly once in the file at ``path`` (relative to the repository).
    tests: pytest targets (``tests/x_test.py`` or ``tests/x_test.py::test``)
      that must fail with the mutation applied.
  """

  name: str
  edits: tuple[tuple[str, str, str], ...]
  tests: tuple[str, ...]


SYN = "dsv_jax/synthesize.py"
CAND_OPT = "dsv_jax/candidate_opt.py"
AUG = "dsv_jax/augment.py"
RET = "dsv_jax/retrain.py"
RET_STAGE = "dsv_jax/experiment/stages/retrain.py"
SEL_FIT = "dsv_jax/select/fit.py"
SEL_OP = "dsv_jax/select/operator.py"
SEL_RANK = "dsv_jax/select/ranking.py"
SEL_STAGE = "dsv_jax/experiment/stages/select.py"
SECTIONS = "dsv_jax/experiment/report/sections.py"
BOUNDARY = "dsv_jax/experiment/report/boundary_sections.py"
KKT = "dsv_jax/kkt.py"
KKT_ENGINE = "dsv_jax/_kkt_engine.py"

T_SYN = "tests/synthesize_test.py"
T_ASSEMBLY = f"{T_SYN}::test_loss_is_the_sum_of_its_terms"
T_RET = "tests/retrain_test.py"
T_RET_EVAL = f"{T_RET}::test_shapes_and_seed_determinism"
T_RET_STAGE = f"{T_RET}::test_run_retrain_stage"
T_RET_REF = f"{T_RET}::test_batched_models_equal_sequential_reference"
T_SEL_STAGE = "tests/select_test.py::test_stage_outputs_resume_and_mismatch"
T_LAMBDA_ACC = "tests/report_test.py::test_lambda_accuracy_section_known_values"
T_CORESET = (
  "tests/report_test.py::test_coreset_section_ranks_and_draws_as_documented"
)
T_AUG = "tests/train_test.py::test_augmentations"

RETRAIN_ON_TRAIN = (
  RET_STAGE,
  "split = ds.split(r.eval_split)",
  "split = ds.train",
)

MUTATIONS: tuple[Mutation, ...] = (
  # The mutation audit of issue 15: each survived the suite before.
  Mutation(
    "synthesis: the augmentation A(x) is never applied",
    ((SYN, "xa = x if augment_fn is None else augment_fn(key, x)", "xa = x"),),
    (T_ASSEMBLY,),
  ),
  Mutation(
    "synthesis: the eta * L_kkt(A(x)) term is dropped from the total",
    ((SYN, "total = total + eta * aug", "total = total"),),
    (T_ASSEMBLY,),
  ),
  Mutation(
    "synthesis: the stationarity term is dropped entirely",
    (
      (
        SYN,
        '"only": (gated, beta_primal) if beta_stationarity == 0 else None,',
        '"only": (gated, beta_primal),',
      ),
    ),
    (T_ASSEMBLY,),
  ),
  Mutation(
    "augment.random_translate returns x unchanged",
    ((AUG, "  if max_shift <= 0:\n    return x", "  if True:\n    return x"),),
    (T_AUG, T_RET_REF),
  ),
  Mutation(
    "retrain stage: retrain_sets evaluates on the train split",
    (RETRAIN_ON_TRAIN,),
    (T_RET_STAGE,),
  ),
  Mutation(
    "retrain: evaluates on its own training images",
    (
      (
        RET,
        "np.asarray(eval_images, np.float32),\n    np.asarray(eval_labels),",
        "one_set,\n    np.asarray(targets),",
      ),
    ),
    (T_RET_EVAL,),
  ),
  Mutation(
    "retrain: _make_eval drops the padding mask",
    (
      (
        RET,
        "hits = (jnp.argmax(logits, -1) == y) & mask",
        "hits = jnp.argmax(logits, -1) == y",
      ),
    ),
    (T_RET_EVAL,),
  ),
  Mutation(
    "report: per-class accuracy on the train split (and retrain on train)",
    (
      (
        BOUNDARY,
        'clf.params, ds.test["image"]).argmax(-1)',
        'clf.params, ds.train["image"]).argmax(-1)',
      ),
      (BOUNDARY, 'y = ds.test["label"]', 'y = ds.train["label"]'),
      RETRAIN_ON_TRAIN,
    ),
    (T_LAMBDA_ACC, T_RET_STAGE),
  ),
  Mutation(
    "select stage: ranks lowest score first",
    ((SEL_STAGE, "scores = select.scores(", "scores = -select.scores("),),
    (T_SEL_STAGE,),
  ),
  # Our own.
  Mutation(
    "synthesis: the augmented term ignores the active mask",
    (
      (
        SYN,
        "apply_fn, params, xa, lambdas, active, targets, **kkt_kw",
        "apply_fn, params, xa, lambdas, None, targets, **kkt_kw",
      ),
    ),
    (f"{T_SYN}::test_active_mask_removes_candidates",),
  ),
  Mutation(
    "synthesis: every step draws A(x) with the same key",
    (
      (
        CAND_OPT,
        "step_key = jax.random.fold_in(key, state.step)",
        "step_key = key",
      ),
    ),
    (f"{T_SYN}::test_steps_use_their_own_key_and_the_optimiser_update",),
  ),
  Mutation(
    "synthesis: clips to the global pixel range, not per channel",
    (
      (
        CAND_OPT,
        "return jnp.clip(x, lo, hi)",
        "return jnp.clip(x, jnp.min(lo), jnp.max(hi))",
      ),
    ),
    (f"{T_SYN}::test_clipping_is_per_channel",),
  ),
  Mutation(
    "synthesis: the TV prior counts vertical differences twice",
    ((SYN, "masked_mean(dh + dw, active)", "masked_mean(dh + dh, active)"),),
    (T_ASSEMBLY,),
  ),
  Mutation(
    "synthesis: the TV prior is weighted by beta_norm",
    (
      (
        SYN,
        "total = total + beta_tv * tv",
        "total = total + beta_norm * tv",
      ),
    ),
    (T_ASSEMBLY,),
  ),
  Mutation(
    "synthesis config: beta_tv is read from kkt.beta_norm",
    (
      (
        "dsv_jax/experiment/common.py",
        '"beta_tv": k.beta_tv,',
        '"beta_tv": k.beta_norm,',
      ),
    ),
    (f"{T_SYN}::test_config_reaches_the_synthesizer",),
  ),
  Mutation(
    "augment.random_flip never flips",
    (
      (
        AUG,
        "flip = jax.random.bernoulli(key, prob, (x.shape[0],))",
        "flip = jax.random.bernoulli(key, 0.0, (x.shape[0],))",
      ),
    ),
    (T_AUG, T_RET_REF),
  ),
  Mutation(
    "retrain: the K models share one batch and augmentation key",
    (
      (
        RET,
        "fold_in(jax.random.fold_in(jax.random.key(seed), 1), index)",
        "fold_in(jax.random.key(seed), 1)",
      ),
    ),
    (T_RET_REF,),
  ),
  Mutation(
    "retrain: accuracy divides by the padded count",
    (
      (
        RET,
        "return total.astype(np.float64) / len(labels)",
        "return total.astype(np.float64) / (-(-len(labels) // batch_size) "
        "* batch_size)",
      ),
    ),
    (T_RET_EVAL,),
  ),
  Mutation(
    "retrain stage: the random baseline is drawn from the test split",
    (
      (
        RET_STAGE,
        "jax.random.fold_in(key, i), ds.train, labels",
        "jax.random.fold_in(key, i), ds.test, labels",
      ),
    ),
    (T_RET_STAGE,),
  ),
  Mutation(
    "select: scores ignore the rankable mask",
    (
      (
        SEL_RANK,
        "out = np.where(np.asarray(rankable, bool), out, 0).astype(np.float32)",
        "out = out.astype(np.float32)",
      ),
    ),
    (T_SEL_STAGE,),
  ),
  Mutation(
    "select: rank_per_class puts the lowest score first",
    (
      (
        SEL_RANK,
        'idx[np.argsort(-scores[idx], kind="stable")]',
        'idx[np.argsort(scores[idx], kind="stable")]',
      ),
    ),
    ("tests/select_test.py::test_bad_inputs",),
  ),
  Mutation(
    "select stage: the DSV set records the scores as its lambdas",
    ((SEL_STAGE, "lambdas=lambdas[top],", "lambdas=scores[top],"),),
    (T_SEL_STAGE,),
  ),
  Mutation(
    "select stage: the random comparison group is the selected one",
    (
      (
        SEL_STAGE,
        "clf.params, x[rand], labels[rand]),",
        "clf.params, x[top], labels[top]),",
      ),
    ),
    (T_SEL_STAGE,),
  ),
  Mutation(
    "report: the Pearson sign is flipped",
    (
      (
        BOUNDARY,
        "stats.pearsonr(sums, acc)",
        "stats.pearsonr(sums, -acc)",
      ),
    ),
    (T_LAMBDA_ACC,),
  ),
  Mutation(
    "report: per-class sums of the score instead of lambda",
    (
      (
        BOUNDARY,
        'sums = np.array([sel["lambdas"][labels == k]',
        'sums = np.array([sel["scores"][labels == k]',
      ),
    ),
    (T_LAMBDA_ACC,),
  ),
  Mutation(
    "report: flip rates count misclassified test images too",
    ((BOUNDARY, "keep = pred == labels", "keep = pred == pred"),),
    ("tests/report_test.py::test_flip_rates_known_answer",),
  ),
  Mutation(
    "report: the coreset selection row takes the lowest ranked",
    (
      (
        SECTIONS,
        'np.concatenate([sel["ranking"][j][:k] for j in range(c)])',
        'np.concatenate([sel["ranking"][j][-k:] for j in range(c)])',
      ),
    ),
    (T_CORESET,),
  ),
  Mutation(
    "report: the coreset random row gives every model the same draw",
    (
      (
        SECTIONS,
        "jax.random.fold_in(key, 1000 * k + m), labels, c, k",
        "jax.random.fold_in(key, 1000 * k), labels, c, k",
      ),
    ),
    (T_CORESET,),
  ),
  Mutation(
    "report: the EL2N row takes the lowest scores",
    (
      (
        SECTIONS,
        '"el2n": select.top_per_class(el2n, labels, c, k),',
        '"el2n": select.top_per_class(-el2n, labels, c, k),',
      ),
    ),
    (T_CORESET,),
  ),
  Mutation(
    "kkt: inactive candidates keep their multiplier",
    (
      (
        KKT,
        "effective = lambdas if active is None else jnp.where(active, "
        "lambdas, 0.0)",
        "effective = lambdas",
      ),
    ),
    ("tests/kkt_test.py",),
  ),
  Mutation(
    "kkt: the primal gate zeroes the misclassified instead",
    (
      (
        KKT_ENGINE,
        "losses = jnp.where(correct, 0.0, losses)",
        "losses = jnp.where(correct, losses, 0.0)",
      ),
    ),
    ("tests/kkt_test.py",),
  ),
  Mutation(
    "kkt: the cosine distance has the wrong sign",
    (
      (
        KKT_ENGINE,
        "return 1.0 + _vdot(params, g) / norms",
        "return 1.0 - _vdot(params, g) / norms",
      ),
    ),
    ("tests/kkt_test.py",),
  ),
  Mutation(
    "kkt: soft-target cross-entropy without the log",
    (
      (
        KKT_ENGINE,
        "-jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)",
        "-jnp.sum(targets * jax.nn.softmax(logits, axis=-1), axis=-1)",
      ),
    ),
    ("tests/kkt_test.py",),
  ),
  Mutation(
    "data: the validation images stay in the training split",
    (
      (
        "dsv_jax/data/loading.py",
        "kept = np.setdiff1d(np.arange(len(labels)), held_out, "
        "assume_unique=True)",
        "kept = np.arange(len(labels))",
      ),
    ),
    ("tests/data_test.py",),
  ),
  Mutation(
    "data: normalisation statistics include the validation images",
    (
      (
        "dsv_jax/data/loading.py",
        'mean, std = _channel_stats(splits["train"][0], max_value)',
        'mean, std = _channel_stats(raw["train"][0], max_value)',
      ),
    ),
    ("tests/data_test.py",),
  ),
  Mutation(
    "data: denormalize adds the mean before scaling",
    (
      (
        "dsv_jax/data/core.py",
        "return images * std + mean",
        "return (images + mean) * std",
      ),
    ),
    ("tests/data_test.py",),
  ),
  Mutation(
    "models: the default ConvNet max-pools",
    (
      (
        "dsv_jax/models.py",
        'if kind == "avg":\n    return nnx.avg_pool',
        'if kind == "avg":\n    return nnx.max_pool',
      ),
    ),
    (
      "tests/models_test.py::"
      "test_default_convnet_matches_a_reference_computation",
    ),
  ),
  # Accelerator readiness and hardening (issues 14, 16, 18).
  Mutation(
    "synthesis: the loop's step closes over theta again",
    (
      (
        SYN,
        "    state, metrics = synth.step(state, params, targets, step_key)",
        "    state, metrics = jax.jit(\n"
        "      lambda s, t, k: synth.step_fn(s, params, t, k)\n"
        "    )(state, targets, step_key)",
      ),
    ),
    ("tests/programs_test.py",),
  ),
  Mutation(
    "select: the solver's distance closes over theta*",
    (
      (
        SEL_FIT,
        "  def value_and_dual(g):\n    return value_and_dual_at(params, g)",
        "  def value_and_dual(g):\n    return jax.jit(lambda gg: "
        "value_and_dual_at(params, gg))(g)",
      ),
    ),
    ("tests/programs_test.py",),
  ),
  Mutation(
    "select: padding slots keep the lambda of the row they repeat",
    (
      (
        SEL_OP,
        "  lam = np.where(real, np.asarray(lambdas, np.float32)[slots], 0)\n",
        "  lam = np.asarray(lambdas, np.float32)[slots]\n",
      ),
    ),
    (
      "tests/select_test.py::test_stationarity_residuals_match_explicit_gradients",
    ),
  ),
  Mutation(
    "train: the batch is not split over the mesh",
    (
      (
        "dsv_jax/train.py",
        "    if split is not None:\n      images, labels = "
        "jax.lax.with_sharding_constraint(",
        "    if False:\n      images, labels = "
        "jax.lax.with_sharding_constraint(",
      ),
    ),
    (
      "tests/train_test.py::test_a_batch_split_over_devices_trains_the_same_model",
    ),
  ),
  Mutation(
    "retrain: the K models stay on one device",
    (
      (
        RET,
        '  split = vectorize == "vmap" and num_models % '
        "parallel.num_shards(mesh) == 0",
        "  split = False",
      ),
    ),
    (f"{T_RET}::test_models_split_over_devices_equal_one_device",),
  ),
  Mutation(
    "models.predict keeps the padded rows",
    (
      (
        "dsv_jax/models.py",
        "out.append(np.asarray(_logits(apply_fn, params, x))[:real])",
        "out.append(np.asarray(_logits(apply_fn, params, x)))",
      ),
    ),
    (
      "tests/programs_test.py::"
      "test_predict_compiles_a_few_programs_for_any_number_of_images",
    ),
  ),
  Mutation(
    "metrics: a resumed run keeps the rows it redoes",
    (
      (
        "dsv_jax/experiment/workdir.py",
        '      rows = [r for r in rows if r["step"] < row["step"]]\n',
        "      rows = list(rows)\n",
      ),
    ),
    ("tests/experiment_test.py::test_a_resumed_run_logs_each_step_once",),
  ),
  Mutation(
    "checkpoints: every save waits for the disk",
    (
      (
        "dsv_jax/checkpoints.py",
        "    self._last_saved = step\n",
        "    self._last_saved = step\n"
        "    self._manager.wait_until_finished()\n",
      ),
    ),
    (
      "tests/checkpoints_test.py::test_saves_run_in_the_background_until_close",
    ),
  ),
)


def problems(root: str = REPO, mutations=MUTATIONS) -> list[str]:
  """Everything that keeps `mutations` from applying to the tree at `root`.

  An anchor that does not occur exactly once, a replacement equal to its
  anchor, a test file or test function that does not exist, a repeated
  name. Empty when every mutation applies.
  """
  out = []
  names = [m.name for m in mutations]
  out += [
    f"repeated name: {n}" for n in sorted(set(names)) if names.count(n) > 1
  ]
  for m in mutations:
    for path, anchor, new in m.edits:
      full = os.path.join(root, path)
      if not os.path.exists(full):
        out.append(f"{m.name}: no file {path}")
        continue
      with open(full) as f:
        count = f.read().count(anchor)
      if count != 1:
        out.append(
          f"{m.name}: anchor {anchor!r} occurs {count} times in {path}"
        )
      if new == anchor:
        out.append(f"{m.name}: replacement equals the anchor")
    for target in m.tests:
      path, _, test = target.partition("::")
      full = os.path.join(root, path)
      if not os.path.exists(full):
        out.append(f"{m.name}: no test file {path}")
      elif test:
        with open(full) as f:
          if not re.search(rf"^def {re.escape(test)}\(", f.read(), re.M):
            out.append(f"{m.name}: no test {target}")
  return out


def copy_repo(dst: str) -> None:
  """Copies the files git tracks or does not ignore from `REPO` to `dst`."""
  files = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=REPO,
    capture_output=True,
    check=True,
  ).stdout.decode()
  for rel in filter(None, files.split("\0")):
    src = os.path.join(REPO, rel)
    if not os.path.isfile(src):  # Deleted but still tracked.
      continue
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    shutil.copy2(src, os.path.join(dst, rel))


def run_tests(
  root: str, tests: tuple[str, ...], workers: int, timeout: float
) -> tuple[str, float, str]:
  """Runs pytest on `tests` in `root`: ("passed" | "failed" | "timeout",
  seconds, the output)."""
  n = workers if any("::" not in t for t in tests) or len(tests) > 1 else 0
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", str(n), *tests]
  env = dict(os.environ, PYTHONPATH=root)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
      cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )
  except subprocess.TimeoutExpired:
    return "timeout", time.perf_counter() - t0, ""
  status = "passed" if proc.returncode == 0 else "failed"
  return status, time.perf_counter() - t0, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
  """The first test pytest's summary names as failed or erroring, or ""."""
  found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
  return found.group(1).removeprefix("tests/") if found else ""


def apply(root: str, mutation: Mutation) -> dict[str, str]:
  """Applies `mutation` in `root`; returns the original texts by path."""
  originals = {}
  for path, anchor, new in mutation.edits:
    full = os.path.join(root, path)
    with open(full) as f:
      text = f.read()
    originals.setdefault(path, text)
    if text.count(anchor) != 1:
      raise RuntimeError(f"{mutation.name}: anchor {anchor!r} not unique")
    with open(full, "w") as f:
      f.write(text.replace(anchor, new))
  return originals


def restore(root: str, originals: dict[str, str]) -> None:
  for path, text in originals.items():
    with open(os.path.join(root, path), "w") as f:
      f.write(text)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="substring of the names")
  parser.add_argument("--list", action="store_true", help="list and exit")
  parser.add_argument("--no-baseline", action="store_true")
  parser.add_argument("-j", "--workers", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=1200.0)
  args = parser.parse_args()
  stale = problems()
  if stale:
    print("Mutations that no longer apply:\n  " + "\n  ".join(stale))
    return 2
  chosen = [m for m in MUTATIONS if args.only in m.name]
  if args.list:
    for m in chosen:
      print(f"{m.name}\n    {' '.join(m.tests)}")
    return 0
  scratch = tempfile.mkdtemp(prefix="dsv_mutation_")
  try:
    copy_repo(scratch)
    if not args.no_baseline:
      targets = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
      status, secs, tail = run_tests(
        scratch, targets, args.workers, args.timeout
      )
      print(f"baseline (no mutation): {status} in {secs:.0f} s", flush=True)
      if status != "passed":
        print(tail[-3000:])
        return 1
    rows = []
    for i, m in enumerate(chosen, 1):
      originals = apply(scratch, m)
      try:
        status, secs, out = run_tests(
          scratch, m.tests, args.workers, args.timeout
        )
      finally:
        restore(scratch, originals)
      verdict = {"failed": "killed", "passed": "SURVIVED"}.get(status, status)
      failed = first_failure(out) if status == "failed" else "-"
      rows.append((m, verdict, failed))
      print(
        f"[{i}/{len(chosen)}] {verdict:8s} {secs:5.0f} s  {m.name}  {failed}",
        flush=True,
      )
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print("\n| mutation | file | first failing test | result |")
  print("|---|---|---|---|")
  for m, verdict, failed in rows:
    files = ", ".join(dict.fromkeys(p for p, _, _ in m.edits))
    print(f"| {m.name} | {files} | {failed} | {verdict} |")
  survived = sum(v != "killed" for _, v, _ in rows)
  print(f"\n{len(rows) - survived} of {len(rows)} killed.")
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
