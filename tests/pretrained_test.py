"""Pretrained torchvision classifiers: convert once, cache, reload offline.

The weights come from `torchvision.models.resnet50(weights=None)` with a
seeded random init (no download); `torch_required` (conftest) skips the
module without the [torch] extra, except in CI where that fails.
"""

import os

import jax
import numpy as np
import pytest

from dsv_jax import pretrained
from dsv_jax.data import imagenet


def _random_resnet50(seed=0):
  import torch
  import torchvision

  torch.manual_seed(seed)
  net = torchvision.models.resnet50(weights=None).eval()
  # Non-trivial BatchNorm statistics, so inference mode is what is tested.
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
  return net


@pytest.fixture(scope="module")
def net(torch_required):
  # Module fixtures are set up before a test's own: it must skip here.
  del torch_required
  return _random_resnet50()


def test_convert_once_cache_and_match_torchvision(
  torch_required, net, tmp_path
):
  del torch_required
  import torch
  import torchvision

  calls = []

  def fetch(name, weights):
    calls.append((name, weights))
    return net.state_dict()

  clf = pretrained.torchvision_classifier(
    "resnet50", cache_dir=str(tmp_path), state_dict_fn=fetch
  )
  assert calls == [("resnet50", pretrained.DEFAULT_WEIGHTS)]
  assert clf.path == pretrained.cache_path(
    "resnet50", pretrained.DEFAULT_WEIGHTS, str(tmp_path)
  )
  assert clf.info == imagenet.imagenet_info(224)
  # Our ImageNet normalisation is torchvision's own (one place: data.imagenet).
  tv = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
  np.testing.assert_allclose(tv.mean, imagenet.MEAN)
  np.testing.assert_allclose(tv.std, imagenet.STD)
  # Raw pixels in [0, 1] through each side's own normalisation.
  raw = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    t_in = torch.from_numpy(raw.transpose(0, 3, 1, 2))
    ref = net(
      torchvision.transforms.functional.normalize(t_in, tv.mean, tv.std)
    )
  out = np.asarray(jax.jit(clf.apply_fn)(clf.params, clf.info.normalize(raw)))
  np.testing.assert_allclose(
    out, ref.numpy(), atol=2e-5 * float(ref.abs().max())
  )

  # Second call: from the cache, no conversion, same arrays.
  again = pretrained.torchvision_classifier(
    "resnet50", cache_dir=str(tmp_path), state_dict_fn=fetch
  )
  assert len(calls) == 1
  for a, b in zip(
    jax.tree.leaves(clf.params), jax.tree.leaves(again.params), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_failed_conversion_leaves_no_cache(torch_required, net, tmp_path):
  del torch_required

  def broken(name, weights):
    sd = dict(net.state_dict())
    del sd["fc.bias"]
    return sd

  with pytest.raises(ValueError, match="fc.bias"):
    pretrained.ensure_cached(cache_dir=str(tmp_path), state_dict_fn=broken)
  path = pretrained.cache_path("resnet50", "IMAGENET1K_V1", str(tmp_path))
  assert not os.path.exists(os.path.join(path, "meta.json"))
  # The next call converts cleanly.
  pretrained.ensure_cached(
    cache_dir=str(tmp_path), state_dict_fn=lambda n, w: net.state_dict()
  )
  assert os.path.isfile(os.path.join(path, "meta.json"))


def test_weights_of_other_sizes_do_not_fit(torch_required, net, tmp_path):
  del torch_required
  import torch

  sd = dict(net.state_dict())
  sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 5, 5)  # Not 3x3.
  with pytest.raises(ValueError, match="does not fit the model"):
    pretrained.ensure_cached(
      cache_dir=str(tmp_path), state_dict_fn=lambda n, w: sd
    )
  path = pretrained.cache_path("resnet50", "IMAGENET1K_V1", str(tmp_path))
  assert not os.path.exists(path)


def test_wrong_number_of_classes(torch_required, tmp_path):
  del torch_required
  import torchvision

  small = torchvision.models.resnet50(weights=None, num_classes=10)
  with pytest.raises(ValueError, match="10 classes; ImageNet-1k has 1000"):
    pretrained.ensure_cached(
      cache_dir=str(tmp_path), state_dict_fn=lambda n, w: small.state_dict()
    )


