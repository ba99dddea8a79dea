"""The 3D convolution-stack FFN of Januszewski et al. (google/ffn ``convstack_3d.ConvStack3DFFNModel``).

Built from plain ``tf.Variable`` objects inside a ``tf.Module`` (no Keras layers), so it runs under
any ``tf.distribute`` strategy and its variables map one to one onto google's TF1 checkpoints.

Architecture (all convolutions 'SAME', stride 1, ``features`` channels, 3x3x3 kernels):

* ``conv0_a`` (+relu), ``conv0_b`` (no activation);
* for i = 1..depth-1 a residual block: relu, ``conv{i}_a`` (+relu), ``conv{i}_b`` (no activation),
  add the block input;
* relu, 1x1x1 ``conv_lom`` to one channel: the logit update;
* output logits = seed logits (input channel 1) + update.

Tensors are [batch, z, y, x, channels]; kernels are (z, y, x, in, out). ``fov_size`` and ``deltas``
are given in x,y,z order, as in google's ``model_args``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from ffn.axes import parse_xyz, xyz_to_zyx
from ffn.errors import FFNError

# The TF1 variable scope that google's checkpoints use for every weight of this model.
SCOPE = "seed_update"

# dtypes the convolutions can run in (``compute_dtype`` of ``__call__``).
COMPUTE_DTYPES = (tf.float32, tf.bfloat16, tf.float16)


class _Conv(tf.Module):
  """One convolution: ``weights`` (z, y, x, in, out) and ``biases`` (out,)."""

  def __init__(self, name: str, kernel_zyx: Sequence[int], n_in: int, n_out: int,
               rng: np.random.Generator):
    super().__init__(name=name)
    shape = tuple(kernel_zyx) + (n_in, n_out)
    # Glorot-uniform initialisation (the default of TF1's contrib conv3d that google trained with).
    fan_in = int(np.prod(kernel_zyx)) * n_in
    fan_out = int(np.prod(kernel_zyx)) * n_out
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    init = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    self.weights = tf.Variable(init, name=f"{SCOPE}/{name}/weights")
    self.biases = tf.Variable(np.zeros((n_out,), np.float32), name=f"{SCOPE}/{name}/biases")

  def __call__(self, x: tf.Tensor) -> tf.Tensor:
    """float32 convolution plus bias of x [b, z, y, x, in] float32 -> [b, z, y, x, out]."""
    y = tf.nn.conv3d(x, self.weights, strides=[1, 1, 1, 1, 1], padding="SAME")
    return tf.nn.bias_add(y, self.biases)


class ConvStack3DFFNModel(tf.Module):
  """google/ffn's ConvStack3DFFNModel.

  Args:
    fov_size: field of view (x, y, z) in voxels; the input and output patch size.
    deltas: FOV movement step (x, y, z) in voxels, used by training and inference.
    depth: number of conv pairs (1 plain + depth-1 residual); google's default is 9, fib25 uses 12.
    features: channels of every hidden convolution (google: 32).
    seed: seed of the initial weights (ignored when weights are loaded from a checkpoint).
  """

  def __init__(self, fov_size: Sequence[int] = (33, 33, 33), deltas: Sequence[int] = (8, 8, 8),
               depth: int = 9, features: int = 32, seed: int = 0):
    super().__init__(name="ConvStack3DFFNModel")
    if int(depth) < 1:
      raise FFNError(f"model_args: depth must be >= 1, got {depth}")
    if int(features) < 1:
      raise FFNError(f"model_args: features must be >= 1, got {features}")
    self.fov_size = parse_xyz(fov_size, "model_args fov_size")
    self.deltas = parse_xyz(deltas, "model_args deltas")
    if min(self.fov_size) < 1 or min(self.deltas) < 0:
      raise FFNError(f"model_args: fov_size must be positive and deltas >= 0, got "
                     f"fov_size={list(self.fov_size)} deltas={list(self.deltas)}")
    self.depth = int(depth)
    self.features = int(features)
    rng = np.random.default_rng(seed)
    k = (3, 3, 3)
    convs = {"conv0_a": _Conv("conv0_a", k, 2, features, rng),
             "conv0_b": _Conv("conv0_b", k, features, features, rng)}
    for i in range(1, self.depth):
      convs[f"conv{i}_a"] = _Conv(f"conv{i}_a", k, features, features, rng)
      convs[f"conv{i}_b"] = _Conv(f"conv{i}_b", k, features, features, rng)
    convs["conv_lom"] = _Conv("conv_lom", (1, 1, 1), features, 1, rng)
    self.convs = convs
    # Convolutions kept in float32 whatever the compute_dtype, and the compute dtypes whose
    # convolutions use two-term weights (see __call__ and weight_terms).
    self.float32_convs: tuple[str, ...] = ("conv0_a", "conv_lom")
    self.split_weight_dtypes: tuple[tf.DType, ...] = (tf.bfloat16,)

  @property
  def input_shape_zyx(self) -> tuple[int, int, int]:
    """Spatial input/output shape (z, y, x)."""
    return xyz_to_zyx(self.fov_size)  # type: ignore[return-value]

  def named_variables(self) -> dict[str, tf.Variable]:
    """{google TF1 name (e.g. 'seed_update/conv0_a/weights'): variable}, in layer order."""
    out: dict[str, tf.Variable] = {}
    for name, conv in self.convs.items():
      out[f"{SCOPE}/{name}/weights"] = conv.weights
      out[f"{SCOPE}/{name}/biases"] = conv.biases
    return out

  @staticmethod
  def tf2_checkpoint_key(name: str, root: str = "model") -> str:
    """Key of TF1 variable ``name`` in a TF2 checkpoint that tracks this module as ``root``."""
    return f"{root}/convs/{name[len(SCOPE) + 1:]}/.ATTRIBUTES/VARIABLE_VALUE"

  def conv_dtype(self, name: str, compute_dtype: tf.DType) -> tf.DType:
    """The dtype convolution ``name`` multiplies in when the model runs in ``compute_dtype``."""
    return tf.float32 if name in self.float32_convs else compute_dtype

  def weight_terms(self, name: str, compute_dtype: tf.DType) -> list[tf.Tensor]:
    """The weights of convolution ``name`` as terms in its ``conv_dtype``, summing to them.

    float32 and float16: the weights themselves (float16 rounds them by at most 2^-11). bfloat16:
    ``hi`` = the weights rounded to bfloat16 and ``lo`` = the rest rounded to bfloat16, so that
    ``hi + lo`` is within 2^-16 (relative) of the float32 weights instead of 2^-8.
    """
    dtype = self.conv_dtype(name, compute_dtype)
    w = self.convs[name].weights
    if dtype not in self.split_weight_dtypes:
      return [tf.cast(w, dtype)]
    hi = tf.cast(w, dtype)
    return [hi, tf.cast(w - tf.cast(hi, tf.float32), dtype)]

  def __call__(self, x: tf.Tensor, compute_dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Logits [b, z, y, x, 1] float32 for input [b, z, y, x, 2] float32.

    Channel 0 of ``x`` is the normalised image, channel 1 the seed logits. With ``compute_dtype``
    bfloat16 or float16 only the multiplications of the hidden convolutions run in that dtype:
    each casts its input down, convolves it with each of its ``weight_terms`` (bfloat16: two
    terms, so the weights keep 16 bits, not 8), casts each output back to float32 and adds the
    float32 bias; the first and the last convolution (``float32_convs``), the residual stream,
    the ReLUs and the seed addition stay float32. The first convolution sees the raw image and
    the seed (rounding them to bfloat16's 8 bits moves every later layer) and the last one writes
    the logits themselves (bfloat16 would round a logit of 6 by up to 0.016); both cost ~1% of
    the multiplications. Rounding the weights to bfloat16 is a fixed, systematic change of the
    network (it moves every logit the same way every call), unlike the rounding of activations;
    the two-term weights remove it. See benchmarks/README.md for the measurements and the
    variants tried. float16 (10 mantissa bits, range +-65504) is closer to float32 than
    bfloat16 but is meant for inference on GPUs; training in float16 would need loss scaling,
    which the trainer does not do.
    """
    if compute_dtype not in COMPUTE_DTYPES:
      raise FFNError(f"compute_dtype must be one of {', '.join(d.name for d in COMPUTE_DTYPES)}, "
                     f"got {compute_dtype!r}")

    def conv(name: str, net: tf.Tensor) -> tf.Tensor:
      layer = self.convs[name]
      dtype = self.conv_dtype(name, compute_dtype)
      if dtype == tf.float32:
        return layer(net)
      low = tf.cast(net, dtype)
      terms = [tf.cast(tf.nn.conv3d(low, w, strides=[1] * 5, padding="SAME"), tf.float32)
               for w in self.weight_terms(name, compute_dtype)]
      return tf.add_n(terms) + layer.biases

    seed = x[..., 1:2]
    net = tf.nn.relu(conv("conv0_a", x))
    net = conv("conv0_b", net)
    for i in range(1, self.depth):
      block_in = net
      net = tf.nn.relu(net)
      net = tf.nn.relu(conv(f"conv{i}_a", net))
      net = conv(f"conv{i}_b", net)
      net = net + block_in
    net = tf.nn.relu(net)
    return seed + conv("conv_lom", net)
