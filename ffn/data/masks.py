"""Binary mask stacks -> instance labels (``ffn convert --kind mask``).

Many ground truths come as binary TIF/PNG stacks: objects (cell interiors) white on black
membranes, or the reverse. Training needs instance labels: each connected object its own id. A
voxel is foreground when its value is above ``threshold`` (``--invert``: at or below it, for black
objects on white); the foreground's connected components (``connectivity`` 6, 18 or 26: face,
edge or corner neighbours in 3D) get ids 1, 2, ... in the order of their first voxel (z, then y,
then x), components smaller than ``min_size`` voxels become background 0, and the result is int64,
the dtype of google/ffn's label volumes.

Connected components need the whole volume: the mask is read into memory (one byte per voxel).
"""

from __future__ import annotations

import logging

import numpy as np

from ffn.errors import FFNError
from ffn.io.volumes import Volume, check_dtype, parse_spec, write_spec

_log = logging.getLogger(__name__)

CONNECTIVITIES = (6, 18, 26)


def foreground(values: np.ndarray, threshold: float = 0, invert: bool = False) -> np.ndarray:
  """Boolean foreground of a mask: ``values > threshold``, or ``<= threshold`` with ``invert``."""
  return values <= threshold if invert else values > threshold


def instances(mask: np.ndarray, connectivity: int = 6, min_size: int = 0) -> np.ndarray:
  """Connected components of a boolean z,y,x ``mask`` as int64 ids 1..n (see the module docstring).

  Components of fewer than ``min_size`` voxels are 0; the others are numbered consecutively in
  the order of their first voxel in C (z, y, x) order (:func:`ffn.labels.connected_components`).
  """
  from ffn import labels as label_ops
  if connectivity not in CONNECTIVITIES:
    raise FFNError(f"--connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
  if mask.ndim != 3:
    raise FFNError(f"expected a 3D (z,y,x) mask, got shape {mask.shape}")
  pieces, _ = label_ops.connected_components(mask.astype(np.uint8, copy=False), connectivity)
  if min_size > 1:
    label_ops.clear_small(pieces, min_size)
  # Pieces are numbered in raster order of their first voxel: renumber the kept ones 1..n in order.
  kept = [int(k) for k in label_ops.unique(pieces) if k != 0]
  table = {0: 0, **{k: i for i, k in enumerate(kept, start=1)}}
  return label_ops.remap(pieces, table).astype(np.int64)


def convert_mask(input_spec: str, output_spec: str, invert: bool = False, threshold: float = 0,
                 connectivity: int = 6, min_size: int = 0) -> tuple[tuple[int, ...], int]:
  """Reads a binary mask volume, writes its instances (int64) to the HDF5 ``output_spec``
  atomically. Returns (shape z,y,x, number of objects)."""
  if connectivity not in CONNECTIVITIES:
    raise FFNError(f"--connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
  if min_size < 0:
    raise FFNError(f"--min_size must be >= 0, got {min_size}")
  if parse_spec(output_spec).dataset is None:
    raise FFNError(f"{output_spec}: output must be an HDF5 spec path.h5:dataset")
  with Volume(input_spec) as vol:
    check_dtype(str(vol.spec), vol.dtype, "uib")
    values = vol.read_all()
  levels = np.unique(values[::max(1, values.shape[0] // 8)])
  if levels.size > 2:
    _log.warning("%s: %d distinct values in the sampled sections, not a binary mask; foreground is "
                 "%s %g", input_spec, levels.size, "<=" if invert else ">", threshold)
  labels = instances(foreground(values, threshold, invert), connectivity, min_size)
  count = int(labels.max()) if labels.size else 0
  write_spec(output_spec, labels)
  _log.info("wrote %s %s: %d objects", output_spec, labels.shape, count)
  return labels.shape, count
