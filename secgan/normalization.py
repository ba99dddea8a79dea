"""The one intensity normalisation of SECGAN, shared by training and transfer.

Volumes are uint8 (0..255). The generators read and write the **unit space** ``u = raw / 127.5 - 1``
(0 -> -1, 255 -> +1: the range of their tanh output). Transfer writes ``F(U)`` back as
``raw = clip(round((u + 1) * 127.5), 0, 255)`` in uint8, so that a transferred volume is read by
the FFN exactly like an original one: the frozen FFN (its image channel ``(raw - image_mean) /
image_stddev``, google's fib25 model: 128 and 33) sees ``((u + 1) * 127.5 - image_mean) /
image_stddev`` both in training (D_S) and when it segments the transferred volume.
"""

from __future__ import annotations

import numpy as np

from ffn.errors import FFNError
from ffn.io.volumes import check_dtype

SCALE = 127.5  # uint8 value per unit-space unit


def to_unit(raw: np.ndarray) -> np.ndarray:
  """uint8 voxels -> float32 unit space in [-1, 1]."""
  return np.asarray(raw, np.float32) / np.float32(SCALE) - np.float32(1.0)


def from_unit(unit: np.ndarray) -> np.ndarray:
  """Unit space -> uint8 (rounded to nearest, clipped to 0..255)."""
  return np.clip(np.rint((np.asarray(unit, np.float32) + 1.0) * SCALE), 0, 255).astype(np.uint8)


def unit_to_ffn(unit, image_mean: float, image_stddev: float):
  """Unit space (numpy or tf tensor) -> the FFN's normalised image channel."""
  return ((unit + 1.0) * SCALE - image_mean) / image_stddev


def check_volume_dtype(where: str, dtype) -> None:
  """SECGAN reads uint8 volumes only (the unit space is defined on 0..255)."""
  check_dtype(where, dtype, "u")
  if np.dtype(dtype).itemsize != 1:
    raise FFNError(f"{where}: dtype {np.dtype(dtype).name}: SECGAN expects uint8 intensities (0..255)")
