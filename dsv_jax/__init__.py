"""dsv_jax: Deep Support Vectors (Lee et al., NeurIPS 2024) in JAX.

Library modules (import them directly, e.g. ``from dsv_jax import kkt``):
  kkt         pure DeepKKT objectives over any `apply_fn(params, x)`
  checks      the argument checks shared by the public functions
  parallel    device-mesh helpers for sharding candidates
  synthesize  DSV synthesis (optax-style init_fn/step_fn factory)
  select      matrix-free lambda fit over a training set (`fit_lambdas`)
  retrain     K fresh models trained together on a DSV set
  artifacts   the DSV set format (`save_dsv` / `load_dsv`)
  data, models, augment, train, checkpoints, viz

The experiment layer (stages over a workdir, the report, the command
line) is `dsv_jax.experiment`; the library never imports it.

Importing the package imports none of them: the submodules listed in
``__all__`` and the names re-exported here (`deepkkt_loss`,
`make_synthesizer`, `DSVSet`, ...) load on first attribute access (PEP
562). So ``import dsv_jax.kkt`` or ``import dsv_jax.select`` costs JAX and
numpy, not Orbax, matplotlib, TensorFlow (Datasets), scikit-learn or
absl's flags; ``dsv_jax.load_dsv`` imports Orbax when first used.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = (
  "artifacts",
  "augment",
  "checkpoints",
  "checks",
  "configs",
  "data",
  "kkt",
  "models",
  "parallel",
  "retrain",
  "select",
  "synthesize",
  "train",
)

# Re-exported names and the submodule that defines each.
_NAMES = {
  "DSVSet": "artifacts",
  "load_dsv": "artifacts",
  "save_dsv": "artifacts",
  "deepkkt_loss": "kkt",
  "make_deepkkt_loss": "kkt",
  "per_sample_grad_dots": "kkt",
  "per_sample_grads": "kkt",
  "primal_loss": "kkt",
  "stationarity_loss": "kkt",
  "stationarity_residual": "kkt",
  "weighted_loss_grad": "kkt",
  "make_synthesizer": "synthesize",
}


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    # import_module binds the submodule as an attribute of this package,
    # so this runs once per name.
    return importlib.import_module(f"{__name__}.{name}")
  if name in _NAMES:
    module = importlib.import_module(f"{__name__}.{_NAMES[name]}")
    value = getattr(module, name)
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # Static analysers and IDEs see eager imports.
  from dsv_jax import (
    artifacts,
    augment,
    checkpoints,
    checks,
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
    make_deepkkt_loss,
    per_sample_grad_dots,
    per_sample_grads,
    primal_loss,
    stationarity_loss,
    stationarity_residual,
    weighted_loss_grad,
  )
  from dsv_jax.synthesize import make_synthesizer

__all__ = [
  "DSVSet",
  "artifacts",
  "augment",
  "checkpoints",
  "checks",
  "configs",
  "data",
  "deepkkt_loss",
  "kkt",
  "load_dsv",
  "make_deepkkt_loss",
  "make_synthesizer",
  "models",
  "parallel",
  "per_sample_grad_dots",
  "per_sample_grads",
  "primal_loss",
  "retrain",
  "save_dsv",
  "select",
  "stationarity_loss",
  "stationarity_residual",
  "synthesize",
  "train",
  "weighted_loss_grad",
]
