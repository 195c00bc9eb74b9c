"""Models: output shapes, adapters (NNX and Linen agree), train/eval modes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv_jax import models


@pytest.mark.parametrize(
  "name,kwargs,shape",
  [
    ("convnet", {"width": 8, "depth": 3}, (8, 8, 1)),
    (
      "convnet",
      {"width": 8, "depth": 3, "norm": "none", "pool": "max"},
      (28, 28, 1),
    ),
    ("convnet", {"width": 8, "depth": 2, "norm": "batch"}, (32, 32, 3)),
    ("convnet", {"width": 8, "depth": 1, "norm": "layer"}, (8, 8, 1)),
    ("resnet18", {"width": 4}, (8, 8, 1)),
    ("resnet18", {"width": 4, "norm": "instance"}, (16, 16, 3)),
    ("mlp", {"hidden": (16,)}, (8, 8, 1)),
  ],
)
def test_output_shapes(name, kwargs, shape):
  model = models.build_model(
    name, image_shape=shape, num_classes=7, key=jax.random.key(0), **kwargs
  )
  apply_fn, params = models.nnx_apply_fn(model)
  logits = jax.jit(apply_fn)(params, jnp.ones((3, *shape)))
  assert logits.shape == (3, 7)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_bad_model_arguments():
  with pytest.raises(ValueError, match="Unknown model 'vgg'"):
    models.build_model(
      "vgg", image_shape=(8, 8, 1), num_classes=2, key=jax.random.key(0)
    )
  with pytest.raises(ValueError, match="Unknown norm 'group'"):
    models.ConvNet(1, 2, image_size=8, norm="group", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Unknown pool 'min'"):
    models.ConvNet(1, 2, image_size=8, pool="min", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pools image_size 8 down to nothing"):
    models.ConvNet(1, 2, image_size=8, depth=4, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="hidden"):
    models.build_model(
      "convnet",
      image_shape=(8, 8, 1),
      num_classes=2,
      key=jax.random.key(0),
      hidden=(3,),
    )


def _reference_convnet(params, x, depth):
  """The default ConvNet (instance norm, average pooling) written out in
  numpy: per block a 3x3 SAME convolution with bias, a per-sample,
  per-channel normalisation over H and W (epsilon 1e-5) with a learned
  scale and bias, ReLU and 2x2 average pooling (odd sizes floored); then a
  dense layer on the flattened [H, W, C] map."""
  x = np.asarray(x, np.float64)
  for i in range(depth):
    conv, norm = params["convs"][i], params["norms"][i]
    kernel = np.asarray(conv["kernel"], np.float64)  # [3, 3, C_in, C_out]
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(
      padded[:, dy : dy + h, dx : dx + w] @ kernel[dy, dx]
      for dy in range(3)
      for dx in range(3)
    ) + np.asarray(conv["bias"])
    mean = y.mean(axis=(1, 2), keepdims=True)
    var = y.var(axis=(1, 2), keepdims=True)
    y = (y - mean) / np.sqrt(var + 1e-5) * np.asarray(norm["scale"])
    y = np.maximum(y + np.asarray(norm["bias"]), 0.0)
    h2, w2 = h // 2, w // 2
    y = y[:, : 2 * h2, : 2 * w2].reshape(n, h2, 2, w2, 2, -1)
    x = y.mean(axis=(2, 4))
  head = params["head"]
  return x.reshape(len(x), -1) @ np.asarray(head["kernel"]) + head["bias"]


def test_default_convnet_matches_a_reference_computation():
  # 10x10 inputs, depth 2: 10 -> 5 -> 2, the second pooling floors.
  model = models.ConvNet(
    3, 4, image_size=10, width=5, depth=2, rngs=nnx.Rngs(0)
  )
  assert (model.pool, type(model.norms[0])) == ("avg", nnx.GroupNorm)
  apply_fn, params = models.nnx_apply_fn(model)
  # Trained-looking values: norm scales away from 1, biases away from 0.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: a + 0.3 * rng.normal(size=a.shape).astype(a.dtype), params
  )
  x = rng.normal(size=(3, 10, 10, 3)).astype(np.float32)
  np.testing.assert_allclose(
    apply_fn(params, x), _reference_convnet(params, x, 2), rtol=1e-4, atol=1e-5
  )


class _LinenConvNet(nn.Module):
  """A Linen twin of `models.ConvNet(norm="batch", pool="max")`."""

  width: int
  depth: int
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    for _ in range(self.depth):
      x = nn.Conv(self.width, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _linen_variables_from_nnx(fm: models.FunctionalModel, depth: int):
  """Maps NNX ConvNet parameters and batch stats onto the Linen twin."""
  params, stats = {}, {}
  for i in range(depth):
    conv, norm = fm.params["convs"][i], fm.params["norms"][i]
    params[f"Conv_{i}"] = {"kernel": conv["kernel"], "bias": conv["bias"]}
    params[f"BatchNorm_{i}"] = {"scale": norm["scale"], "bias": norm["bias"]}
    s = fm.state["norms"][i]
    stats[f"BatchNorm_{i}"] = {"mean": s["mean"], "var": s["var"]}
  params["Dense_0"] = dict(fm.params["head"])
  return {"params": params, "batch_stats": stats}


def test_nnx_and_linen_adapters_give_identical_logits():
  depth, width = 2, 6
  model = models.ConvNet(
    3,
    5,
    image_size=8,
    width=width,
    depth=depth,
    norm="batch",
    pool="max",
    rngs=nnx.Rngs(1),
  )
  fm = models.functional(model)
  # Non-trivial batch statistics, so the test sees whether they are used.
  x = jax.random.normal(jax.random.key(2), (16, 8, 8, 3)) * 2 + 1
  _, state = fm.train_apply(fm.params, fm.state, x)
  fm = fm._replace(state=state)
  nnx.update(model, state)

  nnx_fn, nnx_params = models.nnx_apply_fn(model)
  linen_fn, linen_params = models.linen_apply_fn(
    _LinenConvNet(width, depth, 5),
    _linen_variables_from_nnx(fm, depth),
    train=False,
  )
  xq = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  np.testing.assert_allclose(
    nnx_fn(nnx_params, xq), linen_fn(linen_params, xq), rtol=1e-5, atol=1e-5
  )
  # Both are differentiable in params only, with batch stats closed over.
  g_nnx = jax.grad(lambda p: nnx_fn(p, xq).sum())(nnx_params)
  g_lin = jax.grad(lambda p: linen_fn(p, xq).sum())(linen_params)
  np.testing.assert_allclose(
    g_nnx["head"]["kernel"], g_lin["Dense_0"]["kernel"], rtol=1e-4, atol=1e-5
  )


def test_linen_adapter_logits_fn_and_missing_params():
  class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
      logits = nn.Dense(3)(x.reshape(x.shape[0], -1))
      return logits, {"features": x}

  variables = Pair().init(jax.random.key(0), jnp.ones((1, 2, 2, 1)))
  fn, params = models.linen_apply_fn(
    Pair(), variables, logits_fn=lambda out: out[0]
  )
  assert fn(params, jnp.ones((5, 2, 2, 1))).shape == (5, 3)
  with pytest.raises(ValueError, match="no 'params' collection"):
    models.linen_apply_fn(Pair(), {"batch_stats": {}})


def test_train_mode_updates_batch_stats_and_eval_uses_them():
  model = models.ConvNet(
    1, 3, image_size=8, width=4, depth=1, norm="batch", rngs=nnx.Rngs(0)
  )
  fm = models.functional(model)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1)) + 3.0
  _, new_state = fm.train_apply(fm.params, fm.state, x)
  mean0 = fm.state["norms"][0]["mean"]
  mean1 = new_state["norms"][0]["mean"]
  assert not np.allclose(mean0, mean1)
  # Eval mode is deterministic per example: logits of a sample do not
  # depend on the rest of the batch.
  full = fm.eval_apply(fm.params, new_state, x)
  single = fm.eval_apply(fm.params, new_state, x[:1])
  np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-6)


def test_nnx_apply_fn_wrt_subset_closes_over_the_rest():
  """The last-layer setting: only the head is differentiable."""
  model = models.MLP(4, 3, hidden=(5,), rngs=nnx.Rngs(0))
  full_fn, full_params = models.nnx_apply_fn(model)
  head_only = nnx.All(nnx.Param, nnx.PathContains("head"))
  head_fn, head_params = models.nnx_apply_fn(model, wrt=head_only)
  assert set(head_params) == {"head"}
  x = jnp.ones((2, 2, 2, 1))
  np.testing.assert_allclose(full_fn(full_params, x), head_fn(head_params, x))


def test_num_params():
  model = models.MLP(4, 3, hidden=(5,), rngs=nnx.Rngs(0))
  _, params = models.nnx_apply_fn(model)
  assert models.num_params(params) == 4 * 5 + 5 + 5 * 3 + 3
