"""Operations on label volumes, one home for every stage (inference results, consensus, stitching).

Label volumes are integer arrays of object ids, z,y,x (2D: y,x), 0 = background; ids are >= 0.
"Raster order" is the C order of z,y,x: the flat index ``(z * ny + y) * nx + x``. The work is done
by the field's compiled libraries from the Seung lab: ``connected-components-3d`` (cc3d: every
object's connected pieces in one pass over the volume) and ``fastremap`` (unique, remap, mask).

* :func:`connected_components` -- every 6/18/26-connected piece of every object its own id 1..N,
  numbered in raster order of the piece's first voxel (``skimage.measure.label``'s numbering);
* :func:`unique`, :func:`first_voxels` -- sorted distinct ids with their counts, inverse or first
  voxel;
* :func:`remap` -- ids through a lookup table;
* :func:`clear_small` -- objects below a size set to 0.
"""

from __future__ import annotations

from typing import Mapping

import cc3d
import fastremap
import numpy as np

CONNECTIVITIES = (6, 18, 26)  # neighbours of a voxel: faces, + edges, + corners


def connected_components(labels: np.ndarray, connectivity: int = 6) -> tuple[np.ndarray, int]:
  """(pieces, N): every connected piece of every object of ``labels`` gets its own id 1..N.

  Voxels belong to one piece when they have the same non-zero id and are linked through
  neighbours (``connectivity`` 6, 18 or 26 in 3D; 4 or 8 in 2D). Pieces are numbered in raster
  order of their first voxel; background stays 0. ``pieces`` is uint16, uint32 or uint64 (the
  smallest that cc3d finds safe), same shape. One pass over the volume (cc3d).
  """
  labels = np.ascontiguousarray(labels)
  if labels.ndim == 3 and connectivity not in CONNECTIVITIES:
    raise ValueError(f"connectivity must be one of {CONNECTIVITIES} in 3D, got {connectivity}")
  if labels.size == 0:
    return np.zeros(labels.shape, np.uint16), 0
  if labels.dtype.kind == "i":
    labels = labels.view(labels.dtype.str.replace("i", "u"))  # ids >= 0: same values, unsigned
  pieces, count = cc3d.connected_components(labels, connectivity=connectivity, return_N=True)
  return pieces, int(count)


def unique(labels: np.ndarray, return_inverse: bool = False, return_counts: bool = False):
  """Sorted distinct values of ``labels`` (any shape), like ``np.unique``: optionally the inverse
  (index of each element's value, shaped like ``labels``) and the count of each value."""
  if not (return_inverse or return_counts):
    return fastremap.unique(labels)
  return fastremap.unique(labels, return_inverse=return_inverse, return_counts=return_counts)


def first_voxels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sorted distinct ids, flat raster index (int64) of each id's first voxel)."""
  ids, first = fastremap.unique(np.ascontiguousarray(labels), return_index=True)
  return ids, first.astype(np.int64, copy=False)


def remap(labels: np.ndarray, table: Mapping[int, int], in_place: bool = False) -> np.ndarray:
  """``labels`` with every id ``k`` replaced by ``table[k]``; every id must be in ``table``
  (KeyError otherwise). The result has ``labels``' dtype (in place if asked and possible)."""
  return fastremap.remap(labels, dict(table), preserve_missing_labels=False, in_place=in_place)


def clear_small(labels: np.ndarray, min_size: int) -> np.ndarray:
  """Sets the objects with fewer than ``min_size`` voxels to 0, in place; returns ``labels``."""
  ids, sizes = unique(labels, return_counts=True)
  small = ids[(sizes < min_size) & (ids != 0)]
  if small.size:
    fastremap.mask(labels, small.tolist(), in_place=True)
  return labels
