"""dsv_jax: Deep Support Vectors (Lee et al., NeurIPS 2024) in JAX.

Modules (import them directly; `viz`, `report` and `baseline` are not
imported here):
  kkt         pure DeepKKT objectives over any `apply_fn(params, x)`
  parallel    device-mesh helpers for sharding candidates
  synthesize  DSV synthesis (optax-style init_fn/step_fn factory)
  select      matrix-free lambda fit over a training set (`fit_lambdas`)
  retrain     K fresh models trained together on a DSV set
  artifacts   the DSV set format (`save_dsv` / `load_dsv`)
  data, models, augment, train, checkpoints, configs
"""

from dsv_jax import (
  artifacts,
  augment,
  checkpoints,
  configs,
  data,
  kkt,
  models,
  parallel,
  retrain,
  select,
  synthesize,
  train,
)
from dsv_jax.artifacts import DSVSet, load_dsv, save_dsv
from dsv_jax.kkt import (
  deepkkt_loss,
  per_sample_grad_dots,
  per_sample_grads,
  primal_loss,
  stationarity_loss,
  stationarity_residual,
  weighted_loss_grad,
)
from dsv_jax.synthesize import make_synthesizer

__version__ = "0.1.0"

__all__ = [
  "DSVSet",
  "artifacts",
  "augment",
  "checkpoints",
  "configs",
  "data",
  "deepkkt_loss",
  "kkt",
  "load_dsv",
  "make_synthesizer",
  "models",
  "parallel",
  "per_sample_grad_dots",
  "per_sample_grads",
  "primal_loss",
  "retrain",
  "select",
  "save_dsv",
  "stationarity_loss",
  "stationarity_residual",
  "synthesize",
  "train",
  "weighted_loss_grad",
]
