"""Where the flood fill may go: exclusion masks from ``MaskConfig`` protos, and shift masks.

Exclusion masks: a channel mask is ``min_value <= v <= max_value`` or ``v in values`` (if given),
optionally inverted; a MaskConfig ORs its channel masks and may invert the result; several
MaskConfigs are ORed. Image masks test the **raw** image values (before normalisation). Volume
masks read the same box of another HDF5 volume (3D, single channel 0).

Shift masks (:class:`ShiftMask`, google/ffn's ``MovementRestrictor`` shift-mask part): the request's
``shift_mask`` is a 4D HDF5 dataset (channel, z, y, x) whose channels 0 and 1 hold a local (y, x)
shift between slice z and z+1, stored ``shift_mask_scale`` times coarser in y and x than the image
(z is not scaled). A voxel is *distorted* where ``max(|shift_0|, |shift_1|) >= shift_mask_threshold``.
The FoV may not be centred at a position if any distorted voxel lies in the box ``shift_mask_fov``
around it (relative to the position, x,y,z proto; default: the network's FoV, centred). Only the
no-alignment case exists here (google's ``alignment.transform_shift_mask`` is the identity then).
Differences from google/ffn, on purpose: a position's coarse y/x index is computed from its global
coordinate, ``(corner + pos) // scale - corner // scale``; google uses ``pos // scale``, the same
when the subvolume corner is a multiple of the scale and off by ``corner % scale`` voxels
otherwise. An FoV box that lies wholly before the subvolume start checks nothing (google's
negative slice end would wrap around). The runner treats an unset ``shift_mask_scale`` as 1 and
requires ``shift_mask_threshold`` (google would divide by 0, resp. use 0 and block everything).

All arrays are z,y,x; protos give x,y,z.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ffn.errors import FFNError
from ffn.io.volumes import Volume, read_h5_box


def _channel_mask(values: np.ndarray, config) -> np.ndarray:
  if config.values:
    out = np.isin(values, np.array(list(config.values)))
  else:
    out = (values >= config.min_value) & (values <= config.max_value)
  return ~out if config.invert else out


def build_mask(configs: Sequence, raw_image: np.ndarray | None, field: str,
               corner_zyx: Sequence[int] = (0, 0, 0),
               shape_zyx: Sequence[int] | None = None) -> np.ndarray | None:
  """Boolean z,y,x mask (True = excluded) for the box at ``corner_zyx``, or None if no configs.

  The box has ``raw_image``'s shape, or ``shape_zyx`` when no image is given (then only volume
  masks are possible).
  """
  shape = tuple(raw_image.shape) if raw_image is not None else tuple(int(n) for n in shape_zyx or ())
  final = None
  for i, config in enumerate(configs):
    source = config.WhichOneof("source")
    current = np.zeros(shape, dtype=bool)
    if source == "image":
      if raw_image is None:
        raise FFNError(f"{field}[{i}]: image masks are not available here (use a volume mask)")
      data = raw_image
      channels = config.image.channels
    elif source == "volume":
      spec = config.volume.mask.hdf5
      if not spec:
        raise FFNError(f"inference request: {field}[{i}].volume.mask needs hdf5: \"file.h5:dataset\"")
      sel = tuple(slice(int(c), int(c) + n) for c, n in zip(corner_zyx, shape))
      with Volume(spec) as vol:
        data = vol[sel]
      if data.shape != shape:
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


class ShiftMask:
  """Blocks FoV positions near large inter-slice shifts (see the module docstring).

  ``distorted``: bool (z, y', x') at the shift mask's scale; its index 0 along y/x is the coarse
  voxel ``corner_y // scale`` / ``corner_x // scale`` of the whole volume, where ``corner_zyx`` is
  the canvas corner. ``fov_start_zyx``/``fov_size_zyx``: the box checked around a position, in
  full-resolution voxels relative to it.
  """

  def __init__(self, distorted: np.ndarray, corner_zyx: Sequence[int], scale: int,
               fov_start_zyx: Sequence[int], fov_size_zyx: Sequence[int]):
    self.distorted = np.asarray(distorted, dtype=bool)
    self.scale = int(scale)
    self._corner = np.array(corner_zyx, dtype=np.int64)
    self._pre = np.array(fov_start_zyx, dtype=np.int64)
    self._post = self._pre + np.array(fov_size_zyx, dtype=np.int64) - 1  # inclusive

  def _coarse(self, local_zyx: np.ndarray) -> np.ndarray:
    """Local full-resolution z,y,x -> index into ``distorted`` (z unscaled)."""
    out = local_zyx.copy()
    s = self.scale
    out[1:] = (local_zyx[1:] + self._corner[1:]) // s - self._corner[1:] // s
    return out

  def blocks(self, pos_zyx: Sequence[int]) -> bool:
    """Whether a distorted voxel lies in the shift-mask FoV around ``pos_zyx`` (canvas-local)."""
    pos = np.array(pos_zyx, dtype=np.int64)
    lo = np.maximum(pos + self._pre, 0)
    hi = pos + self._post
    if np.any(hi < lo):
      return False
    a, b = self._coarse(lo), self._coarse(hi)
    return bool(self.distorted[a[0]:b[0] + 1, a[1]:b[1] + 1, a[2]:b[2] + 1].any())

  @classmethod
  def load(cls, spec: str, corner_zyx: Sequence[int], shape_zyx: Sequence[int], scale: int,
           threshold: float, fov_start_zyx: Sequence[int], fov_size_zyx: Sequence[int]) -> "ShiftMask":
    """Reads the part of the shift mask ``spec`` under the canvas box; outside the dataset the
    shift is 0 (as google's identity alignment fills it)."""
    corner = np.array(corner_zyx, dtype=np.int64)
    last = corner + np.array(shape_zyx, dtype=np.int64) - 1
    lo = np.array([corner[0], corner[1] // scale, corner[2] // scale])
    hi = np.array([last[0], last[1] // scale, last[2] // scale]) + 1
    shifts = read_h5_box(spec, lo, hi - lo, channels=2, fill_outside=True, what="shift_mask")
    distorted = np.max(np.abs(shifts.astype(np.float64)), axis=0) >= threshold
    return cls(distorted, corner_zyx, scale, fov_start_zyx, fov_size_zyx)
