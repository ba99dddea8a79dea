"""Split consensus: cut the objects of one segmentation along the objects of another.

Array code (numpy, :mod:`ffn.labels`) on z,y,x label arrays (any integer dtype, ids >= 0, 0 =
background). The rule and the numbering follow google/ffn's
``segmentation.split_segmentation_by_intersection`` as read from its source (google's code cannot
run here; the tests check a slow pair-by-pair reading of the rule):

* every voxel gets the pair (id1, id2) of its ids in the two segmentations; a pair with id1 = 0, or
  with fewer than ``min_size`` voxels, becomes 0 -- (id1, 0) is a valid pair, so voxels that only
  segmentation1 segmented are kept;
* for each id1, the pair with the most voxels (ties: the smaller id2) keeps id1 -- also when it is
  then cleared for being small;
* every other kept pair gets a new id, ``max(seg1) + 1, + 2, ...``, in the order of (id2, id1).

Ids are therefore not made contiguous (google does not either): surviving ids of segmentation1
keep their value, so its ``origins`` stay valid for them.
"""

from __future__ import annotations

import numpy as np

from ffn import labels as label_ops
from ffn.errors import FFNError


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(sorted distinct values, index of each element's value among them, count of each value).

  ``values``: flat array of non-negative integers. A lookup table over ``0..max`` when the largest
  value is small compared with the number of elements, else :func:`ffn.labels.unique`.
  """
  top = int(values.max()) if values.size else 0
  if top <= 4 * values.size + 1024:
    counts = np.bincount(values.astype(np.intp, copy=False), minlength=top + 1)
    present = counts > 0
    distinct = np.flatnonzero(present)
    rank = np.cumsum(present) - 1
    return distinct.astype(values.dtype), rank[values], counts[distinct]
  distinct, inverse, counts = label_ops.unique(values, return_inverse=True, return_counts=True)
  return distinct, inverse.reshape(-1), counts


def _as_labels(seg: np.ndarray, name: str) -> np.ndarray:
  """``seg`` flattened as uint64; FFNError for a non-integer dtype or a negative id."""
  if seg.dtype.kind not in "ui":
    raise FFNError(f"{name}: labels must be integers, got dtype {seg.dtype.name}")
  if seg.dtype.kind == "i" and seg.size and int(seg.min()) < 0:
    raise FFNError(f"{name}: labels must be >= 0, found {int(seg.min())}")
  return seg.reshape(-1).astype(np.uint64, copy=False)


def split_by_intersection(seg1: np.ndarray, seg2: np.ndarray, min_size: int = 0) -> np.ndarray:
  """Split consensus of two segmentations of the same box (rule in the module docstring).

  ``seg1``, ``seg2``: z,y,x label arrays of one shape; ``min_size``: smallest piece kept, in voxels.
  Returns uint64 labels, z,y,x. Cost: three sorts or table look-ups over the voxels, no Python
  loop over voxels or objects.
  """
  seg1, seg2 = np.asarray(seg1), np.asarray(seg2)
  if seg1.shape != seg2.shape:
    raise FFNError(f"segmentation shapes differ: {seg1.shape} vs {seg2.shape} (z,y,x)")
  if seg1.size == 0:
    return np.zeros(seg1.shape, np.uint64)
  ids1, index1, _ = _unique(_as_labels(seg1, "segmentation1"))
  ids2, index2, _ = _unique(_as_labels(seg2, "segmentation2"))
  # Pair code id2-major, like google's (id2 << 32) | id1: the new-id order follows it.
  pairs, pair_of_voxel, counts = _unique(index2.astype(np.int64) * ids1.size + index1)
  first, second = pairs % ids1.size, pairs // ids1.size  # positions in ids1, ids2

  # Per id1, the pair with the largest overlap; ties go to the smaller id2.
  order = np.lexsort((second, -counts, first))
  leads = np.ones(order.size, bool)
  leads[1:] = first[order[1:]] != first[order[:-1]]
  largest = np.zeros(pairs.size, bool)
  largest[order[leads]] = True

  cleared = (counts < min_size) | (ids1[first] == 0)
  fresh = ~largest & ~cleared
  max_id = int(ids1[-1])
  if max_id + int(fresh.sum()) > np.iinfo(np.uint64).max:
    raise FFNError(f"segmentation1: ids up to {max_id} leave no room for "
                   f"{int(fresh.sum())} new ids in uint64")
  new_ids = np.zeros(pairs.size, np.uint64)
  kept = largest & ~cleared
  new_ids[kept] = ids1[first[kept]]
  new_ids[fresh] = np.uint64(max_id) + np.arange(1, int(fresh.sum()) + 1, dtype=np.uint64)
  return new_ids[pair_of_voxel].reshape(seg1.shape)


def kept_origins(origins: dict, seg1_max_id: int, consensus: np.ndarray) -> dict:
  """The entries of segmentation1's ``origins`` whose object survives under its own id.

  ``seg1_max_id``: the largest id of segmentation1 (ids above it were created by the split and have
  no origin). google attaches origins by looking every output id up in the dict, which can pick up
  a stale entry for a new id; here only ids that came from segmentation1 are looked up.
  """
  ids, _, _ = _unique(consensus.reshape(-1))
  return {int(i): origins[int(i)] for i in ids if 0 < i <= seg1_max_id and int(i) in origins}
