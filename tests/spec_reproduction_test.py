"""Specification test of the reproduction table: a `results.json` written
by hand, with a distinct number in every cell, and every claim checked to
read the row, the split (k) and the p-value its description names. A claim
that read a neighbouring row or split would print other numbers, or reach
another verdict.
"""

import json
import re

import numpy as np
import pytest

from dsv_jax.experiment.report import reproduction

SHOTS = "k random real images (the DSVs' init)"


def _row(mean, seed):
  # Five seeds around `mean`, with a spread particular to the row.
  rng = np.random.default_rng(seed)
  accs = (mean + 0.004 * (1 + seed % 3) * rng.standard_normal(5)).tolist()
  return {
    "accuracies": accs,
    "mean": float(np.mean(accs)),
    "std": float(np.std(accs)),
  }


def _acc(row):
  return f"{100 * row['mean']:.1f} +- {100 * row['std']:.1f}"


def _p(a, b):
  return f"p={reproduction.welch_p(a['accuracies'], b['accuracies']):.2g}"


def hand_results():
  few = {}
  # Per k: the shots, and DSV rows better or worse than them by amounts
  # that differ between rows and splits.
  for i, (k, shots) in enumerate(((1, 0.30), (10, 0.60))):
    s = 10 * i
    few[f"k{k}/{SHOTS}"] = _row(shots, s + 1)
    few[f"k{k}/DSV (real init)"] = _row(shots + 0.05 + 0.02 * i, s + 2)
    few[f"k{k}/DSV (noise init)"] = _row(shots - 0.07 - 0.01 * i, s + 3)
    few[f"k{k}/DSV (fashion_mnist init)"] = _row(shots + 0.09 - 0.13 * i, s + 4)
    few[f"k{k}/KKT reconstruction (Buzaglo et al. style)"] = _row(
      shots - 0.2, s + 5
    )
  coreset = {
    "k1": {
      "random": _row(0.40, 21),
      "herding": _row(0.47, 22),
      "el2n": _row(0.36, 23),
      "selected": _row(0.38, 24),  # worse than random
      "selected_lambda": _row(0.45, 25),  # better: the paper's ranking
      "p_selected_vs_random": 0.111,
      "p_selected_lambda_vs_random": 0.0222,
    }
  }
  return {
    "few_shot": few,
    "coreset": coreset,
    "boundary": {
      "entropy_curves": {
        "real init, k=1": [0.213, 0.934],
        "noise init, k=1": [0.377, 0.551],
      },
      "entropy_protocol": {
        "top-5 lambda": [0.412, 0.689],
        "lowest-50 lambda": [0.523, 0.301],
        "all candidates": [0.634, 0.645],
      },
    },
    "lambda_accuracy": {
      "pearson": 0.614,
      "pearson_p": 0.0133,
      "accuracy": [0.9] * 7,
      "lambda_sums": [1.0] * 7,
    },
    "decision": {
      # Largest ratio by value: 10 (by string order it would be "2").
      "dsv": {"0.5": 0.111, "2": 0.222, "10": 0.456},
      "real": {"0.5": 0.055, "2": 0.333, "10": 0.234},
      "p": {"0.5": 0.0777, "2": 0.0666, "10": 0.00456},
      "pairs": {"0.5": 90, "2": 90, "10": 90},
    },
    "ablation": {
      "full": {"classical_agreement": 0.812, "retrain": _row(0.55, 31)},
      "primal_only": {"classical_agreement": 0.423, "retrain": _row(0.41, 32)},
      "p_retrain": 0.0123,
    },
    "strips": {
      "edit": {"target_reached": 0.93},
      "interpolate": {
        "prob_a": [0.91, 0.6, 0.12],
        "prob_b": [0.05, 0.38, 0.87],
      },
    },
    "meta": {
      "dataset": "toy",
      "written": "2026-01-02",
      "machine": "m1",
      "config_hash": "abc123",
      "seed": 7,
    },
  }


@pytest.fixture
def run(tmp_path):
  (tmp_path / "report").mkdir()
  (tmp_path / "report" / "results.json").write_text(json.dumps(hand_results()))
  return reproduction.load_run(str(tmp_path))


def _cells(run):
  name, results = run
  assert name == "toy"
  return {fn.__name__: fn(results) for _, _, fn in reproduction.CLAIMS}, results


