"""The paper's claims against our measurements: the reproduction table.

Generated from the report stage's `results.json` (one per workdir, e.g. a
digits and a Fashion-MNIST run), never typed by hand:

  python -m dsv_jax.experiment.report.reproduction \
      --workdir W_digits --workdir W_fashion
  python -m dsv_jax.experiment.report.reproduction \
      --workdir W1 --workdir W2 --readme README.md

The second form rewrites the README's table between the markers
`<!-- reproduction:begin -->` and `<!-- reproduction:end -->`.

Each claim is a function of one run's results that returns a cell (the
numbers, with a p-value and the number of seeds where the claim is decided
by retraining) and a verdict: True (holds), False (does not), None (not
measured in that run). A claim holds only where the direction is the
paper's and, where a p-value exists, p < `ALPHA`.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

from etils import epath

ALPHA = 0.05
BEGIN, END = "<!-- reproduction:begin -->", "<!-- reproduction:end -->"

# (text, verdict): True holds, False does not, "partly" (some of several
# comparisons hold), None not measured.
Cell = tuple[str, bool | str | None]


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
  """Two-sided Welch t-test p-value of ``mean(a) != mean(b)``."""
  import numpy as np
  from scipy import stats

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if np.std(a) == 0 and np.std(b) == 0:
    return 1.0 if np.mean(a) == np.mean(b) else 0.0
  return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _acc(row: dict) -> str:
  return f"{100 * row['mean']:.1f} +- {100 * row['std']:.1f}"


def _row(few_shot: dict, k: int, prefix: str) -> dict | None:
  for name, row in few_shot.items():
    if name.startswith(f"k{k}/{prefix}"):
      return row
  return None


def _vs_shots(results: dict, prefix: str, ks: Sequence[int] | None) -> Cell:
  """A few-shot row against the k real shots per class, per k."""
  few = results.get("few_shot", {})
  ks_run = sorted({int(n.split("/")[0][1:]) for n in few})
  parts = []
  for k in ks_run if ks is None else [k for k in ks if k in ks_run]:
    row, shots = _row(few, k, prefix), _row(few, k, "k random real")
    if row is not None and shots is not None:
      parts.append(_compare(f"k={k}", row, shots))
  return _join(parts)


def _compare(label: str, row: dict, reference: dict) -> Cell:
  """``row`` against ``reference``: better, and significantly so?"""
  diff = 100 * (row["mean"] - reference["mean"])
  p = welch_p(row["accuracies"], reference["accuracies"])
  text = (
    f"{label}: {_acc(row)} vs {_acc(reference)} ({diff:+.1f}; p={p:.2g}, "
    f"n={len(row['accuracies'])})"
  )
  return text, diff > 0 and p < ALPHA


def _join(parts: list[Cell]) -> Cell:
  """One cell of several comparisons: holds if every one does, "partly"
  if some do."""
  if not parts:
    return "not run", None
  held = [v for _, v in parts]
  verdict = True if all(held) else ("partly" if any(held) else False)
  return "; ".join(t for t, _ in parts), verdict


def k_shot(results: dict) -> Cell:
  return _vs_shots(results, "DSV (real init)", None)


def zero_shot(results: dict) -> Cell:
  """0-shot DSVs from another data set against random real, at 10/class."""
  few = results.get("few_shot", {})
  names = [n for n in few if "DSV (" in n and "init)" in n]
  sources = sorted(
    {n.split("/", 1)[1] for n in names}
    - {"DSV (noise init)", "DSV (real init)"}
  )
  if not sources:
    return "not run (no other data set offline)", None
  return _vs_shots(results, sources[0], [10])


def noise_shot(results: dict) -> Cell:
  return _vs_shots(results, "DSV (noise init)", [10])


def coreset(results: dict) -> Cell:
  """Top-lambda training images (the paper's ranking) against random."""
  return _join(
    [
      _compare(name.replace("k", "k="), res["selected_lambda"], res["random"])
      for name, res in results.get("coreset", {}).items()
    ]
  )


def synthesis_entropy(results: dict) -> Cell:
  """Candidates' mean entropy rises during synthesis: holds if it rises
  from every init measured, "partly" if from some."""
  curves = results.get("boundary", {}).get("entropy_curves", {})
  if not curves:
    return "not run", None
  parts = [f"{n}: {v[0]:.3f} -> {v[-1]:.3f}" for n, v in curves.items()]
  rose = [v[-1] > v[0] for v in curves.values()]
  verdict = True if all(rose) else ("partly" if any(rose) else False)
  return "; ".join(parts), verdict


def protocol_entropy(results: dict) -> Cell:
  """The paper's protocol: top-lambda candidates gain entropy, lowest lose."""
  proto = results.get("boundary", {}).get("entropy_protocol", {})
  top = [v for n, v in proto.items() if n.startswith("top-")]
  low = [v for n, v in proto.items() if n.startswith("lowest-")]
  if not top or not low:
    return "not run", None
  parts = [
    f"{n}: {v[0]:.3f} -> {v[-1]:.3f}"
    for n, v in proto.items()
    if not n.startswith("all")
  ]
  return "; ".join(parts), top[0][-1] > top[0][0] and low[0][-1] < low[0][0]


def pearson(results: dict) -> Cell:
  res = results.get("lambda_accuracy")
  if not res:
    return "not run", None
  r, p = res["pearson"], res.get("pearson_p", float("nan"))
  n = len(res.get("accuracy", []))
  return f"r = {r:.2f} (p={p:.2g}, {n} classes)", r > 0 and p < ALPHA


def flips(results: dict) -> Cell:
  res = results.get("decision")
  if not res:
    return "not run", None
  r = max(res["dsv"], key=float)
  p = res.get("p", {}).get(r, float("nan"))
  d, real = res["dsv"][r], res["real"][r]
  return (
    f"at {float(r):g}: {100 * d:.1f}% vs {100 * real:.1f}% (p={p:.2g})",
    d > real and p < ALPHA,
  )


def ablation(results: dict) -> Cell:
  """Stationarity makes synthesis recognisable: full vs primal only."""
  res = results.get("ablation")
  if not res or "classical_agreement" not in res.get("full", {}):
    return "not run", None
  f, o = res["full"], res["primal_only"]
  p = res["p_retrain"]
  better = f["classical_agreement"] > o["classical_agreement"]
  return (
    f"classical agreement {f['classical_agreement']:.2f} vs "
    f"{o['classical_agreement']:.2f}; retrained {_acc(f['retrain'])} vs "
    f"{_acc(o['retrain'])} (p={p:.2g}, n={len(f['retrain']['accuracies'])})",
    better and f["retrain"]["mean"] > o["retrain"]["mean"] and p < ALPHA,
  )


def editing(results: dict) -> Cell:
  res = results.get("strips", {}).get("edit")
  if not res:
    return "not run", None
  return f"target reached {100 * res['target_reached']:.0f}%", res[
    "target_reached"
  ] >= 0.9


def interpolation(results: dict) -> Cell:
  """The prediction moves from class a (delta 0) to class b (delta 1)."""
  res = results.get("strips", {}).get("interpolate")
  if not res:
    return "not run", None
  a, b = res["prob_a"], res["prob_b"]
  path = " -> ".join(f"{v:.2f}" for v in b)
  return f"p(b): {path}", a[0] > 0.5 > a[-1] and b[0] < 0.5 < b[-1]


# (claim, the paper's number on CIFAR-10, function).
CLAIMS: tuple[tuple[str, str, Callable[[dict], Cell]], ...] = (
  (
    "k-shot DSVs beat their k real shots",
    "+8.4 / +7.8 / +7.4 points at 1 / 10 / 50 per class",
    k_shot,
  ),
  (
    "0-shot DSVs (other data set) beat random real, 10 per class",
    "30.35 vs 26.0",
    zero_shot,
  ),
  ("0-shot DSVs from noise, 10 per class (our row)", "-", noise_shot),
  (
    "highest-lambda training images beat random (coreset)",
    "+2.6 / +3.6 / +2.8 at 1 / 10 / 50",
    coreset,
  ),
  (
    "candidates' entropy rises during synthesis",
    "about 0.2 -> 1.0",
    synthesis_entropy,
  ),
  (
    "entropy protocol: top-lambda gain, lowest-lambda lose",
    "qualitative (figure)",
    protocol_entropy,
  ),
  (
    "per-class sum of lambda correlates with class accuracy",
    "Pearson 0.78",
    pearson,
  ),
  ("adding a DSV flips predictions to its class", "qualitative", flips),
  (
    "stationarity makes synthesis recognisable (loss ablation)",
    "qualitative",
    ablation,
  ),
  ("editing reaches the target class", "qualitative", editing),
  (
    "soft-label interpolation moves between classes",
    "qualitative",
    interpolation,
  ),
)


def _verdict(v: bool | str | None) -> str:
  return {
    True: "holds",
    False: "**does not hold**",
    "partly": "partly",
    None: "-",
  }[v]


def load_run(workdir: str) -> tuple[str, dict]:
  """(dataset name, results) of a workdir's finished report."""
  path = os.path.join(workdir, "report", "results.json")
  if not epath.Path(path).exists():
    raise FileNotFoundError(
      f"No report results at {path}; run --stage=report (or all) first."
    )
  with epath.Path(path).open() as f:
    results = json.load(f)
  name = results.get("meta", {}).get("dataset") or os.path.basename(
    os.path.normpath(workdir)
  )
  return name, results


def markdown(runs: Sequence[tuple[str, dict]]) -> str:
  """The reproduction table of `runs` ((dataset name, results) pairs)."""
  names = [n for n, _ in runs]
  head = "| claim | paper (CIFAR-10) | " + " | ".join(names) + " | holds? |"
  lines = [head, "|---|---|" + "---|" * len(names) + "---|"]
  for claim, paper, fn in CLAIMS:
    cells, verdicts = [], []
    for name, results in runs:
      text, v = fn(results)
      cells.append(text)
      verdicts.append(f"{name}: {_verdict(v)}")
    lines.append(
      f"| {claim} | {paper} | "
      + " | ".join(cells)
      + f" | {'; '.join(verdicts)} |"
    )
  meta = []
  for name, results in runs:
    m = results.get("meta", {})
    meta.append(
      f"{name}: written {m.get('written', '?')} on {m.get('machine', '?')}, "
      f"config hash {m.get('config_hash', '?')}, seed {m.get('seed', '?')}"
    )
  return (
    "\n".join(lines)
    + "\n\nA claim holds where the direction is the paper's and, where a "
    f"p-value exists, p < {ALPHA} (two-sided Welch t-test over the retrained "
    "seeds; Fisher exact test for flips). " + "; ".join(meta) + ".\n"
  )


def replace_section(text: str, table: str) -> str:
  """`text` with the part between the reproduction markers set to `table`."""
  pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
  if not pattern.search(text):
    raise ValueError(
      f"No reproduction section (markers {BEGIN} ... {END}) to replace."
    )
  return pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text, count=1)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--workdir",
    action="append",
    required=True,
    help="a workdir with a finished report (repeat for each data set)",
  )
  parser.add_argument(
    "--readme", default="", help="rewrite this file's reproduction section"
  )
  args = parser.parse_args(argv)
  table = markdown([load_run(w) for w in args.workdir])
  if args.readme:
    with open(args.readme) as f:
      text = f.read()
    with open(args.readme, "w") as f:
      f.write(replace_section(text, table))
  sys.stdout.write(table)
  return 0


__all__ = [
  "CLAIMS",
  "load_run",
  "main",
  "markdown",
  "replace_section",
  "welch_p",
]

if __name__ == "__main__":
  sys.exit(main())
