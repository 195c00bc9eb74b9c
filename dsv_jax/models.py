"""Flax classifiers and the adapters that turn them into `apply_fn`s.

This is the only module of the core that knows Flax. Everything downstream
(training, DeepKKT terms, selection, synthesis) sees a model as a pair

  apply_fn(params, images f32[B, H, W, C]) -> logits f32[B, K],  params

with `params` a plain nested dict of arrays and every non-trainable piece
(BatchNorm statistics, frozen layers) closed over in evaluation mode.

Models (Flax NNX, the API flax 0.12 recommends):
  * `ConvNet`: the dataset-distillation ConvNet (Zhao et al., DC/DSA/DM; the
    DSV paper's CIFAR model): `depth` x [conv3x3 -> norm -> ReLU -> pool 2x2],
    then one dense layer. Width, depth, norm and pooling are configurable.
  * `ResNet18`: CIFAR-style ResNet-18 (3x3 stem, no stem pooling).
  * `MLP`: flatten -> hidden dense layers with ReLU -> dense.
Linen modules are supported through `linen_apply_fn`.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv_jax.batches import padded_batches
from dsv_jax.types import ApplyFn, Params, PyTree

NORMS = ("instance", "batch", "layer", "none")
POOLS = ("avg", "max")


def _norm(kind: str, features: int, *, rngs: nnx.Rngs) -> Callable:
  if kind == "instance":
    # One group per channel == instance norm with a learned affine, as the
    # DC/DM ConvNet (GroupNorm(C, C)) does.
    return nnx.GroupNorm(features, num_groups=features, epsilon=1e-5, rngs=rngs)
  if kind == "batch":
    return nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
  if kind == "layer":
    return nnx.LayerNorm(features, rngs=rngs)
  if kind == "none":
    return lambda x: x
  raise ValueError(f"Unknown norm {kind!r}; expected one of {NORMS}.")


def _pool(kind: str, x: jax.Array) -> jax.Array:
  if kind == "avg":
    return nnx.avg_pool(x, (2, 2), strides=(2, 2))
  if kind == "max":
    return nnx.max_pool(x, (2, 2), strides=(2, 2))
  raise ValueError(f"Unknown pool {kind!r}; expected one of {POOLS}.")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


class ConvNet(nnx.Module):
  """Dataset-distillation ConvNet: depth x [conv3x3, norm, ReLU, pool], dense.

  Args:
    in_channels: input channels C.
    num_classes: number of logits K.
    image_size: input height/width (int or (H, W)); fixes the dense layer's
      input size, since NNX builds parameters eagerly.
    width: channels of every conv layer.
    depth: number of conv blocks; each halves the spatial size (floor).
    norm: "instance" (DC/DM baselines), "batch", "layer" or "none".
    pool: "avg" (DC/DM baselines) or "max" (the DSV paper's ConvNet).
    rngs: NNX random streams for initialisation.
  """

  def __init__(
    self,
    in_channels: int,
    num_classes: int,
    *,
    image_size: int | Sequence[int] = 32,
    width: int = 128,
    depth: int = 3,
    norm: str = "instance",
    pool: str = "avg",
    rngs: nnx.Rngs,
  ):
    if depth < 1:
      raise ValueError(f"ConvNet depth must be >= 1, got {depth}.")
    if pool not in POOLS:
      raise ValueError(f"Unknown pool {pool!r}; expected one of {POOLS}.")
    h, w = _pair(image_size)
    convs, norms = [], []
    channels = in_channels
    for _ in range(depth):
      convs.append(nnx.Conv(channels, width, (3, 3), rngs=rngs))
      norms.append(_norm(norm, width, rngs=rngs))
      channels = width
      h, w = h // 2, w // 2
    if h < 1 or w < 1:
      raise ValueError(
        f"ConvNet depth {depth} pools image_size {image_size} down to "
        f"nothing; use a smaller depth."
      )
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.pool = pool
    self.head = nnx.Linear(h * w * width, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Penultimate features ``[B, F]``: the dense head's input."""
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = _pool(self.pool, jax.nn.relu(norm(conv(x))))
    return x.reshape(x.shape[0], -1)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


class MLP(nnx.Module):
  """Flatten -> [dense, ReLU] x len(hidden) -> dense."""

  def __init__(
    self,
    in_features: int,
    num_classes: int,
    *,
    hidden: Sequence[int] = (256, 256),
    rngs: nnx.Rngs,
  ):
    sizes = (in_features, *hidden)
    pairs = zip(sizes[:-1], sizes[1:], strict=True)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Penultimate features ``[B, F]``: the dense head's input."""
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


class _BasicBlock(nnx.Module):
  """ResNet basic block: two 3x3 convs with a projection shortcut if needed."""

  def __init__(self, cin: int, cout: int, stride: int, norm: str, rngs):
    self.conv1 = nnx.Conv(
      cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs
    )
    self.norm1 = _norm(norm, cout, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = _norm(norm, cout, rngs=rngs)
    if stride != 1 or cin != cout:
      self.short_conv = nnx.Conv(
        cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs
      )
      self.short_norm = _norm(norm, cout, rngs=rngs)
    else:
      self.short_conv = None
      self.short_norm = None

  def __call__(self, x):
    y = jax.nn.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    if self.short_conv is not None:
      x = self.short_norm(self.short_conv(x))
    return jax.nn.relu(x + y)


class ResNet18(nnx.Module):
  """CIFAR-style ResNet-18: 3x3 stem, 4 stages of 2 basic blocks, GAP, dense.

  Args:
    in_channels: input channels C.
    num_classes: number of logits K.
    width: channels of the first stage (doubled at each later stage).
    norm: "batch" (standard), "instance", "layer" or "none".
    rngs: NNX random streams for initialisation.
  """

  def __init__(
    self,
    in_channels: int,
    num_classes: int,
    *,
    width: int = 64,
    norm: str = "batch",
    rngs: nnx.Rngs,
  ):
    self.stem = nnx.Conv(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
    self.stem_norm = _norm(norm, width, rngs=rngs)
    blocks, cin = [], width
    for stage in range(4):
      cout = width * 2**stage
      for i in range(2):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(_BasicBlock(cin, cout, stride, norm, rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Penultimate features ``[B, F]``: globally pooled, the head's input."""
    x = jax.nn.relu(self.stem_norm(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return x.mean(axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


MODELS = ("convnet", "resnet18", "resnet50", "mlp")


def build_model(
  name: str,
  *,
  image_shape: Sequence[int],
  num_classes: int,
  key: jax.Array,
  **kwargs: Any,
) -> nnx.Module:
  """Builds one of `MODELS` for images of `image_shape` (H, W, C).

  Extra keyword arguments go to the model's constructor (e.g. `width`,
  `depth`, `norm`, `pool` for the ConvNet; `hidden` for the MLP). Unknown
  ones raise a `TypeError` naming them.
  """
  h, w, c = image_shape
  rngs = nnx.Rngs(params=key)
  if name == "convnet":
    return ConvNet(c, num_classes, image_size=(h, w), rngs=rngs, **kwargs)
  if name == "resnet18":
    return ResNet18(c, num_classes, rngs=rngs, **kwargs)
  if name == "resnet50":
    # torchvision's layout, for pretrained weights (dsv_jax.torch_convert).
    from dsv_jax.resnet import ResNet50

    return ResNet50(c, num_classes, rngs=rngs, **kwargs)
  if name == "mlp":
    return MLP(h * w * c, num_classes, rngs=rngs, **kwargs)
  raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")


class FunctionalModel(NamedTuple):
  """A Flax NNX model split into pure functions over plain dicts.

  Attributes:
    params: trainable parameters, a nested dict of arrays.
    state: everything else (BatchNorm statistics), a nested dict of arrays.
    train_apply: `(params, state, x) -> (logits, new_state)` in training
      mode (batch statistics from the batch, running averages updated).
    eval_apply: `(params, state, x) -> logits` in evaluation mode.
    graph: hashable identity of the architecture (the NNX graph
      definitions): equal for two models that differ only in their values
      (e.g. their init seed), so compiled functions can be reused.
    eval_features: `(params, state, x) -> features [B, F]` in evaluation
      mode, the penultimate layer (the model's `features` method), or None
      when the model has none.
  """

  params: Params
  state: PyTree
  train_apply: Callable[[Params, PyTree, jax.Array], tuple[jax.Array, PyTree]]
  eval_apply: Callable[[Params, PyTree, jax.Array], jax.Array]
  graph: Any = None
  eval_features: Callable[[Params, PyTree, jax.Array], jax.Array] | None = None


def functional(model: nnx.Module, *, wrt=nnx.Param) -> FunctionalModel:
  """Splits an NNX model into pure train/eval functions over plain dicts.

  The NNX graph definition differs between train and eval mode (BatchNorm's
  `use_running_average` is static), so both are captured here once. The
  model object itself is left in evaluation mode.
  """
  model.train()
  train_def, params, state = nnx.split(model, wrt, ...)
  model.eval()
  eval_def, _, _ = nnx.split(model, wrt, ...)

  def train_apply(p, s, x):
    m = nnx.merge(train_def, p, s)
    logits = m(x)
    return logits, nnx.to_pure_dict(nnx.split(m, wrt, ...)[2])

  def eval_apply(p, s, x):
    return nnx.merge(eval_def, p, s)(x)

  def eval_features(p, s, x):
    return nnx.merge(eval_def, p, s).features(x)

  return FunctionalModel(
    nnx.to_pure_dict(params),
    nnx.to_pure_dict(state),
    train_apply,
    eval_apply,
    graph=(train_def, eval_def),
    eval_features=eval_features if hasattr(model, "features") else None,
  )


def nnx_apply_fn(model: nnx.Module, *, wrt=nnx.Param) -> tuple[ApplyFn, Params]:
  """Turns an NNX model into `(apply_fn, params)` in evaluation mode.

  Args:
    model: any NNX module mapping images [B, H, W, C] to logits [B, K].
    wrt: the filter selecting the differentiable parameters (default all
      `nnx.Param`s). Everything else (batch statistics, parameters not
      selected) is closed over as constants.

  Returns:
    `apply_fn(params, x) -> logits` and `params`, a nested dict of arrays.
  """
  fm = functional(model, wrt=wrt)
  state = fm.state
  return (lambda p, x: fm.eval_apply(p, state, x)), fm.params


def linen_apply_fn(
  module: Any,
  variables: PyTree,
  *,
  logits_fn: Callable[[Any], jax.Array] | None = None,
  **apply_kw: Any,
) -> tuple[ApplyFn, Params]:
  """Turns a Linen module and its variables into `(apply_fn, params)`.

  Args:
    module: a `flax.linen.Module`.
    variables: its variables, e.g. `{"params": ..., "batch_stats": ...}`.
    logits_fn: maps the module's output to logits [B, K] (e.g.
      `lambda out: out[0]` for models returning `(logits, extras)`).
    **apply_kw: extra keyword arguments for `module.apply` that select
      evaluation mode (e.g. `train=False`).

  Returns:
    `apply_fn(params, x) -> logits` differentiable in `variables["params"]`,
    with every other collection closed over, and that `params`.
  """
  if "params" not in variables:
    raise ValueError(
      "linen_apply_fn: `variables` has no 'params' collection; got "
      f"collections {sorted(variables)}."
    )
  frozen = {k: v for k, v in variables.items() if k != "params"}

  def apply_fn(params, x):
    out = module.apply({"params": params, **frozen}, x, **apply_kw)
    return out if logits_fn is None else logits_fn(out)

  return apply_fn, variables["params"]


@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn: ApplyFn, params: Params, x: jax.Array) -> jax.Array:
  return apply_fn(params, x)


def predict(
  apply_fn: ApplyFn,
  params: Params,
  images: jax.typing.ArrayLike,
  *,
  batch_size: int = 512,
) -> np.ndarray:
  """Logits ``[N, C]`` of ``images`` ``[N, H, W, C]``, as a numpy array.

  One jitted forward pass per batch of ``batch_size`` images (fewer images
  are padded to the next power of two), so a classifier compiles a handful
  of programs for any numbers of images; an un-jitted ``apply_fn`` call
  runs op by op, and a jitted one compiles again for every new N.
  ``params`` is an argument of the program, never a constant of it.
  """
  images = np.asarray(images)
  n = len(images)
  if n == 0:
    raise ValueError("predict needs at least one image, got none.")
  size = min(batch_size, 1 << (n - 1).bit_length())
  out = []
  for (x,), real in padded_batches([images], size):
    out.append(np.asarray(_logits(apply_fn, params, x))[:real])
  return np.concatenate(out)


def num_params(params: Params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(jnp.size(p)) for p in jax.tree.leaves(params))


__all__ = [
  "MODELS",
  "ConvNet",
  "FunctionalModel",
  "MLP",
  "ResNet18",
  "build_model",
  "functional",
  "linen_apply_fn",
  "nnx_apply_fn",
  "num_params",
  "predict",
]
