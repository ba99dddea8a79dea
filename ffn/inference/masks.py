"""Exclusion masks from ``MaskConfig`` protos (image and volume sources).

A channel mask is ``min_value <= v <= max_value`` or ``v in values`` (if given), optionally inverted;
a MaskConfig ORs its channel masks and may invert the result; several MaskConfigs are ORed. Image
masks test the **raw** image values (before normalisation). Volume masks read the same box of
another HDF5 volume (3D, single channel 0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ffn.errors import FFNError
from ffn.io.volumes import Volume


def _channel_mask(values: np.ndarray, config) -> np.ndarray:
  if config.values:
    out = np.isin(values, np.array(list(config.values)))
  else:
    out = (values >= config.min_value) & (values <= config.max_value)
  return ~out if config.invert else out


def build_mask(configs: Sequence, raw_image: np.ndarray, field: str,
               corner_zyx: Sequence[int] = (0, 0, 0)) -> np.ndarray | None:
  """Boolean z,y,x mask (True = excluded) for ``raw_image``'s box, or None if no configs."""
  final = None
  for i, config in enumerate(configs):
    source = config.WhichOneof("source")
    current = np.zeros(raw_image.shape, dtype=bool)
    if source == "image":
      data = raw_image
      channels = config.image.channels
    elif source == "volume":
      spec = config.volume.mask.hdf5
      if not spec:
        raise FFNError(f"inference request: {field}[{i}].volume.mask needs hdf5: \"file.h5:dataset\"")
      sel = tuple(slice(int(c), int(c) + n) for c, n in zip(corner_zyx, raw_image.shape))
      with Volume(spec) as vol:
        data = vol[sel]
      if data.shape != raw_image.shape:
        raise FFNError(f"{spec}: mask volume does not cover the segmented box")
      channels = config.volume.channels
    else:
      raise FFNError(f"inference request: {field}[{i}]: mask source {source!r} is not supported "
                     "(use image or volume)")
    for channel in channels:
      if channel.channel != 0:
        raise FFNError(f"inference request: {field}[{i}]: only channel 0 exists, got {channel.channel}")
      current |= _channel_mask(data, channel)
    if config.invert:
      current = ~current
    final = current if final is None else final | current
  return final
