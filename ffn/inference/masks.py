"""Where the flood fill may go: exclusion masks from ``MaskConfig`` protos, and shift masks.

Exclusion masks (google/ffn's ``storage.build_mask``): a channel mask is ``min_value <= v <=
max_value`` or ``v in values`` (if given), optionally inverted; a MaskConfig ORs its channel masks
and may invert the result; several MaskConfigs are ORed. Sources:

* ``image``: the **raw** image values (before normalisation), channel 0 (the image the runner
  segments, channel 0 of a 4D image);
* ``volume``: the same box of another volume (any volume spec of :mod:`ffn.io.volumes`): 4D
  (channel,z,y,x) as google's, or 3D (channel 0 only); the read is clipped to the volume and
  voxels of the box outside it have the value 0 (then tested like the others), as google fills
  them;
* ``coordinate_expression``: a numpy expression over ``x``, ``y``, ``z``, the global voxel
  coordinates of the box (e.g. ``"z < 10"``, ``"(x - 50)**2 + (y - 50)**2 > 40**2"``), evaluated
  with only ``np``/``numpy`` and those three names (no builtins). google passes dense index
  arrays; here they are open grids (shapes (z,1,1), (1,y,1), (1,1,x)) that broadcast to the same
  result without three box-sized arrays. It must give a boolean array that broadcasts to the box.

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
from ffn.io.volumes import read_h5_box


def _channel_mask(values: np.ndarray, config) -> np.ndarray:
  if config.values:
    out = np.isin(values, np.array(list(config.values)))
  else:
    out = (values >= config.min_value) & (values <= config.max_value)
  return ~out if config.invert else out


def compile_expression(expression: str, field: str):
  """The compiled ``coordinate_expression``; FFNError naming ``field`` if it is not an expression."""
  if not expression.strip():
    raise FFNError(f"inference request: {field}.coordinate_expression.expression is empty")
  try:
    return compile(expression, f"<{field}.coordinate_expression>", "eval")
  except SyntaxError as e:
    raise FFNError(f"inference request: {field}.coordinate_expression {expression!r} is not a "
                   f"Python expression ({e.msg})") from None


def coordinate_mask(expression: str, corner_zyx: Sequence[int], shape_zyx: Sequence[int],
                    field: str) -> np.ndarray:
  """Boolean z,y,x mask of ``expression`` over the global coordinates of the box (module
  docstring)."""
  code = compile_expression(expression, field)
  z, y, x = np.ogrid[tuple(slice(int(c), int(c) + int(n)) for c, n in zip(corner_zyx, shape_zyx))]
  try:
    with np.errstate(all="ignore"):
      value = eval(code, {"__builtins__": {}, "np": np, "numpy": np}, {"x": x, "y": y, "z": z})
    out = np.broadcast_to(np.asarray(value), tuple(int(n) for n in shape_zyx))
  except Exception as e:  # the expression is the user's: any failure is their input's
    raise FFNError(f"inference request: {field}.coordinate_expression {expression!r} failed: "
                   f"{type(e).__name__}: {e}") from None
  if out.dtype != bool:
    raise FFNError(f"inference request: {field}.coordinate_expression {expression!r} must give "
                   f"booleans, got {out.dtype.name}")
  return out


def build_mask(configs: Sequence, raw_image: np.ndarray | None, field: str,
               corner_zyx: Sequence[int] = (0, 0, 0),
               shape_zyx: Sequence[int] | None = None) -> np.ndarray | None:
  """Boolean z,y,x mask (True = excluded) for the box at ``corner_zyx``, or None if no configs.

  The box has ``raw_image``'s shape, or ``shape_zyx`` when no image is given (then image masks
  are an error).
  """
  from ffn.inference.request import check_mask_config, hdf5_spec
  shape = tuple(raw_image.shape) if raw_image is not None else tuple(int(n) for n in shape_zyx or ())
  final = None
  for i, config in enumerate(configs):
    where = f"{field}[{i}]"
    check_mask_config(config, where)
    source = config.WhichOneof("source")
    if source == "coordinate_expression":
      current = coordinate_mask(config.coordinate_expression.expression, corner_zyx, shape, where).copy()
    else:
      current = np.zeros(shape, dtype=bool)
      channels = getattr(config, source).channels
      if source == "image":
        if raw_image is None:
          raise FFNError(f"{where}: image masks are not available here (use a volume mask)")
        data = raw_image[np.newaxis]
      else:
        spec = hdf5_spec(config.volume.mask, f"{where}.volume.mask")
        need = max(c.channel for c in channels) + 1
        data = read_h5_box(spec, corner_zyx, shape, channels=need if need > 1 else None,
                           fill_outside=True, what=f"{where}.volume.mask")
        if data.ndim == 3:
          data = data[np.newaxis]
      for channel in channels:
        current |= _channel_mask(data[channel.channel], channel)
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
