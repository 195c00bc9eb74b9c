"""The candidate-count regime: how DSVs change with candidates per class.

KKT reconstruction (Haim et al. 2022, Buzaglo et al. 2023) recovers
training images when the candidates can represent theta*: about twice as
many candidates as training samples, on small training sets. DSV synthesis
runs a handful of candidates per class against a classifier trained on
thousands. This section synthesises from noise at several candidate
counts per class (`report.candidate_counts`; 0 stands for twice the mean
training samples per class) and measures, for each count, what the DSVs
are:

- classical agreement (pixel classifiers fitted on the real training
  split, `judges`);
- the SSIM of each DSV's best match among real images of its class
  (`similarity.best_match`), against training images and against as many
  held-out (test) images per class: a DSV that reconstructs training data
  matches training images better than held-out ones, a class prototype
  matches both alike;
- the test accuracy of fresh models retrained on all the candidates;
- the stationarity residual the synthesis ended at.
"""

import os
from typing import Any

import ml_collections
import numpy as np

from dsv_jax import distributed, similarity, viz
from dsv_jax.experiment.report.cache import RetrainRows, synth_run

# A best-match SSIM at or above this counts as a match (Haim et al.'s
# threshold for a reconstructed training image).
SSIM_MATCH = 0.4


def twice_per_class(train_labels: np.ndarray, num_classes: int) -> int:
  """Twice the mean training samples per class: the count 0 stands for."""
  return int(round(2 * len(train_labels) / num_classes))


def resolve_counts(
  counts: tuple[int, ...], train_labels: np.ndarray, num_classes: int
) -> list[int]:
  """Candidates per class: 0 stands for twice the mean training samples
  per class; duplicates are dropped, the order kept."""
  twice = twice_per_class(train_labels, num_classes)
  out = []
  for c in counts:
    n = twice if c == 0 else int(c)
    if n < 1:
      raise ValueError(
        f"Config key report.candidate_counts: {c} is not >= 0 (0: twice "
        "the training samples per class)."
      )
    if n not in out:
      out.append(n)
  return out


