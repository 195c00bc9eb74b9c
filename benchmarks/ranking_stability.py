"""How far a selection's rankings moved between two fits of the same lambda.

Compares the top k per class of two `select` results of one classifier and
training set, by the selection's own score (contribution) and by the
paper's (lambda over the rankable samples, as the report's coreset table
ranks), and prints the mean over classes of the fraction they share.

A source is a workdir (its finished `select/lambdas.npz`) or `WORKDIR@STEP`,
the FISTA iterate of step STEP in the workdir's `ckpt/select` (the run
keeps its last two steps; copy the workdir to keep an earlier one), ranked
with that workdir's weights ||p_i - y_i|| and rankable mask, which the
frozen classifier fixes.

  python benchmarks/ranking_stability.py W_at_10_iterations W
  python benchmarks/ranking_stability.py W@39 W --ks 1,10,50
"""

import argparse
import os

import numpy as np
import orbax.checkpoint as ocp

from dsv_jax import select


def load_lambdas(source: str) -> dict[str, np.ndarray]:
  """``lambdas``, ``weights``, ``rankable``, ``labels`` of a source."""
  workdir, _, step = source.partition("@")
  path = os.path.join(workdir, "select", "lambdas.npz")
  if not os.path.exists(path):
    raise SystemExit(f"No selection at {path}; run --stage=select.")
  with np.load(path) as z:
    out = {k: z[k] for k in ("lambdas", "weights", "rankable", "labels")}
  if step:
    state = os.path.join(workdir, "ckpt", "select", step, "state")
    if not os.path.isdir(state):
      raise SystemExit(f"No selection checkpoint at {state}.")
    # The solver's iterate is the contribution mu_i = lambda_i w_i.
    mu = np.asarray(ocp.StandardCheckpointer().restore(state)["contributions"])
    w = out["weights"]
    out["lambdas"] = np.where(w > 0, mu / np.where(w > 0, w, 1), 0)
  return out


def shared_top(a: np.ndarray, b: np.ndarray, labels, ks) -> dict[int, float]:
  """Per k: the mean over classes of |top_k(a) & top_k(b)| / k."""
  c = int(labels.max()) + 1
  out = {}
  for k in ks:
    top_a = select.top_per_class(a, labels, c, k).reshape(c, k)
    top_b = select.top_per_class(b, labels, c, k).reshape(c, k)
    shared = [
      np.intersect1d(x, y).size for x, y in zip(top_a, top_b, strict=True)
    ]
    out[k] = float(np.mean(shared)) / k
  return out


def compare(source_a: str, source_b: str, ks) -> dict[str, dict[int, float]]:
  """``{"contribution": {k: shared}, "lambda": {k: shared}}``."""
  a, b = load_lambdas(source_a), load_lambdas(source_b)
  if not np.array_equal(a["labels"], b["labels"]):
    raise SystemExit("The two sources rank different training sets.")
  out = {}
  for score in select.SCORES:
    s_a, s_b = (
      select.scores(
        s["lambdas"], s["weights"], score=score, rankable=s["rankable"]
      )
      for s in (a, b)
    )
    out[score] = shared_top(s_a, s_b, a["labels"], ks)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("a", help="WORKDIR or WORKDIR@STEP")
  parser.add_argument("b", help="WORKDIR or WORKDIR@STEP")
  parser.add_argument("--ks", default="1,10,50", help="top k per class")
  args = parser.parse_args()
  ks = [int(k) for k in args.ks.split(",")]
  result = compare(args.a, args.b, ks)
  print(f"top k per class shared by {args.a} and {args.b}")
  print("| ranking | " + " | ".join(f"k={k}" for k in ks) + " |")
  print("|---|" + "---|" * len(ks))
  for score, row in result.items():
    print(f"| {score} | " + " | ".join(f"{row[k]:.0%}" for k in ks) + " |")


if __name__ == "__main__":
  main()
