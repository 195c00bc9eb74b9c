r"""Reconstructing training images from a trained network (Haim et al. 2022).

Haim et al.'s headline: a bias-free ReLU MLP trained to a vanishing loss on
a small two-class set lets many of its training images be recovered from
its weights alone, by fitting candidates x_i and multipliers lambda_i to
the stationarity condition of the max-margin problem. This script reruns
that on a setting 2 CPU cores can afford and scores it honestly:

1. Train the homogeneous MLP of `configs/reconstruct.py` full-batch to a
   vanishing loss on ``num_train`` images of two classes.
2. From noise (the training mean plus N(0, s^2)), fit 2x as many candidates
   (half per class) with DeepKKT synthesis (`dsv_jax.synthesize`, defaults)
   and with the Haim/Buzaglo baseline (`dsv_jax.baseline`, defaults).
3. For every training image, its best-matching candidate by SSIM
   (`dsv_jax.similarity`): the fraction with SSIM >= 0.4 and the mean; the
   same for as many HELD-OUT images of the same classes. A method that
   reconstructs the training set matches training images better than
   held-out ones; a class prototype matches both alike.
4. Controls: the initial noise itself (no optimisation), and each method
   started at the training images (does it keep them?).
5. `baseline.best_multipliers` at the training images: the stationarity
   residual the true training set reaches, beside each method's, and the
   residual the baseline's own lambda fit reaches there (x fixed) with its
   default settings and with the same numbers in the former raw units.

Writes ``results.json`` and ``matches.png`` (up to 12 training images per
class, each above its best match in every row) to ``--workdir`` and prints
one table row per method.

  python benchmarks/reconstruct.py --config configs/reconstruct.py:digits \
      --workdir /tmp/rec
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from dsv_jax import baseline, similarity, synthesize, viz


def _define_flags():
  """The script's flags, defined only when it runs as a script: tests
  import its functions into processes whose absl flags (dsv_jax.main's
  --config) are already defined."""
  config = config_flags.DEFINE_config_file(
    "config", None, "configs/reconstruct.py:<preset>", lock_config=True
  )
  return config, flags.DEFINE_string("workdir", None, "Output folder.")


def load_two_class(name: str, classes, num_train: int, num_heldout: int, seed):
  """Class-balanced ``(train, heldout)``, each ``(x f32[N,H,W,1] in [0,1],
  y int32[N] in {0, 1})``, disjoint, drawn from the data set's train split."""
  if num_train < 2 or num_train % 2 or num_heldout < 2 or num_heldout % 2:
    raise ValueError(
      f"num_train and num_heldout must be even and >= 2, got {num_train}, "
      f"{num_heldout}."
    )
  if name == "digits":
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = d.images / 16.0, d.target
  elif name == "fashion_mnist":
    from dsv_jax.data import idx, loading

    folder = loading.DEFAULT_IDX_DIRS["fashion_mnist"][0]
    images, labels = idx.load_idx_folder(folder)["train"]
    images = images.reshape(-1, 28, 28) / 255.0
  else:
    raise ValueError(
      f"Unknown data set {name!r}; expected digits or fashion_mnist."
    )
  if len(set(classes)) != 2:
    raise ValueError(f"classes must be two distinct classes, got {classes}.")
  rng = np.random.default_rng(seed)
  per = (num_train + num_heldout) // 2
  tr, ho = [], []
  for c in classes:
    pool = np.flatnonzero(labels == c)
    if len(pool) < per:
      raise ValueError(f"class {c} has {len(pool)} images; {per} are needed.")
    pick = rng.choice(pool, per, replace=False)
    tr.append(pick[: num_train // 2])
    ho.append(pick[num_train // 2 :])

  def split(parts):
    i = np.concatenate(parts)
    y = np.concatenate(
      [np.full(len(p), k, np.int32) for k, p in enumerate(parts)]
    )
    return images[i][..., None].astype(np.float32), y

  return split(tr), split(ho)


def init_mlp(key, in_features: int, width: int, depth: int, scale: float):
  """Bias-free MLP weights: LeCun normal times `scale`, 2 logits."""
  sizes = (in_features, *([width] * depth), 2)
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    scale * jax.random.normal(k, (a, b)) / np.sqrt(a)
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def make_apply_fn(mean: np.ndarray):
  """Homogeneous ReLU MLP on mean-subtracted pixels (Haim et al. centre
  the data): ``(params, x [N,H,W,1]) -> logits [N, 2]``."""
  mean = jnp.asarray(mean, jnp.float32)

  def apply_fn(params, x):
    h = (x - mean).reshape(x.shape[0], -1)
    for w in params[:-1]:
      h = jax.nn.relu(h @ w)
    return h @ params[-1]

  return apply_fn


def train(apply_fn, params, x, y, *, lr: float, max_steps: int, target: float):
  """Full-batch gradient descent (momentum 0.9) on mean cross-entropy until
  it is below `target`. Gradient descent, not Adam: its implicit bias is the
  L2 max-margin KKT point the reconstruction assumes (Lyu & Li 2020; Adam's
  is not)."""
  tx = optax.sgd(lr, momentum=0.9)

  def loss_fn(p):
    logits = apply_fn(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def chunk(p, s):
    def body(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (p, s), losses = jax.lax.scan(body, (p, s), length=100)
    return p, s, losses[-1]

  state, steps, loss = tx.init(params), 0, np.inf
  while steps < max_steps and loss > target:
    params, state, loss = chunk(params, state)
    steps, loss = steps + 100, float(loss)
  acc = float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))
  return params, {"train_steps": steps, "train_loss": loss, "train_acc": acc}


def run_candidates(synth, params, x0, labels, steps: int, key):
  """`steps` jitted steps of a Synthesizer from ``x0``: ``(x, metrics)``."""
  state = synth.init_fn(key, params, jnp.asarray(x0), jnp.asarray(labels))
  step = jax.jit(synth.step_fn)
  metrics = {}
  for t in range(steps):
    state, metrics = step(
      state, params, jnp.asarray(labels), jax.random.fold_in(key, t)
    )
  return np.asarray(state.x), {k: float(v) for k, v in metrics.items()}


def raw_unit_settings(m: int) -> dict:
  """`make_reconstructor` keywords that reproduce the baseline's former raw
  units (weighted sum not divided by the m candidates) with the same
  numbers: lambda_min 0.05, lambda_init U[0.5, 1], Adam 0.05 on raw lambda."""
  return {
    "lambda_min": 0.05 * m,
    "lambda_init": (0.5 * m, 1.0 * m),
    "lambda_tx": optax.adam(0.05 * m),
    "beta_lambda": 1.0 / m,
  }


def lambda_fit_residual(apply_fn, params, x, y, steps: int, **kw) -> float:
  """The baseline's lambda fit with x fixed at `x` (`make_reconstructor`
  with `kw`); its final stationarity residual."""
  recon = baseline.make_reconstructor(apply_fn, x_tx=optax.set_to_zero(), **kw)
  x, y = jnp.asarray(x), jnp.asarray(y)
  state = recon.init_fn(jax.random.key(1), params, x, y)
  step = jax.jit(recon.step_fn)
  for _ in range(steps):
    state, metrics = step(state, params, y, jax.random.key(2))
  if not np.array_equal(state.x, x):
    raise AssertionError("the lambda fit moved x.")
  return float(metrics["stationarity"])


def match_scores(candidates, images, threshold: float):
  """Each image's best candidate: ``(index, ssim, summary)``."""
  index, ssim = similarity.best_match(images, candidates)
  return (
    index,
    ssim,
    {
      "pass": float(np.mean(ssim >= threshold)),
      "mean": float(np.mean(ssim)),
    },
  )


def methods(apply_fn, lr_x: float):
  """The two reconstruction methods, both on pixels clipped to [0, 1]."""
  common = {"x_tx": optax.adam(lr_x), "pixel_min": 0.0, "pixel_max": 1.0}
  return {
    "deepkkt": synthesize.make_synthesizer(apply_fn, **common),
    "baseline": baseline.make_reconstructor(apply_fn, **common),
  }


def run(config, workdir: str) -> dict:
  """Runs the experiment of the module docstring; returns its results."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  d = config.data
  (xtr, ytr), (xho, yho) = load_two_class(
    d.name, tuple(d.classes), d.num_train, d.num_heldout, config.seed
  )
  key = jax.random.key(config.seed)
  k_model, k_noise, k_run = jax.random.split(key, 3)
  apply_fn = make_apply_fn(xtr.mean(0))
  m = config.model
  params = init_mlp(k_model, xtr[0].size, m.width, m.depth, m.init_scale)
  params, train_info = train(
    apply_fn,
    params,
    jnp.asarray(xtr),
    jnp.asarray(ytr),
    lr=config.train.lr,
    max_steps=config.train.max_steps,
    target=config.train.target_loss,
  )
  logging.info("trained: %s (%.0f s)", train_info, time.perf_counter() - t0)
  lam, true_resid = baseline.best_multipliers(apply_fn, params, xtr, ytr)
  units = {
    "best (NNLS)": true_resid,
    "defaults": lambda_fit_residual(apply_fn, params, xtr, ytr, 300),
    "raw units": lambda_fit_residual(
      apply_fn, params, xtr, ytr, 300, **raw_unit_settings(len(xtr))
    ),
  }
  r = config.recon
  n_cand = r.candidates_per_image * len(xtr)
  labels = np.arange(n_cand, dtype=np.int32) % 2
  x0 = np.clip(
    xtr.mean(0)
    + r.noise_scale
    * np.asarray(jax.random.normal(k_noise, (n_cand, *xtr.shape[1:]))),
    0.0,
    1.0,
  ).astype(np.float32)

  rows = {}
  shown = {"training images": xtr}
  captions = {"training images": [f"y={y}" for y in ytr]}

  def score(name, cands):
    idx, s, tr = match_scores(cands, xtr, r.ssim_pass)
    _, _, ho = match_scores(cands, xho, r.ssim_pass)
    shown[name] = cands[idx]
    captions[name] = [f"{v:.2f}" for v in s]
    return {"train": tr, "heldout": ho, "gap_mean": tr["mean"] - ho["mean"]}

  rows["noise (initial candidates)"] = score("noise (initial candidates)", x0)
  for name, synth in methods(apply_fn, r.lr_x).items():
    t = time.perf_counter()
    x, metrics = run_candidates(synth, params, x0, labels, r.steps, k_run)
    logging.info("%s: %.0f s", name, time.perf_counter() - t)
    rows[name] = score(name, x) | {
      "seconds": time.perf_counter() - t,
      "stationarity": metrics.get("stationarity"),
      "accuracy": metrics.get("accuracy"),
    }
  for name, synth in methods(apply_fn, r.lr_x).items():
    x, metrics = run_candidates(synth, params, xtr, ytr, r.steps, k_run)
    label = f"{name} from training images"
    rows[label] = score(label, x) | {
      "stationarity": metrics.get("stationarity")
    }

  names = list(shown)
  # At most 12 training images per class in the grid (readable widths).
  cols = np.concatenate([np.flatnonzero(ytr == c)[:12] for c in (0, 1)])
  viz.image_rows(
    os.path.join(workdir, "matches.png"),
    [shown[k][cols] for k in names],
    row_names=names,
    captions=[[captions[k][i] for i in cols] for k in names],
    title=(
      f"{d.name} classes {tuple(d.classes)}, {len(xtr)} training images; "
      "under each row's image: SSIM to the training image above"
    ),
  )
  result = {
    "config": config.to_dict(),
    "train": train_info,
    "true_set": {
      "stationarity": true_resid,
      "lambda_total": float(lam.sum() / len(xtr)),
      # Baseline lambda fit at the training images, x fixed, 300 steps.
      "lambda_fit_residual": units,
    },
    "rows": rows,
    "seconds": time.perf_counter() - t0,
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def table(result: dict) -> str:
  """Markdown rows: method | train pass, mean | held-out pass, mean | gap."""
  lines = []
  for name, row in result["rows"].items():
    tr, ho = row["train"], row["heldout"]
    st = row.get("stationarity")
    lines.append(
      f"| {name} | {tr['pass']:.2f} | {tr['mean']:.3f} | {ho['pass']:.2f} | "
      f"{ho['mean']:.3f} | {row['gap_mean']:+.3f} | "
      + ("-" if st is None else f"{st:.4f}")
      + " |"
    )
  return "\n".join(lines)


def main(argv, config_flag, workdir_flag):
  del argv
  if workdir_flag.value is None or config_flag.value is None:
    raise app.UsageError("--config and --workdir are required.")
  result = run(config_flag.value, workdir_flag.value)
  t = result["train"]
  print(
    f"trained {t['train_steps']} steps: loss {t['train_loss']:.2e}, "
    f"accuracy {t['train_acc']:.3f}; true training set: stationarity "
    f"{result['true_set']['stationarity']:.4f}, lambda total "
    f"{result['true_set']['lambda_total']:.3f}; {result['seconds']:.0f} s"
  )
  fit = result["true_set"]["lambda_fit_residual"]
  print(
    "baseline lambda fit at the training images (x fixed, 300 steps): "
    + ", ".join(f"{k} {v:.4f}" for k, v in fit.items())
  )
  print(
    "| candidates | train SSIM>=0.4 | train mean | held-out SSIM>=0.4 | "
    "held-out mean | gap (mean) | stationarity |"
  )
  print("|---|---|---|---|---|---|---|")
  print(table(result))


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, *_flags))