def matched_references(
  train_labels: np.ndarray, held_labels: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of training and held-out images, equally many per class.

  The best of more references is higher by chance alone, so the training
  and held-out comparisons draw on the same number of images of every
  class: the smaller of the two counts, drawn at random (seeded) from the
  larger split. Returns ``(train_indices, held_indices)``.
  """
  rng = np.random.default_rng(seed)
  train_idx, held_idx = [], []
  for c in np.unique(held_labels):
    train_pool = np.flatnonzero(train_labels == c)
    held_pool = np.flatnonzero(held_labels == c)
    n = min(len(train_pool), len(held_pool))
    train_idx.append(np.sort(rng.choice(train_pool, n, replace=False)))
    held_idx.append(np.sort(rng.choice(held_pool, n, replace=False)))
  return np.concatenate(train_idx), np.concatenate(held_idx)


def best_ssim_per_class(
  images: np.ndarray,
  labels: np.ndarray,
  ref_images: np.ndarray,
  ref_labels: np.ndarray,
) -> np.ndarray:
  """Each image's best SSIM among the references of its own class.

  Images are raw pixels in [0, 1] (``info.denormalize`` then clipped).
  """
  out = np.zeros(len(images), np.float32)
  for c in np.unique(labels):
    rows = labels == c
    refs = ref_images[ref_labels == c]
    if not len(refs):
      raise ValueError(f"No reference image of class {c}.")
    out[rows] = similarity.best_match(images[rows], refs)[1]
  return out


def regime_row(
  dsv_images: np.ndarray,
  dsv_labels: np.ndarray,
  refs: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, float]:
  """SSIM figures of DSVs against each reference set (``train``, ``held``):
  mean best-match SSIM and the fraction at or above `SSIM_MATCH`."""
  out = {}
  for name, (ref_x, ref_y) in refs.items():
    s = best_ssim_per_class(dsv_images, dsv_labels, ref_x, ref_y)
    out[f"ssim_{name}"] = float(s.mean())
    out[f"ssim_match_{name}"] = float(np.mean(s >= SSIM_MATCH))
  return out


def raw_pixels(images: np.ndarray, info: Any) -> np.ndarray:
  return np.clip(info.denormalize(np.asarray(images)), 0.0, 1.0)


def regime_section(
  config: ml_collections.ConfigDict,
  workdir: str,
  rows: RetrainRows,
  out_dir: str,
) -> tuple[str, dict]:
  """The candidate-count regime (module docstring) as a report section."""
  ds, info = rows.ds, rows.clf.info
  counts = resolve_counts(
    tuple(config.report.candidate_counts), ds.train["label"], info.num_classes
  )
  train_idx, held_idx = matched_references(
    ds.train["label"], ds.test["label"], config.seed
  )
  held_y = ds.test["label"][held_idx]
  refs = {
    "train": (
      raw_pixels(ds.train["image"][train_idx], info),
      ds.train["label"][train_idx],
    ),
    "held": (raw_pixels(ds.test["image"][held_idx], info), held_y),
  }
  results, lines = {}, []
  for k in counts:
    dsv, record, _ = synth_run(
      config,
      workdir,
      f"noise_k{k}",
      **{"synth.init": "noise", "synth.num_per_class": k},
    )
    active = np.asarray(dsv.active, bool)
    images = np.asarray(dsv.images)[active]
    labels = np.asarray(dsv.targets)[active]
    if labels.ndim == 2:
      labels = labels.argmax(-1)
    row = rows(f"DSV noise-init k={k}", images, labels)
    res = {
      "candidates_per_class": k,
      "test_accuracy": row["mean"],
      "test_accuracy_std": row["std"],
      "accuracies": row["accuracies"],
      "classical_agreement": rows.classical_agreement(images, labels),
      "stationarity_last": record.get("stationarity_last"),
      **regime_row(raw_pixels(images, info), labels, refs),
    }
    results[str(k)] = res
    lines.append(
      f"| {k} | {100 * res['test_accuracy']:.2f} +- "
      f"{100 * res['test_accuracy_std']:.2f} | "
      f"{res['classical_agreement']:.2f} | {res['ssim_train']:.3f} / "
      f"{res['ssim_held']:.3f} | {res['ssim_match_train']:.2f} / "
      f"{res['ssim_match_held']:.2f} | {res['stationarity_last']:.3g} |"
    )
  # The real images themselves, as the scale of a data-like sample: the
  # held-out images against the (matched) training images.
  real = best_ssim_per_class(refs["held"][0], held_y, *refs["train"])
  results["real_heldout_vs_train_ssim"] = float(real.mean())
  results["real_heldout_vs_train_match"] = float(np.mean(real >= SSIM_MATCH))
  distributed.primary_only(viz.plot_curves)(
    os.path.join(out_dir, "regime.png"),
    [
      {"step": results[str(k)]["candidates_per_class"], **results[str(k)]}
      for k in counts
    ],
    keys=[
      "classical_agreement",
      "test_accuracy",
      "ssim_train",
      "ssim_held",
      "ssim_match_train",
      "stationarity_last",
    ],
    title="noise-init DSVs against candidates per class",
    xlabel="candidates per class",
  )
  twice = twice_per_class(ds.train["label"], info.num_classes)
  md = (
    "## 8. Candidate-count regime\n\n"
    "DSVs synthesised from noise with the noise recipe at "
    f"{', '.join(map(str, counts))} candidates per class. KKT "
    "reconstruction recovers training images at about twice the training "
    f"samples per class ({twice} here; `report.candidate_counts` 0). "
    "Retrained: test accuracy of fresh models trained on all the "
    "candidates. SSIM: each DSV's best match among real images of its "
    "class, training images / as many held-out (test) images per class; "
    f"match: the fraction with SSIM >= {SSIM_MATCH}. Held-out real images "
    f"score {results['real_heldout_vs_train_ssim']:.3f} against the "
    f"training images ({results['real_heldout_vs_train_match']:.2f} "
    "match): the scale of a data-like image.\n\n"
    "| candidates/class | retrained test accuracy % | classical agreement "
    "| best SSIM train / held-out | match train / held-out | stationarity "
    "residual (last) |\n|---|---|---|---|---|---|\n"
    + "\n".join(lines)
    + "\n\n![regime](regime.png)\n"
  )
  return md, results


__all__ = [
  "SSIM_MATCH",
  "best_ssim_per_class",
  "matched_references",
  "regime_row",
  "regime_section",
  "resolve_counts",
]
