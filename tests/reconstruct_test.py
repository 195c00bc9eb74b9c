"""benchmarks/reconstruct.py (Haim et al.'s reconstruction experiment) on a
tiny setting, and the baseline's default multipliers on a trained
homogeneous MLP."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv_jax import baseline


@pytest.fixture(scope="module")
def script(repo_module):
  return repo_module("benchmarks", "reconstruct.py")


@pytest.fixture(scope="module")
def tiny_config(repo_module):
  return repo_module("configs", "reconstruct.py").get_config("tiny")


@pytest.fixture(scope="module")
def trained(script, tiny_config):
  """The tiny preset's model, trained to a vanishing loss on 20 digits."""
  d, m, t = tiny_config.data, tiny_config.model, tiny_config.train
  (x, y), _ = script.load_two_class(d.name, d.classes, d.num_train, 2, 0)
  apply_fn = script.make_apply_fn(x.mean(0))
  params = script.init_mlp(
    jax.random.key(0), x[0].size, m.width, m.depth, m.init_scale
  )
  params, info = script.train(
    apply_fn,
    params,
    jnp.asarray(x),
    jnp.asarray(y),
    lr=t.lr,
    max_steps=t.max_steps,
    target=t.target_loss,
  )
  assert info["train_acc"] == 1.0 and info["train_loss"] < 1e-4
  return apply_fn, params, x, y


def test_default_multipliers_reach_the_training_sets_residual(script, trained):
  apply_fn, params, x, y = trained
  _, best = baseline.best_multipliers(apply_fn, params, x, y)
  assert best < 0.01  # The trained model is near a KKT point of its data.
  got = script.lambda_fit_residual(apply_fn, params, x, y, 300)
  assert got <= 1.2 * best + 1e-4, (got, best)
  # The test has teeth: the same numbers in raw units (the weighted sum not
  # divided by m; measured 5x the best residual) do not get there.
  raw = script.lambda_fit_residual(
    apply_fn, params, x, y, 300, **script.raw_unit_settings(len(y))
  )
  assert raw > 2 * best, (raw, best)


def test_tiny_experiment_runs_and_scores(script, tiny_config, tmp_path):
  result = script.run(tiny_config, str(tmp_path))
  rows = result["rows"]
  assert list(rows) == [
    "noise (initial candidates)",
    "deepkkt",
    "baseline",
    "deepkkt from training images",
    "baseline from training images",
  ]
  for row in rows.values():
    for split in ("train", "heldout"):
      assert 0.0 <= row[split]["pass"] <= 1.0 and -1 < row[split]["mean"] <= 1
    np.testing.assert_allclose(
      row["gap_mean"], row["train"]["mean"] - row["heldout"]["mean"]
    )
  # Started at the training images, 20 small steps keep them: each training
  # image's best match is itself, nearly, and held-out images match worse.
  for name in ("deepkkt", "baseline"):
    kept = rows[f"{name} from training images"]
    assert kept["train"]["mean"] > 0.9 > kept["heldout"]["mean"]
  assert result["train"]["train_acc"] == 1.0
  assert 0 <= result["true_set"]["stationarity"] < 0.01
  fit = result["true_set"]["lambda_fit_residual"]
  assert fit["best (NNLS)"] == result["true_set"]["stationarity"]
  assert fit["best (NNLS)"] <= fit["defaults"] < fit["raw units"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"].keys() == rows.keys()
  assert (tmp_path / "matches.png").stat().st_size > 0
  assert len(script.table(result).splitlines()) == len(rows)


def test_bad_data_requests_raise(script):
  with pytest.raises(ValueError, match="even"):
    script.load_two_class("digits", (0, 1), 3, 2, 0)
  with pytest.raises(ValueError, match="distinct"):
    script.load_two_class("digits", (1, 1), 4, 2, 0)
  with pytest.raises(ValueError, match="needed"):
    script.load_two_class("digits", (0, 1), 400, 2, 0)
  with pytest.raises(ValueError, match="Unknown data set"):
    script.load_two_class("cifar", (0, 1), 4, 2, 0)
