"""SECGAN networks as ``tf.Module``s of plain ``tf.Variable``s (no Keras), like :mod:`ffn.models`.

Tensors are [batch, z, y, x, channels] float32; kernels (z, y, x, in, out). Every variable has a
unique name (``<network>/<layer>/weights``) because :class:`ffn.training.optimizer.Optimizer`
keys its slots by variable name.

* :class:`Generator` (G: labeled -> unlabeled, F: unlabeled -> labeled; Januszewski & Jain 2019):
  ``conv0_a`` (+relu), ``conv0_b``, then ``depth - 1`` residual modules (relu, ``conv{i}_a``,
  relu, ``conv{i}_b``, plus the module input centre-cropped by 2 voxels per side), relu, and a
  1^3 convolution to one channel with tanh. All 3^3 convolutions are VALID with ``channels``
  feature maps, so the output is :attr:`Generator.margin` = ``2 * depth`` voxels smaller than the
  input on every side. Values are in the unit intensity space of :mod:`secgan.normalization`.
* :class:`ResNetDiscriminator` (D_l, D_u, D_S): ResNet-18-style: a 7^3 stride-2 convolution, then
  stages of two basic residual blocks (3^3 SAME convolutions, instance norm, relu; every stage
  after the first starts with stride 2 and a 1^3 strided projection shortcut). As in the paper, no
  global pooling and no classification layer: a 1^3 convolution maps the last residual module's
  output to one channel, a patch of scores [b, z', y', x', 1].
* :class:`ConvDiscriminator`: the plain option: ``depth`` 3^3 stride-2 SAME convolutions with
  instance norm and leaky relu, channels doubling from ``channels``, then the same 1^3 scores.

``compute_dtype`` (tf.float32 or tf.bfloat16) is the dtype of the convolutions only: their input
and weights are cast down and the result back to float32; biases, norms, activations and the
residual stream stay float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from ffn.errors import FFNError

DISCRIMINATORS = ("resnet", "conv")
INSTANCE_NORM_EPSILON = 1e-5


class Conv3D(tf.Module):
  """One 3D convolution with bias; Glorot-uniform weights from ``rng``."""

  def __init__(self, name: str, kernel: int, n_in: int, n_out: int, rng: np.random.Generator,
               stride: int = 1, padding: str = "VALID"):
    super().__init__(name=name.replace("/", "_"))
    shape = (kernel, kernel, kernel, n_in, n_out)
    fan_in, fan_out = kernel ** 3 * n_in, kernel ** 3 * n_out
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    self.weights = tf.Variable(rng.uniform(-limit, limit, size=shape).astype(np.float32),
                               name=f"{name}/weights")
    self.biases = tf.Variable(np.zeros((n_out,), np.float32), name=f"{name}/biases")
    self.stride, self.padding = int(stride), padding

  def __call__(self, x: tf.Tensor, compute_dtype: tf.DType = tf.float32) -> tf.Tensor:
    s = self.stride
    w = self.weights
    if compute_dtype != tf.float32:
      x, w = tf.cast(x, compute_dtype), tf.cast(w, compute_dtype)
    y = tf.nn.conv3d(x, w, strides=[1, s, s, s, 1], padding=self.padding)
    return tf.nn.bias_add(tf.cast(y, tf.float32), self.biases)


class InstanceNorm(tf.Module):
  """Per example and channel: (x - mean) / sqrt(var + 1e-5) over z,y,x, then scale and offset."""

  def __init__(self, name: str, channels: int):
    super().__init__(name=name.replace("/", "_"))
    self.scale = tf.Variable(np.ones((channels,), np.float32), name=f"{name}/scale")
    self.offset = tf.Variable(np.zeros((channels,), np.float32), name=f"{name}/offset")

  def __call__(self, x: tf.Tensor) -> tf.Tensor:
    mean, var = tf.nn.moments(x, axes=[1, 2, 3], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + INSTANCE_NORM_EPSILON) * self.scale + self.offset


def center_crop(x: tf.Tensor, margin: int) -> tf.Tensor:
  """Removes ``margin`` voxels from each side of z, y and x of [b, z, y, x, c]."""
  if margin == 0:
    return x
  m = int(margin)
  return x[:, m:-m, m:-m, m:-m, :]


class Generator(tf.Module):
  """The SECGAN generator (module docstring). ``name``: "G" or "F" (variable name prefix)."""

  def __init__(self, name: str, depth: int = 8, channels: int = 32, seed: int = 0):
    super().__init__(name=name)
    if int(depth) < 1 or int(channels) < 1:
      raise FFNError(f"generator depth and channels must be >= 1, got {depth}, {channels}")
    self.depth, self.channels = int(depth), int(channels)
    rng = np.random.default_rng(seed)
    c = self.channels
    self.convs = [Conv3D(f"{name}/conv0_a", 3, 1, c, rng), Conv3D(f"{name}/conv0_b", 3, c, c, rng)]
    for i in range(1, self.depth):
      self.convs += [Conv3D(f"{name}/conv{i}_a", 3, c, c, rng),
                     Conv3D(f"{name}/conv{i}_b", 3, c, c, rng)]
    self.out = Conv3D(f"{name}/conv_out", 1, c, 1, rng)

  @property
  def margin(self) -> int:
    """Voxels lost on each side of every spatial axis (2 per residual module)."""
    return 2 * self.depth

  def __call__(self, x: tf.Tensor, compute_dtype: tf.DType = tf.float32) -> tf.Tensor:
    """[b, z, y, x, 1] -> [b, z - 2 margin, y - 2 margin, x - 2 margin, 1] in (-1, 1)."""
    net = tf.nn.relu(self.convs[0](x, compute_dtype))
    net = self.convs[1](net, compute_dtype)
    for i in range(1, self.depth):
      skip = center_crop(net, 2)
      net = tf.nn.relu(self.convs[2 * i](tf.nn.relu(net), compute_dtype))
      net = self.convs[2 * i + 1](net, compute_dtype) + skip
    return tf.tanh(self.out(tf.nn.relu(net), compute_dtype))


class ResNetDiscriminator(tf.Module):
  """ResNet-18-style patch discriminator (module docstring).

  ``channels``: of the first stage (ResNet-18: 64); each further stage doubles them.
  ``stages``: residual stages of two blocks each (ResNet-18: 4).
  """

  def __init__(self, name: str, n_in: int = 1, channels: int = 64, stages: int = 4, seed: int = 0):
    super().__init__(name=name)
    if int(channels) < 1 or int(stages) < 1:
      raise FFNError(f"discriminator channels and depth must be >= 1, got {channels}, {stages}")
    rng = np.random.default_rng(seed)
    c = int(channels)
    self.stem = Conv3D(f"{name}/conv1", 7, n_in, c, rng, stride=2, padding="SAME")
    self.stem_norm = InstanceNorm(f"{name}/conv1_norm", c)
    self.blocks = []
    n_prev = c
    for stage in range(int(stages)):
      n = c * 2 ** stage
      for sub in (1, 2):
        prefix = f"{name}/stage{stage + 1}_{sub}"
        stride = 2 if stage > 0 and sub == 1 else 1
        block = {
            "conv1": Conv3D(f"{prefix}/conv1", 3, n_prev, n, rng, stride=stride, padding="SAME"),
            "norm1": InstanceNorm(f"{prefix}/norm1", n),
            "conv2": Conv3D(f"{prefix}/conv2", 3, n, n, rng, padding="SAME"),
            "norm2": InstanceNorm(f"{prefix}/norm2", n),
        }
        if stride != 1 or n_prev != n:
          block["shortcut"] = Conv3D(f"{prefix}/shortcut", 1, n_prev, n, rng, stride=stride,
                                     padding="SAME")
        self.blocks.append(block)
        n_prev = n
    self.scores = Conv3D(f"{name}/scores", 1, n_prev, 1, rng)

  def __call__(self, x: tf.Tensor, compute_dtype: tf.DType = tf.float32) -> tf.Tensor:
    net = tf.nn.relu(self.stem_norm(self.stem(x, compute_dtype)))
    for block in self.blocks:
      shortcut = block["shortcut"](net, compute_dtype) if "shortcut" in block else net
      out = tf.nn.relu(block["norm1"](block["conv1"](net, compute_dtype)))
      out = block["norm2"](block["conv2"](out, compute_dtype))
      net = tf.nn.relu(out + shortcut)
    return self.scores(net, compute_dtype)


class ConvDiscriminator(tf.Module):
  """Plain convolutional patch discriminator (module docstring)."""

  def __init__(self, name: str, n_in: int = 1, channels: int = 64, depth: int = 3, seed: int = 0):
    super().__init__(name=name)
    if int(channels) < 1 or int(depth) < 1:
      raise FFNError(f"discriminator channels and depth must be >= 1, got {channels}, {depth}")
    rng = np.random.default_rng(seed)
    self.convs, self.norms = [], []
    n_prev = n_in
    for d in range(int(depth)):
      n = int(channels) * 2 ** d
      self.convs.append(Conv3D(f"{name}/conv{d}", 3, n_prev, n, rng, stride=2, padding="SAME"))
      self.norms.append(InstanceNorm(f"{name}/norm{d}", n))
      n_prev = n
    self.scores = Conv3D(f"{name}/scores", 1, n_prev, 1, rng)

  def __call__(self, x: tf.Tensor, compute_dtype: tf.DType = tf.float32) -> tf.Tensor:
    net = x
    for conv, norm in zip(self.convs, self.norms):
      net = tf.nn.leaky_relu(norm(conv(net, compute_dtype)), alpha=0.2)
    return self.scores(net, compute_dtype)


def make_discriminator(kind: str, name: str, channels: int, depth: int, seed: int) -> tf.Module:
  """``kind`` "resnet" (``depth`` = stages) or "conv" (``depth`` = convolutions)."""
  if kind == "resnet":
    return ResNetDiscriminator(name, 1, channels, depth, seed)
  if kind == "conv":
    return ConvDiscriminator(name, 1, channels, depth, seed)
  raise FFNError(f"--discriminator {kind!r}: expected one of {', '.join(DISCRIMINATORS)}")


def variables_of(module: tf.Module) -> list[tf.Variable]:
  """The module's trainable variables in a stable order (by name)."""
  return sorted(module.trainable_variables, key=lambda v: v.name)


def check_crop(size_zyx: Sequence[int], margin: int, what: str) -> None:
  """Raises FFNError unless a crop of ``size_zyx`` leaves at least one voxel after ``margin``."""
  if min(size_zyx) - 2 * margin < 1:
    raise FFNError(f"{what}: size {list(size_zyx)} (z,y,x) is too small for the generators' "
                   f"margin of {margin} voxels per side")
