"""One DSV synthesis experiment: acceptance metrics as one JSON line.

Synthesises `--per_class` candidates per class with a trained classifier
(workdir of the `train` stage) and reports: survival (active fraction),
source-model accuracy of the survivors, agreement of an independently
trained classifier (`--indep`, another seed and width, trained on the real
data) with the targets, mean entropy at the first and last step, the final
loss terms, wall time and candidate-steps/s.

Tuning runs use `--real_split validation` (real-init images drawn from the
held-out validation split); the test split is never used.

Settings default to the classifier's dataset config (`dsv_jax.configs`);
`--set key=value` overrides one.

Example:
  python scripts/synth_experiment.py --clf /tmp/w/digits \
    --indep /tmp/w/digits/report/runs/independent --init noise --steps 300 \
    --set distance=l1_mean --set dual=mask
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv_jax import augment, configs, data, synthesize
from dsv_jax.experiment import common


def _defaults(dataset: str) -> dict:
  """The synthesis settings of the dataset's packaged config (one source)."""
  c = configs.get_config(dataset)
  k, sy = c.kkt, c.synth
  return {
    "lr_x": sy.lr_x,
    "lr_lambda": sy.lr_lambda,
    "eta": k.eta,
    "beta_primal": k.beta_primal,
    "beta_tv": k.beta_tv,
    "beta_norm": k.beta_norm,
    "gated": k.gated,
    "distance": k.distance,
    "dual": sy.dual,
    "lambda_low": sy.lambda_low,
    "lambda_high": sy.lambda_high,
    "translate": sy.aug_translate,
    "crop": sy.aug_crop,
    "flip": sy.aug_flip,
    "cutout": sy.aug_cutout,
    "noise": sy.aug_noise,
    "stationarity": k.beta_stationarity,
  }


def _parse(sets, dataset):
  hp = _defaults(dataset)
  for item in sets:
    k, _, v = item.partition("=")
    if k not in hp:
      raise SystemExit(f"unknown --set key {k}")
    d = hp[k]
    hp[k] = v.lower() in ("1", "true") if isinstance(d, bool) else type(d)(v)
  return hp


def run(args, hp):
  clf = common.load_classifier(args.clf)
  indep = common.load_classifier(args.indep) if args.indep else None
  info = clf.info
  c = info.num_classes
  labels = synthesize.class_targets(args.per_class, c)
  key = jax.random.key(args.seed)
  if args.init == "noise":
    x0 = synthesize.noise_init(
      jax.random.fold_in(key, 7), len(labels), info.image_shape
    )
  else:
    ds = data.load_dataset(info.name)
    x0, _ = synthesize.real_init(
      jax.random.fold_in(key, 7), ds.split(args.real_split), labels
    )
  apply_fn = clf.apply_fn
  synth = synthesize.make_synthesizer(
    apply_fn,
    x_tx=optax.adam(hp["lr_x"]),
    lambda_tx=optax.adam(hp["lr_lambda"]),
    eta=hp["eta"],
    beta_primal=hp["beta_primal"],
    beta_tv=hp["beta_tv"],
    beta_norm=hp["beta_norm"],
    gated=hp["gated"],
    distance=hp["distance"],
    dual=hp["dual"],
    lambda_init=(hp["lambda_low"], hp["lambda_high"]),
    augment_fn=augment.make_augment(
      translate=hp["translate"],
      crop=hp["crop"],
      flip=hp["flip"],
      cutout=hp["cutout"],
      noise=hp["noise"],
    ),
    pixel_min=info.pixel_min,
    pixel_max=info.pixel_max,
    beta_stationarity=hp["stationarity"],
  )
  curve = []
  t0 = time.perf_counter()
  state = synthesize.synthesize(
    synth,
    clf.params,
    key,
    x0,
    labels,
    steps=args.steps,
    on_metrics=curve.append,
    log_every=max(1, args.steps // 10),
  )
  jax.block_until_ready(state.x)
  wall = time.perf_counter() - t0
  active = np.asarray(state.active)
  src = synthesize.describe(apply_fn, clf.params, state.x, labels)
  src_ok = np.asarray(src["prediction"]) == labels
  out = {
    "init": args.init,
    "per_class": args.per_class,
    "steps": args.steps,
    **hp,
    "survival": float(active.mean()),
    "source_acc_survivors": float(src_ok[active].mean())
    if active.any()
    else 0.0,
    "entropy_first": curve[0]["entropy"],
    "entropy_last": curve[-1]["entropy"],
    "stationarity_last": curve[-1]["stationarity"],
    "primal_last": curve[-1]["primal"],
    "lambda_mean_last": curve[-1]["lambda_mean"],
    "wall_s": wall,
    "candidate_steps_per_s": len(labels) * args.steps / wall,
  }
  if indep is not None:
    pred = np.asarray(jnp.argmax(indep.apply_fn(indep.params, state.x), -1))
    ok = pred == labels
    out["indep_agree_survivors"] = (
      float(ok[active].mean()) if active.any() else 0.0
    )
    out["indep_agree_all"] = float(ok.mean())
    x0_pred = np.asarray(jnp.argmax(indep.apply_fn(indep.params, x0), -1))
    out["indep_agree_init"] = float((x0_pred == labels).mean())
  if args.curve:
    out["curve"] = curve
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--clf", required=True)
  p.add_argument("--indep", default="")
  p.add_argument("--init", choices=("noise", "real"), default="noise")
  p.add_argument("--real_split", default="validation")
  p.add_argument("--per_class", type=int, default=10)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--curve", action="store_true")
  p.add_argument("--set", action="append", default=[])
  args = p.parse_args()
  dataset = common.load_classifier(args.clf).info.name
  print(json.dumps(run(args, _parse(args.set, dataset))), flush=True)


if __name__ == "__main__":
  main()
