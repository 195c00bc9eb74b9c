"""The reproduction table: verdicts from known results, README rewrite."""

import json

import numpy as np
import pytest

from dsv_jax.experiment.report import reproduction


def _row(accs):
  accs = list(accs)
  return {"accuracies": accs, "mean": np.mean(accs), "std": np.std(accs)}


def _results(dsv_accs, shot_accs, zero_accs=None):
  few = {
    "k10/k random real images (the DSVs' init)": _row(shot_accs),
    "k10/DSV (real init)": _row(dsv_accs),
    "k10/DSV (noise init)": _row([0.1] * 5),
  }
  if zero_accs is not None:
    few["k10/DSV (fashion_mnist init)"] = _row(zero_accs)
  return {"few_shot": few, "meta": {"dataset": "toy"}}


SHOTS = [0.70, 0.71, 0.69, 0.70, 0.72]


def test_k_shot_verdict_needs_direction_and_significance():
  better = [a + 0.1 for a in SHOTS]
  text, holds = reproduction.k_shot(_results(better, SHOTS))
  assert holds is True
  assert "+10.0" in text and "n=5" in text
  # Worse by the same amount: significant, but the wrong direction.
  worse = [a - 0.1 for a in SHOTS]
  assert reproduction.k_shot(_results(worse, SHOTS))[1] is False
  # Better by a hair, within the seeds' spread: not decided.
  hair = [a + 0.001 for a in SHOTS[::-1]]
  assert reproduction.k_shot(_results(hair, SHOTS))[1] is False
  # Holds at one k and not at the other: partly.
  res = _results(better, SHOTS)
  for name, row in list(res["few_shot"].items()):
    res["few_shot"][name.replace("k10/", "k1/")] = row
  res["few_shot"]["k1/DSV (real init)"] = _row(worse)
  text, verdict = reproduction.k_shot(res)
  assert verdict == "partly"
  assert text.startswith("k=1: ") and "; k=10: " in text


def test_zero_shot_uses_the_other_data_set_row_not_noise():
  res = _results(SHOTS, SHOTS)
  assert reproduction.zero_shot(res)[1] is None  # No other-data row.
  res = _results(SHOTS, SHOTS, zero_accs=[a + 0.05 for a in SHOTS])
  text, holds = reproduction.zero_shot(res)
  assert holds is True and "+5.0" in text
  # The noise row (10%) is its own claim and does not hold.
  assert reproduction.noise_shot(res)[1] is False


def test_welch_p_known_values():
  assert reproduction.welch_p([1, 1, 1], [1, 1, 1]) == 1.0
  assert reproduction.welch_p([1, 1, 1], [0, 0, 0]) == 0.0
  # Against a direct computation of Welch's t and its degrees of freedom.
  a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0, 5.0])
  va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
  t = (a.mean() - b.mean()) / np.sqrt(va + vb)
  df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
  from scipy import stats

  assert reproduction.welch_p(a, b) == pytest.approx(
    2 * stats.t.sf(abs(t), df), rel=1e-9
  )


def test_other_claims_known_answers():
  res = {
    "lambda_accuracy": {
      "pearson": 0.8,
      "pearson_p": 0.01,
      "accuracy": [0] * 10,
    },
    "decision": {
      "dsv": {"0.5": 0.3},
      "real": {"0.5": 0.1},
      "p": {"0.5": 0.001},
    },
    "boundary": {
      "entropy_curves": {"real init, k=10": [0.2, 1.0]},
      "entropy_protocol": {
        "top-5 lambda": [0.1, 0.3],
        "lowest-50 lambda": [0.5, 0.2],
        "all candidates": [0.3, 0.3],
      },
    },
    "strips": {
      "edit": {"target_reached": 0.5},
      "interpolate": {"prob_a": [1, 0.5, 0], "prob_b": [0, 0.5, 1]},
    },
  }
  assert reproduction.pearson(res)[1] is True
  assert reproduction.flips(res)[1] is True
  assert reproduction.synthesis_entropy(res)[1] is True
  curves = res["boundary"]["entropy_curves"]
  curves["noise init, k=10"] = [1.5, 0.8]
  assert reproduction.synthesis_entropy(res)[1] == "partly"
  curves["real init, k=10"] = [1.0, 0.2]
  assert reproduction.synthesis_entropy(res)[1] is False
  assert reproduction.protocol_entropy(res)[1] is True
  assert reproduction.editing(res)[1] is False  # 50% < 90%.
  assert reproduction.interpolation(res)[1] is True
  res["lambda_accuracy"]["pearson"] = -0.4
  assert reproduction.pearson(res)[1] is False
  res["strips"]["interpolate"]["prob_b"] = [0, 0.9, 0.4]  # Ends on a.
  assert reproduction.interpolation(res)[1] is False
  # Nothing measured: no verdict, and the cell says so.
  assert reproduction.coreset({}) == ("not run", None)


def test_cli_rewrites_the_readme_section(tmp_path):
  for name, accs in (("a", [a + 0.1 for a in SHOTS]), ("b", SHOTS)):
    report_dir = tmp_path / name / "report"
    report_dir.mkdir(parents=True)
    res = _results(accs, SHOTS)
    res["meta"]["dataset"] = name
    (report_dir / "results.json").write_text(json.dumps(res))
  readme = tmp_path / "README.md"
  readme.write_text(
    f"intro\n{reproduction.BEGIN}\nold table\n{reproduction.END}\noutro\n"
  )
  args = ["--workdir", str(tmp_path / "a"), "--workdir", str(tmp_path / "b")]
  assert reproduction.main([*args, "--readme", str(readme)]) == 0
  text = readme.read_text()
  assert "old table" not in text
  assert text.startswith("intro\n") and text.endswith("outro\n")
  assert "| claim | paper (CIFAR-10) | a | b | holds? |" in text
  assert "a: holds; b: **does not hold**" in text
  with pytest.raises(ValueError, match="No reproduction section"):
    reproduction.replace_section("no markers", "table")
  with pytest.raises(FileNotFoundError, match="run --stage=report"):
    reproduction.load_run(str(tmp_path / "missing"))