def test_unknown_model_and_weights(torch_required, tmp_path):
  del torch_required
  with pytest.raises(ValueError, match="No pretrained torchvision model 'vgg'"):
    pretrained.ensure_cached("vgg", cache_dir=str(tmp_path))
  with pytest.raises(
    ValueError, match="no resnet50 weights 'V9'.*IMAGENET1K_V2"
  ):
    pretrained.torchvision_state_dict("resnet50", "V9")


def test_download_failure_is_one_clear_error(torch_required, monkeypatch):
  del torch_required
  import urllib.error

  from torchvision.models import _api

  def offline(*args, **kwargs):
    raise urllib.error.URLError(
      "[Errno -3] Temporary failure in name resolution"
    )

  monkeypatch.setattr(_api, "load_state_dict_from_url", offline)
  with pytest.raises(OSError, match="Could not download torchvision resnet50"):
    pretrained.torchvision_state_dict("resnet50", "IMAGENET1K_V1")


def test_imagenet_config_has_the_papers_settings():
  from dsv_jax import configs
  from dsv_jax.experiment import common, sources

  c = configs.get_config("imagenet")
  assert (c.kkt.beta_primal, c.kkt.beta_tv, c.kkt.beta_norm) == (2e-5, 40, 1e-6)
  assert c.kkt.eta == 5
  sy = c.synth
  augs = (
    sy.aug_translate,
    sy.aug_crop,
    sy.aug_cutout,
    sy.aug_flip,
    sy.aug_noise,
  )
  assert augs == (0.125, 0.2, 0.15, 0.5, 0.01)
  assert sy.num_devices == 0  # Every local device.
  assert sources.parse(c.model.source)[:2] == ("torchvision", "resnet50")
  info = imagenet.imagenet_info()
  classes = common.resolve_classes(sy.classes, info, "synth.classes")
  assert len(set(classes.tolist())) == 10
  assert imagenet.class_index("slug") in classes
  lowres = configs.get_config("imagenet", "lowres").synth
  assert (lowres.lowres_size, lowres.lowres_steps) == (56, 500)
  common.validate_config(configs.get_config("imagenet", "lowres"))


# About 4 compiles of a ResNet-50 DeepKKT step: minutes on 2 cores. `.ci/run`
# runs it in its own step (`pytest -m slow`).
@pytest.mark.slow
def test_imagenet_tiny_end_to_end_offline(
  torch_required, net, tmp_path, monkeypatch
):
  """`--config imagenet:tiny` without ImageNet or the network: the random
  torchvision weights stand in for the download; synthesis (with its
  low-resolution start), the edit and the interpolation run, the stages
  that need the data skip."""
  del torch_required
  from dsv_jax import artifacts, configs
  from dsv_jax.experiment import registry

  monkeypatch.setattr(
    pretrained, "torchvision_state_dict", lambda n, w: net.state_dict()
  )
  c = configs.get_config("imagenet", "tiny")
  c.model.source_cache_dir = str(tmp_path / "cache")
  c.data.data_dir = str(tmp_path / "no_imagenet")
  workdir = str(tmp_path / "wd")
  out = registry.run(c, workdir, "all")
  for stage in ("select", "retrain", "report"):
    assert "skipped" in out[stage]
  assert out["synthesize"]["lowres_steps"] == 2
  dsv, meta = artifacts.load_dsv(os.path.join(workdir, "synthesize"))
  assert dsv.images.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(dsv.targets, [1, 114])  # goldfish, slug.
  assert np.isfinite(dsv.images).all()
  ed = np.load(os.path.join(workdir, "edit", "edit.npz"))
  np.testing.assert_array_equal(
    ed["target"], [imagenet.class_index("head cabbage")]
  )
  assert out["interpolate"]["start"] == "dsv"


def test_command_line_caches_once(
  torch_required, net, tmp_path, monkeypatch, capsys
):
  del torch_required
  monkeypatch.setattr(
    pretrained, "torchvision_state_dict", lambda n, w: net.state_dict()
  )
  pretrained.main(["--cache_dir", str(tmp_path)])
  path = capsys.readouterr().out.strip()
  assert path == pretrained.cache_path(
    "resnet50", "IMAGENET1K_V1", str(tmp_path)
  )
  assert os.path.isfile(os.path.join(path, "meta.json"))


def test_multiprocess_run_needs_the_cache_first(tmp_path, monkeypatch):
  import jax

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(FileNotFoundError, match="python -m dsv_jax.pretrained"):
    pretrained.ensure_cached(cache_dir=str(tmp_path))
