"""benchmarks/synth_sweep.py reads its grid values in the config's types."""

import pytest

from dsv_jax import configs


@pytest.fixture(scope="module")
def script(repo_module):
  return repo_module("benchmarks", "synth_sweep.py")


def test_grid_values_take_the_config_types(script):
  config = configs.get_config("digits")
  grid = script.parse_grid(
    [
      "synth.other_priors=False,true,0,1",
      "synth.steps=50,200",
      "synth.lr_x=0.03",
    ],
    config,
  )
  assert grid == [
    ("synth.other_priors", [False, True, False, True]),
    ("synth.steps", [50, 200]),
    ("synth.lr_x", [0.03]),
  ]
  assert [type(v) for v in grid[1][1]] == [int, int]


def test_bad_grid_items_are_refused(script):
  config = configs.get_config("digits")
  with pytest.raises(SystemExit, match="not true or false"):
    script.parse_grid(["synth.other_priors=maybe"], config)
  with pytest.raises(SystemExit, match="not a config.synth or kkt key"):
    script.parse_grid(["train.steps=5"], config)


def test_prior_weights_are_refused_for_image_inits(script):
  script.check_keys(["kkt.beta_tv", "kkt.beta_norm"], "noise")
  script.check_keys(["synth.other_priors"], "other")
  for init, switch in (("other", "other_priors"), ("real", "image_priors")):
    with pytest.raises(SystemExit, match=switch):
      script.check_keys(["synth.steps", "kkt.beta_norm"], init)


def test_a_grid_point_runs_its_priors_switch_and_values(script):
  config = configs.get_config("fashion_mnist")
  assert config.kkt.beta_tv == 1.0 and not config.synth.other_priors
  off = script.sub_config(config, "other", [("synth.steps", 50)])
  assert (off.kkt.beta_tv, off.kkt.beta_norm, off.synth.steps) == (0, 0, 50)
  on = script.sub_config(
    config, "other", [("synth.other_priors", True), ("synth.lr_x", 0.05)]
  )
  assert (on.kkt.beta_tv, on.kkt.beta_norm) == (1.0, 1.0)
  assert (on.synth.steps, on.synth.lr_x) == (config.synth.other_steps, 0.05)
