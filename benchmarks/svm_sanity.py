r"""SVM sanity: does selection find the support vectors of a linear model?

On linearly separable 2-class data, a linear softmax classifier (2 logits,
with bias) trained to near-zero loss approaches the max-margin direction,
and a hard-margin linear SVM (scikit-learn ``SVC(kernel="linear",
C=1e6)``) gives the true support vectors. For every data set and seed this
script fits lambda with `select.fit_lambdas` (and, for the L1-sparse
candidate, a dense reference solver), ranks the samples by each candidate
score, and prints precision/recall at k = the number of SVM support vectors
(equal when k is the size of the true set) and the cosine between the
classifier's weight difference and the SVM's w.

  python benchmarks/svm_sanity.py            # the README table
  python benchmarks/svm_sanity.py --quick    # 1 seed, 2 data sets
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.svm import SVC

from dsv_jax import kkt, parallel, select


def make_data(name: str, seed: int, n: int = 160):
  """Linearly separable 2-class data: (x float32[n, d], y int32[n])."""
  rng = np.random.default_rng(seed)
  if name.startswith("aniso"):
    # Anisotropic Gaussian classes (covariance with a spread of scales)
    # along a random direction, unequal class sizes; kept separable as
    # blobs.
    d = int(name[len("aniso") :])
    scales = np.exp(rng.uniform(-1.0, 1.0, size=d))
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    center = rng.normal(size=d)
    center *= 3.0 / np.linalg.norm(center)
    y = (rng.uniform(size=n) < 0.35).astype(np.int64)
    x = (rng.normal(size=(n, d)) * scales) @ rot.T
    x += np.where(y[:, None] == 1, center, -0.5 * center)
    svm = SVC(kernel="linear", C=1e6).fit(x, y)
    keep = svm.predict(x) == y
    x, y = x[keep], y[keep]
  elif name.startswith("blobs"):
    d = int(name[len("blobs") :])
    center = rng.normal(size=d)
    center *= 2.5 / np.linalg.norm(center)
    x = rng.normal(size=(n, d))
    y = np.arange(n) % 2
    x += np.where(y[:, None] == 1, center, -center)
    # Keep it separable: drop the points a hard-margin SVM cannot fit and
    # redraw until n remain.
    svm = SVC(kernel="linear", C=1e6).fit(x, y)
    keep = svm.predict(x) == y
    x, y = x[keep], y[keep]
  else:  # "plane<d>": uniform points around a random hyperplane with a gap.
    d = int(name[len("plane") :])
    w = rng.normal(size=d)
    w /= np.linalg.norm(w)
    b = rng.uniform(-0.3, 0.3)
    x = np.zeros((0, d))
    while len(x) < n:
      cand = rng.uniform(-1.5, 1.5, size=(4 * n, d))
      cand = cand[np.abs(cand @ w + b) > 0.15]
      x = np.concatenate([x, cand])[:n]
    y = (x @ w + b > 0).astype(np.int64)
  return x.astype(np.float32), y.astype(np.int32)


def linear_apply(p, x):
  return x @ p["w"] + p["b"]


def train_linear(x, y, *, steps: int, target_loss: float):
  """Normalised GD (step 0.5/loss) from zero until the loss is tiny.

  Its direction tends to the max-margin one (Soudry et al., 2018; the
  normalised step makes that fast). It stops at `target_loss`: at float32,
  ``1 - p_y`` of the support vectors must stay well above the machine
  epsilon, or their gradients round to zero.
  """
  d = x.shape[1]
  p = {"w": jnp.zeros((d, 2)), "b": jnp.zeros(2)}
  xj, yj = jnp.asarray(x), jnp.asarray(y)

  def loss(p):
    return jnp.mean(kkt.cross_entropy(linear_apply(p, xj), yj))

  @jax.jit
  def run(p):
    def cond(carry):
      i, _, val = carry
      return (i < steps) & (val > target_loss)

    def body(carry):
      i, p, _ = carry
      val, g = jax.value_and_grad(loss)(p)
      p = jax.tree.map(lambda a, b: a - 0.5 * b / val, p, g)
      return i + 1, p, loss(p)

    return jax.lax.while_loop(cond, body, (0, p, loss(p)))[1]

  p = run(p)
  return p, float(loss(p))


def dense_l1_nnls(gmat, theta, weights, mu, iters=20000):
  """The L1-sparse candidate with an explicit G, in contribution variables.

  min ||theta + G diag(1/w) m||^2 / ||theta||^2 + mu * sum(m) / W_ref over
  m >= 0 (FISTA; W_ref as in `select.fit_lambdas`): the fewest total
  contribution, the opposite of the slackness term. Returns lambda.
  """
  inv_w = np.where(weights > 1e-30, 1 / np.maximum(weights, 1e-30), 0)
  gs = gmat * inv_w
  scale = theta @ theta
  w_ref = scale * weights.sum() / -(gmat.T @ theta).sum()
  lip = 2 * np.linalg.norm(gs, 2) ** 2 / scale
  m = np.zeros(gs.shape[1])
  prev, t = m, 1.0
  for _ in range(iters):
    t_next = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
    y = m + (t - 1) / t_next * (m - prev)
    grad = 2 * gs.T @ (theta + gs @ y) / scale + mu / w_ref
    prev, m, t = m, np.maximum(y - grad / lip, 0), t_next
  return m * inv_w


def evaluate(
  name,
  seed,
  *,
  steps,
  target_loss,
  slackness_values,
  max_iters,
  mesh,
  n=160,
  defaults_only=False,
):
  x, y = make_data(name, seed, n)
  svm = SVC(kernel="linear", C=1e6).fit(x, y)
  truth = svm.support_
  k = len(truth)
  params, train_loss = train_linear(x, y, steps=steps, target_loss=target_loss)
  wdiff = np.asarray(params["w"][:, 1] - params["w"][:, 0])
  cos = float(wdiff @ svm.coef_[0]) / (
    np.linalg.norm(wdiff) * np.linalg.norm(svm.coef_[0])
  )
  # Per-sample gradients of the linear model in closed form, g_i = (x_i r_i^T,
  # r_i) with r_i = softmax - onehot formed without cancellation (autodiff
  # of the cross-entropy rounds 1 - p_iy to 0 for confident samples).
  r = np.asarray(select.prob_residual(linear_apply(params, x), y))
  gmat = np.concatenate(
    [r, (x[:, :, None] * r[:, None, :]).reshape(len(x), -1)], 1
  ).T  # Leaf order of jax.tree.leaves(params): b, w.
  theta = np.concatenate([np.ravel(a) for a in jax.tree.leaves(params)])
  gnorm = np.linalg.norm(gmat, axis=0)

  rows = {}
  common = {"mesh": mesh, "chunk_size": len(x), "max_iters": max_iters}

  weights = None

  def record(label, lam, residual=None):
    contrib = lam * weights
    if residual is None:
      residual = float(
        np.linalg.norm(theta + gmat @ lam) / np.linalg.norm(theta)
      )
    out = {
      name: select.precision_recall_at_k(score, truth, k)[1]
      for name, score in (
        ("lambda", lam),
        ("lambda*|g|", lam * gnorm),
        ("contribution", contrib),
      )
    }
    # Non-zero contributions (lambda itself spans dozens of decades).
    nonzero = int(np.count_nonzero(contrib > 1e-6 * contrib.max()))
    rows[label] = (out, residual, nonzero)

  # The library's defaults, nothing else: what a user gets from
  # `select.select_dsvs` (ranked by FitInfo.scores).
  lam, info = select.fit_lambdas(
    linear_apply, params, x, y, mesh=mesh, chunk_size=len(x)
  )
  weights = info.weights
  record("library defaults", lam, info.residual)
  rows["library defaults"][0]["defaults: FitInfo.scores"] = (
    select.precision_recall_at_k(info.scores, truth, k)[1]
  )
  out = {
    "name": name,
    "seed": seed,
    "k": k,
    "cos": cos,
    "train_loss": train_loss,
    "rows": rows,
  }
  if defaults_only:
    return out
  for init, dist in (
    ("zero", "l2_sq"),
    ("uniform", "l2_sq"),
    ("uniform", "l1_mean"),
  ):
    lam, info = select.fit_lambdas(
      linear_apply, params, x, y, distance=dist, init=init, **common
    )
    weights = info.weights
    record(f"plain {dist} init={init}", lam, info.residual)
  lam = dense_l1_nnls(gmat.astype(np.float64), theta, weights, 0.01)
  record("L1-sparse 0.01 (dense)", lam)
  for mu in slackness_values:
    for dist in ("l2_sq", "l1_mean"):
      lam, info = select.fit_lambdas(
        linear_apply, params, x, y, distance=dist, slackness=mu, **common
      )
      record(f"slackness {mu:g} {dist}", lam, info.residual)
  return out


SWEEP_MARKS = (50, 100, 200, 500, 1000)


def sweep(name, seed, *, n, slackness_values, mesh):
  """Recall of the contribution after 50..1000 iterations, per weight.

  Defaults otherwise (l2_sq, init uniform), with tol 0 so every budget is
  spent; the contributions are read off the solver state by a callback.
  """
  x, y = make_data(name, seed, n)
  truth = SVC(kernel="linear", C=1e6).fit(x, y).support_
  params, _ = train_linear(x, y, steps=20000, target_loss=1e-5)
  out = {}
  for mu in slackness_values:
    got = {}

    def on_state(state, got=got):
      step = int(state.step)
      if step in SWEEP_MARKS:
        scores = np.asarray(state.contributions)
        got[step] = select.precision_recall_at_k(scores, truth)[1]

    _, info = select.fit_lambdas(
      linear_apply,
      params,
      x,
      y,
      slackness=mu,
      max_iters=max(SWEEP_MARKS),
      tol=0.0,
      mesh=mesh,
      chunk_size=len(x),
      on_state=on_state,
    )
    final = select.precision_recall_at_k(info.scores, truth)[1]
    out[mu] = ({m: got.get(m, final) for m in SWEEP_MARKS}, info.residual)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--data", nargs="+", default=["blobs2", "plane2", "plane5", "blobs10"]
  )
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=20000)
  parser.add_argument("--target_loss", type=float, default=1e-5)
  parser.add_argument("--max_iters", type=int, default=500)
  parser.add_argument("--slackness", type=float, nargs="+", default=[0.01, 0.1])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--n",
    type=int,
    default=160,
    help="points per data set (before the blobs' separability filter)",
  )
  parser.add_argument(
    "--defaults_only",
    action="store_true",
    help="only the library's defaults (what select.select_dsvs does)",
  )
  parser.add_argument(
    "--suite",
    choices=("original", "new"),
    default="original",
    help="'new': other generators, shapes and seeds than the README table "
    "(aniso3, aniso8, plane3, plane20, blobs30 x seeds 100-102, n=240)",
  )
  parser.add_argument(
    "--sweep",
    action="store_true",
    help="recall after 50-1000 iterations for slackness 0.1, 0.3, 1.0",
  )
  args = parser.parse_args(argv)
  if args.suite == "new":
    args.data = ["aniso3", "aniso8", "plane3", "plane20", "blobs30"]
    args.seeds, args.n = [100, 101, 102], 240
  if args.quick:
    args.data, args.seeds = args.data[:2], args.seeds[:1]
  mesh = parallel.make_mesh(1)
  t0 = time.perf_counter()
  if args.sweep:
    weights = (0.1, 0.3, 1.0)
    rows = [
      sweep(name, seed, n=args.n, slackness_values=weights, mesh=mesh)
      for name in args.data
      for seed in args.seeds
    ]
    print("| slackness | " + " | ".join(f"{m} it" for m in SWEEP_MARKS), end="")
    print(" | residual at the end |")
    print("|---" * (len(SWEEP_MARKS) + 2) + "|")
    for mu in weights:
      cells = []
      for m in SWEEP_MARKS:
        vals = [r[mu][0][m] for r in rows]
        cells.append(f"{np.mean(vals):.2f} ({np.min(vals):.2f})")
      res = np.mean([r[mu][1] for r in rows])
      print(f"| {mu:g} | " + " | ".join(cells) + f" | {res:.3f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return
  results = []
  for name in args.data:
    for seed in args.seeds:
      r = evaluate(
        name,
        seed,
        steps=args.steps,
        target_loss=args.target_loss,
        max_iters=args.max_iters,
        slackness_values=args.slackness,
        mesh=mesh,
        n=args.n,
        defaults_only=args.defaults_only,
      )
      results.append(r)
      print(
        f"# {name} seed {seed}: k={r['k']} SVs, cos(w, w_svm)="
        f"{r['cos']:.5f}, train loss {r['train_loss']:.2e}",
        flush=True,
      )
  labels = list(results[0]["rows"])
  score_names = ["lambda", "lambda*|g|", "contribution"]
  if args.defaults_only:
    score_names.append("defaults: FitInfo.scores")
  print("\nMean recall@k (= precision@k) over data sets and seeds;")
  print("min in brackets; mean relative residual; mean nonzero lambdas.\n")
  print("| variant | " + " | ".join(score_names) + " | residual | nonzero |")
  print("|---" * (len(score_names) + 3) + "|")
  for label in labels:
    cells = []
    for s in score_names:
      vals = [r["rows"][label][0].get(s) for r in results]
      if vals[0] is None:
        cells.append("-")
      else:
        cells.append(f"{np.mean(vals):.2f} ({np.min(vals):.2f})")
    res = np.mean([r["rows"][label][1] for r in results])
    nnz = np.mean([r["rows"][label][2] for r in results])
    print(f"| {label} | " + " | ".join(cells) + f" | {res:.1e} | {nnz:.0f} |")
  print("\nPer data set, recall of the contribution score:")
  for r in results:
    best = {lab: r["rows"][lab][0].get("contribution") for lab in labels}
    print(
      f"  {r['name']} seed {r['seed']} k={r['k']} cos={r['cos']:.4f}: "
      + ", ".join(f"{lab}={v:.2f}" for lab, v in best.items() if v is not None)
    )
  print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
