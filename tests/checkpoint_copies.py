"""Checkpoints that truly differ, for sweep tests and benchmarks: copies of a TF1 (google/ffn)
checkpoint with Gaussian noise added to its weights.

They are written with TensorFlow's ``SaveV2`` op under the variables' TF1 names
(``seed_update/conv0_a/weights`` ...), which :func:`ffn.models.load` reads like google's files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_tf1_checkpoint(prefix: str | os.PathLike, tensors: dict[str, np.ndarray]) -> str:
  """Writes ``tensors`` (TF1 variable name -> array) as the checkpoint ``prefix``
  (``prefix.index`` + ``prefix.data-00000-of-00001``); returns the prefix."""
  import tensorflow as tf
  prefix = str(prefix)
  Path(prefix).parent.mkdir(parents=True, exist_ok=True)
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return prefix


def perturbed_copy(source: str | os.PathLike, prefix: str | os.PathLike, sigma: float,
                   seed: int = 0) -> str:
  """A copy of the TF1 checkpoint ``source`` whose float weights ``w`` (every variable except
  the global step) become ``w + sigma * std(w) * N(0, 1)`` (numpy ``default_rng(seed)``)."""
  import tensorflow as tf
  reader = tf.train.load_checkpoint(str(source))
  rng = np.random.default_rng(seed)
  tensors = {}
  for name in sorted(reader.get_variable_to_shape_map()):
    value = reader.get_tensor(name)
    if value.dtype.kind == "f" and value.size > 1:
      value = (value + sigma * float(np.std(value)) * rng.standard_normal(value.shape)).astype(
          value.dtype)
    tensors[name] = value
  return write_tf1_checkpoint(prefix, tensors)

