"""ResNet-50 in Flax NNX with torchvision's layout, for pretrained weights.

The architecture is torchvision's `resnet50` (ResNet v1.5: the stride of
a bottleneck sits on its 3x3 convolution), layer for layer and with the
same attribute names (`conv1`, `bn1`, `layer1`..`layer4`, `fc`; in each
block `conv1..3`, `bn1..3`, `downsample_conv`/`downsample_bn`), so
`dsv_jax.torch_convert` maps a torchvision ``state_dict`` onto it one
tensor at a time. Padding is explicit, as in PyTorch (Flax's "SAME" pads
a strided convolution asymmetrically). Images are NHWC in the package's
normalised space (`dsv_jax.data.imagenet.imagenet_info`).

BatchNorm runs on its running statistics in evaluation mode
(`models.functional(...).eval_apply`), which is the mode DSV uses: the
statistics are model state, not `nnx.Param`, so they are not part of theta
and the stationarity condition never differentiates them.
"""

from typing import NamedTuple

import jax
from flax import nnx

# Blocks per stage and bottleneck widths of ResNet-50.
STAGES = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
# torchvision's BatchNorm2d defaults (eps 1e-5; PyTorch momentum 0.1 is
# Flax momentum 0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


class Block(NamedTuple):
  """One bottleneck of the plan: where it sits and what it maps."""

  stage: int  # 0..3: attribute `layer{stage + 1}`.
  index: int  # Position in its stage.
  cin: int
  width: int
  stride: int
  downsample: bool  # A projection shortcut (stride or width changes).


def blocks() -> list[Block]:
  """ResNet-50's bottlenecks in order: the one plan the model and the
  torchvision converter (`torch_convert`) both follow."""
  out, cin = [], 64
  for i, (num, width) in enumerate(zip(STAGES, WIDTHS, strict=True)):
    for b in range(num):
      stride = 2 if (i > 0 and b == 0) else 1
      cout = width * EXPANSION
      out.append(Block(i, b, cin, width, stride, stride != 1 or cin != cout))
      cin = cout
  return out


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(
    features, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs
  )


def _conv(cin, cout, size, stride, rngs) -> nnx.Conv:
  pad = size // 2
  return nnx.Conv(
    cin,
    cout,
    (size, size),
    strides=stride,
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    rngs=rngs,
  )


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convolutions with a residual connection."""

  def __init__(self, block: Block, *, rngs: nnx.Rngs):
    cin, width, stride = block.cin, block.width, block.stride
    cout = width * EXPANSION
    self.conv1 = _conv(cin, width, 1, 1, rngs)
    self.bn1 = _bn(width, rngs)
    self.conv2 = _conv(width, width, 3, stride, rngs)
    self.bn2 = _bn(width, rngs)
    self.conv3 = _conv(width, cout, 1, 1, rngs)
    self.bn3 = _bn(cout, rngs)
    if block.downsample:
      self.downsample_conv = _conv(cin, cout, 1, stride, rngs)
      self.downsample_bn = _bn(cout, rngs)
    else:
      self.downsample_conv = None
      self.downsample_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.downsample_conv is not None:
      x = self.downsample_bn(self.downsample_conv(x))
    return jax.nn.relu(x + y)


class ResNet50(nnx.Module):
  """torchvision's ResNet-50: 7x7 stem, max-pool, 3-4-6-3 bottlenecks, GAP.

  Args:
    in_channels: input channels (3 for ImageNet).
    num_classes: number of logits (1000 for ImageNet).
    rngs: NNX random streams for initialisation.
  """

  def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(
      in_channels,
      64,
      (7, 7),
      strides=2,
      padding=((3, 3), (3, 3)),
      use_bias=False,
      rngs=rngs,
    )
    self.bn1 = _bn(64, rngs)
    plan = blocks()
    for i in range(len(STAGES)):
      layer = [Bottleneck(b, rngs=rngs) for b in plan if b.stage == i]
      setattr(self, f"layer{i + 1}", nnx.List(layer))
    self.fc = nnx.Linear(WIDTHS[-1] * EXPANSION, num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """Penultimate features ``[B, 2048]``: globally pooled, the head's input."""
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i in range(len(STAGES)):
      for block in getattr(self, f"layer{i + 1}"):
        x = block(x)
    return x.mean(axis=(1, 2))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc(self.features(x))


__all__ = ["Block", "Bottleneck", "ResNet50", "blocks"]
