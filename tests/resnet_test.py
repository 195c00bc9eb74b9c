"""ResNet-50 (torchvision layout) and the torchvision converter.

The parity test needs torch and torchvision (the `[torch]` extra; the
`torch_required` fixture of conftest).
"""

import jax
import numpy as np
import pytest

from dsv_jax import models, torch_convert


def _model(size=32, classes=1000):
  return models.functional(
    models.build_model(
      "resnet50",
      image_shape=(size, size, 3),
      num_classes=classes,
      key=jax.random.key(0),
    )
  )


def _fake_state_dict(fm):
  """A torchvision-named state_dict of numpy arrays with fm's shapes."""
  sd = {}
  for prefix, path, kind in torch_convert._names():
    p, s = fm.params, fm.state
    for k in path:
      p = p[k]
      s = s[k] if kind == "bn" else s
    if kind == "conv":
      sd[f"{prefix}.weight"] = np.asarray(p["kernel"]).transpose(3, 2, 0, 1)
    elif kind == "linear":
      sd[f"{prefix}.weight"] = np.asarray(p["kernel"]).T
      sd[f"{prefix}.bias"] = np.asarray(p["bias"])
    else:
      sd[f"{prefix}.weight"] = np.asarray(p["scale"])
      sd[f"{prefix}.bias"] = np.asarray(p["bias"])
      sd[f"{prefix}.running_mean"] = np.asarray(s["mean"])
      sd[f"{prefix}.running_var"] = np.asarray(s["var"])
      sd[f"{prefix}.num_batches_tracked"] = np.array(0)
  return sd


def test_resnet50_has_torchvisions_size():
  fm = _model(classes=1000)
  # torchvision.models.resnet50().parameters(): 25,557,032 scalars.
  assert models.num_params(fm.params) == 25_557_032
  x = np.zeros((2, 32, 32, 3), np.float32)
  assert jax.jit(fm.eval_apply)(fm.params, fm.state, x).shape == (2, 1000)


def test_converter_inverts_the_layout_and_names_bad_input():
  fm = _model(classes=10)
  sd = _fake_state_dict(fm)
  out = torch_convert.resnet50_from_torch(sd)
  jax.tree.map(np.testing.assert_array_equal, out["params"], fm.params)
  jax.tree.map(np.testing.assert_array_equal, out["model_state"], fm.state)
  missing = dict(sd)
  del missing["layer3.2.bn2.running_var"]
  with pytest.raises(ValueError, match="layer3.2.bn2.running_var"):
    torch_convert.resnet50_from_torch(missing)
  with pytest.raises(ValueError, match="does not, e.g. \\['head.weight'\\]"):
    torch_convert.resnet50_from_torch({**sd, "head.weight": np.ones((2, 2))})
  bad = {**sd, "fc.weight": np.ones(3)}
  with pytest.raises(ValueError, match="fc.weight"):
    torch_convert.resnet50_from_torch(bad)


def test_logits_match_torchvision(torch_required):
  del torch_required
  import torch
  import torchvision

  net = torchvision.models.resnet50(weights=None).eval()
  # Random BatchNorm statistics and affine parameters: with the defaults
  # (mean 0, var 1, scale 1, bias 0) a swapped mean/var or scale/bias
  # would go unnoticed.
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.1)
  arrays = torch_convert.resnet50_from_torch(net.state_dict())
  fm = _model(size=64)
  assert jax.tree.structure(arrays["params"]) == jax.tree.structure(fm.params)
  # Odd sizes check the explicit padding of the strided stem and pools.
  x = np.random.default_rng(0).normal(size=(2, 67, 61, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  out = np.asarray(
    jax.jit(fm.eval_apply)(arrays["params"], arrays["model_state"], x)
  )
  # float32 round-off over 53 layers, relative to the logits' scale.
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
  assert np.abs(out - ref).max() < 1e-3 * ref.std()


def test_config_builds_resnet50():
  from dsv_jax.configs import digits
  from dsv_jax.experiment import common

  config = digits.get_config("tiny")
  config.model.name = "resnet50"
  common.validate_config(config)
  info = common.load_data(config).info
  model = common.build_model("resnet50", common.model_kwargs(config), info, 0)
  assert models.num_params(models.functional(model).params) > 23_000_000
