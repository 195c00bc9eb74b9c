"""benchmarks/synth_sweep.py reads its grid values in the config's types."""

import pytest

from dsv_jax import configs
from dsv_jax.experiment import common


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
  """What the synthesize stage runs for a grid point (it derives the
  recipe itself, `common.synthesis_recipe`), for both image inits."""
  config = configs.get_config("fashion_mnist")
  assert config.kkt.beta_tv == 1.0 and not config.synth.other_priors

  def runs(init, settings):
    eff = common.synthesis_recipe(
      script.sub_config(config, init, settings), init
    )
    return eff.kkt.beta_tv, eff.kkt.beta_norm, eff.synth.steps, eff.synth.lr_x

  assert script.sub_config(config, "other", []).synth.init == "other"
  other = (config.synth.other_steps, config.synth.other_lr_x)
  assert runs("other", []) == (0, 0, *other)
  assert runs("other", [("synth.steps", 50)]) == (0, 0, 50, other[1])
  assert runs(
    "other", [("synth.other_priors", True), ("synth.lr_x", 0.05)]
  ) == (1.0, 1.0, other[0], 0.05)
  assert runs("real", [("synth.lr_x", 0.1)]) == (
    0,
    0,
    config.synth.image_steps,
    0.1,
  )
  assert runs("noise", [("synth.steps", 7), ("kkt.beta_tv", 3.0)]) == (
    3.0,
    1.0,
    7,
    config.synth.lr_x,
  )