def test_k_shot_reads_each_split_s_real_init_row_against_its_shots(run):
  cells, r = _cells(run)
  few = r["few_shot"]
  text, verdict = cells["k_shot"]
  parts = re.split(r"; (?=k=)", text)
  assert [p.split(":")[0] for p in parts] == ["k=1", "k=10"]
  for part, k in zip(parts, (1, 10), strict=True):
    dsv, shots = few[f"k{k}/DSV (real init)"], few[f"k{k}/{SHOTS}"]
    assert f"{_acc(dsv)} vs {_acc(shots)}" in part
    assert f"{100 * (dsv['mean'] - shots['mean']):+.1f}" in part
    assert _p(dsv, shots) in part and "n=5" in part
  assert verdict is True


def test_zero_and_noise_shot_read_the_10_per_class_split(run):
  cells, r = _cells(run)
  few = r["few_shot"]
  shots = few[f"k10/{SHOTS}"]
  text, verdict = cells["zero_shot"]
  zero = few["k10/DSV (fashion_mnist init)"]
  assert text.startswith("k=10: ") and "k=1:" not in text
  assert f"{_acc(zero)} vs {_acc(shots)}" in text and _p(zero, shots) in text
  # At k=10 the other-data row is worse (at k=1 it would be better).
  assert verdict is False
  text, verdict = cells["noise_shot"]
  noise = few["k10/DSV (noise init)"]
  assert f"{_acc(noise)} vs {_acc(shots)}" in text and _p(noise, shots) in text
  assert verdict is False


def test_coreset_claim_reads_the_top_lambda_row_against_random(run):
  cells, r = _cells(run)
  res = r["coreset"]["k1"]
  text, verdict = cells["coreset"]
  lam, rnd = res["selected_lambda"], res["random"]
  assert text.startswith("k=1: ")
  assert f"{_acc(lam)} vs {_acc(rnd)}" in text and _p(lam, rnd) in text
  for other in ("selected", "herding", "el2n"):
    assert _acc(res[other]) not in text
  assert verdict is True


def test_entropy_claims_read_their_curves_and_groups(run):
  cells, r = _cells(run)
  text, verdict = cells["synthesis_entropy"]
  assert (
    text == "real init, k=1: 0.213 -> 0.934; noise init, k=1: 0.377 -> 0.551"
  )
  assert verdict is True
  text, verdict = cells["protocol_entropy"]
  assert "top-5 lambda: 0.412 -> 0.689" in text
  assert "lowest-50 lambda: 0.523 -> 0.301" in text
  assert "all candidates" not in text
  assert verdict is True
  # Top falling, or lowest rising, and the claim does not hold.
  proto = r["boundary"]["entropy_protocol"]
  proto["top-5 lambda"] = [0.689, 0.412]
  assert reproduction.protocol_entropy(r)[1] is False
  proto["top-5 lambda"] = [0.412, 0.689]
  proto["lowest-50 lambda"] = [0.301, 0.523]
  assert reproduction.protocol_entropy(r)[1] is False


def test_pearson_flips_ablation_editing_interpolation_read_their_cells(run):
  cells, r = _cells(run)
  assert cells["pearson"] == ("r = 0.61 (p=0.013, 7 classes)", True)
  # flips: the largest ratio by value, its own p-value.
  assert cells["flips"] == ("at 10: 45.6% vs 23.4% (p=0.0046)", True)
  text, verdict = cells["ablation"]
  full, only = r["ablation"]["full"], r["ablation"]["primal_only"]
  assert text.startswith("classical agreement 0.81 vs 0.42; ")
  assert f"retrained {_acc(full['retrain'])} vs {_acc(only['retrain'])}" in text
  assert "(p=0.012, n=5)" in text and verdict is True
  assert cells["editing"] == ("target reached 93%", True)
  assert cells["interpolation"] == ("p(b): 0.05 -> 0.38 -> 0.87", True)
  # A p-value at or above ALPHA decides against, whatever the direction.
  r["lambda_accuracy"]["pearson_p"] = 0.06
  assert reproduction.pearson(r)[1] is False
  r["decision"]["p"]["10"] = 0.2
  assert reproduction.flips(r)[1] is False
  r["ablation"]["p_retrain"] = 0.051
  assert reproduction.ablation(r)[1] is False


def test_markdown_puts_every_cell_in_its_claim_s_row(run):
  cells, _ = _cells(run)
  table = reproduction.markdown([run])
  lines = table.splitlines()
  for claim, paper, fn in reproduction.CLAIMS:
    text, verdict = cells[fn.__name__]
    verdict_word = {
      True: "holds",
      False: "**does not hold**",
      "partly": "partly",
      None: "-",
    }[verdict]
    want = f"| {claim} | {paper} | {text} | toy: {verdict_word} |"
    assert want in lines, want
  assert "config hash abc123, seed 7" in table and "on m1" in table
