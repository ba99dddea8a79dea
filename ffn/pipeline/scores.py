"""Blockwise scores and object statistics of a pipeline stage's segmentation.

A segmentation (any label volume spec of :mod:`ffn.io.volumes`, or a single result npz) is read
block by block over its box (``block_size_xyz``, x,y,z voxels), and so is the ground truth of the
same block. Each block adds its sparse contingency table (voxel counts per (segment id, true id)
pair, ground-truth 0 ignored) and its object sizes (voxels per segment id, 0 = unsegmented
included) to running tables, so memory is O(block + tables), never O(volume) (a result npz,
which cannot be read in parts, is held whole: one chunk). The finished contingency table is
handed to :mod:`ffn.metrics.scores` as the same :class:`~ffn.metrics.scores.Contingency` it
would build from the whole arrays (same entries, same order), so the scores are those of
:func:`ffn.metrics.scores.evaluate` on the whole volume, to the last bit.

Coordinates: boxes are absolute image voxels, x,y,z (:class:`ffn.axes.BoundingBox`); arrays z,y,x.
A label volume that records where it lies (HDF5 attribute or Zarr ``.zattrs`` key
``voxel_offset_xyz``, precomputed ``voxel_offset``: what ``ffn stitch`` writes) is placed there;
one that does not is the stage's box when its shape is the box's size, else it starts at voxel 0
of the image. A result npz ``seg-<x>_<y>_<z>.npz`` lies at the corner its name gives.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from ffn.axes import BoundingBox, zyx_to_xyz
from ffn.errors import FFNError
from ffn.metrics.scores import (Contingency, adapted_rand_error, adjusted_rand_error,
                                variation_of_information)

SCORE_KEYS = ("vi_split", "vi_merge", "vi", "adjusted_rand_error", "adapted_rand_error")
QUANTILES = {"min": 0.0, "p10": 0.1, "median": 0.5, "p90": 0.9, "max": 1.0}


def _stored_offset_xyz(spec) -> tuple[int, int, int] | None:
  """The ``voxel_offset`` a label volume records (x,y,z), or None when it records none."""
  if spec.scheme == "precomputed":
    path = os.path.join(spec.path, "info")
    try:
      with open(path, encoding="utf-8") as f:
        return tuple(int(v) for v in json.load(f)["scales"][0].get("voxel_offset", (0, 0, 0)))
    except (OSError, ValueError, KeyError, IndexError) as e:
      raise FFNError(f"{path}: unreadable precomputed info ({e})") from None
  if spec.scheme in ("zarr", "n5"):
    path = os.path.join(spec.path, ".zattrs")
    try:
      with open(path, encoding="utf-8") as f:
        offset = json.load(f).get("voxel_offset_xyz")
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      raise FFNError(f"{path}: unreadable Zarr attributes ({e})") from None
    return None if offset is None else tuple(int(v) for v in offset)
  if spec.scheme is None and spec.dataset is not None:
    from ffn.io.volumes import open_h5_dataset
    f, ds = open_h5_dataset(spec)
    with f:
      offset = ds.attrs.get("voxel_offset_xyz")
    return None if offset is None else tuple(int(v) for v in offset)
  return None


class LabelSource:
  """Object ids of one segmentation (or ground truth), read by boxes in absolute image voxels.

  ``spec``: a label volume spec or a result ``.npz``; ``box``: where the stage says it lies
  (x,y,z; None: unknown). :attr:`extent` is the box it covers (module docstring). ``what`` (e.g.
  ``stage stitch``) is added to errors in parentheses. Use as a context manager.
  """

  def __init__(self, spec: str, box: BoundingBox | None = None, what: str = "") -> None:
    self.spec = spec
    self.where = f"{spec} ({what})" if what else spec
    try:
      self._open(spec, box)
    except FFNError as e:
      if what and f"({what})" not in str(e):
        raise FFNError(f"{e} ({what})") from None
      raise

  def _open(self, spec: str, box: BoundingBox | None) -> None:
    self._array: np.ndarray | None = None
    self._volume = None
    if spec.endswith(".npz"):
      from ffn.inference import storage
      if not os.path.isfile(spec):
        raise FFNError(f"{spec}: segmentation file not found")
      self._array, _ = storage.load_segmentation_file(spec)
      try:
        start = zyx_to_xyz(storage.corner_from_path(spec))
      except FFNError:
        start = tuple(box.start.tolist()) if box is not None else (0, 0, 0)
      self.extent = BoundingBox(start, zyx_to_xyz(self._array.shape))
      return
    from ffn.io.volumes import Volume, check_dtype
    self._volume = Volume(spec)
    try:
      check_dtype(self.where, self._volume.dtype, "uib")
      shape_xyz = zyx_to_xyz(self._volume.shape)
      offset = _stored_offset_xyz(self._volume.spec)
      if offset is not None:
        start = offset
      elif box is not None and tuple(box.size.tolist()) == tuple(shape_xyz):
        start = tuple(box.start.tolist())
      else:
        start = (0, 0, 0)
      self.extent = BoundingBox(start, shape_xyz)
    except BaseException:
      self.close()
      raise

  def check_covers(self, box: BoundingBox) -> None:
    """FFNError unless :attr:`extent` holds ``box``."""
    if np.any(box.start < self.extent.start) or np.any(box.end > self.extent.end):
      raise FFNError(f"{self.where}: covers start {self.extent.start.tolist()} size "
                     f"{self.extent.size.tolist()} (x,y,z), not the box start {box.start.tolist()} "
                     f"size {box.size.tolist()} it is scored in")

  def read(self, box: BoundingBox) -> np.ndarray:
    """The ids of ``box`` (x,y,z, inside :attr:`extent`) as a z,y,x uint64 array."""
    self.check_covers(box)
    local = BoundingBox(box.start - self.extent.start, box.size)
    data = self._array[local.to_slices()] if self._array is not None else self._volume[local.to_slices()]
    if data.dtype.kind == "i" and data.size and int(data.min()) < 0:
      raise FFNError(f"{self.where}: negative ids (min {int(data.min())}) in the box start "
                     f"{box.start.tolist()} (x,y,z); ids must be >= 0")
    return np.ascontiguousarray(data, dtype=np.uint64)

  def close(self) -> None:
    if self._volume is not None:
      self._volume.close()
      self._volume = None
    self._array = None

  def __enter__(self) -> "LabelSource":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def blocks(box: BoundingBox, block_size_xyz: Sequence[int]) -> list[BoundingBox]:
  """Non-overlapping blocks of at most ``block_size_xyz`` voxels tiling ``box``, x fastest."""
  size = np.array(block_size_xyz, dtype=np.int64).reshape(3)
  if np.any(size <= 0):
    raise FFNError(f"block size must be positive, got {size.tolist()} (x,y,z)")
  axes = [[(int(s), int(min(n, e - s))) for s in range(int(b), int(e), int(n))]
          for b, e, n in zip(box.start, box.end, size)]
  return [BoundingBox((x[0], y[0], z[0]), (x[1], y[1], z[1]))
          for z in axes[2] for y in axes[1] for x in axes[0]]


def _reduce(keys: Sequence[np.ndarray], counts: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
  """Sums ``counts`` of equal key tuples; the result is sorted by the keys (first key first)."""
  order = np.lexsort(tuple(reversed(keys)))
  keys = [k[order] for k in keys]
  counts = counts[order]
  if not counts.size:
    return keys, counts
  new = np.zeros(counts.size, bool)
  new[0] = True
  for k in keys:
    new[1:] |= k[1:] != k[:-1]
  first = np.flatnonzero(new)
  return [k[first] for k in keys], np.add.reduceat(counts, first)


def _dense(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(``labels`` renumbered 0..n-1, in place; the n original ids, uint64, by dense id)."""
  import fastremap
  dense, mapping = fastremap.renumber(labels, start=0, preserve_zero=False, in_place=True)
  ids = np.zeros(len(mapping), np.uint64)
  ids[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(mapping.keys(), np.uint64,
                                                                          len(mapping))
  return dense, ids


class RunningTables:
  """Object sizes and the contingency table against the ground truth, accumulated by blocks."""

  def __init__(self) -> None:
    empty = np.zeros(0, np.uint64)
    self.ids, self.sizes = empty, np.zeros(0, np.int64)  # every voxel, 0 included
    self.pair_seg, self.pair_gt, self.pair_counts = empty, empty, np.zeros(0, np.int64)

  def add(self, seg: np.ndarray, gt: np.ndarray | None) -> None:
    """Adds one block: ``seg`` and ``gt`` (or None: no ground truth) are equally shaped uint64.

    The block's pairs are counted on dense ids (fastremap: hash maps, no sort of the block), at
    about 3 x 8 bytes per voxel beside the two blocks."""
    import fastremap
    ids, sizes = fastremap.unique(seg, return_counts=True)
    (self.ids,), self.sizes = _reduce([np.concatenate([self.ids, ids.astype(np.uint64)])],
                                      np.concatenate([self.sizes, sizes.astype(np.int64)]))
    if gt is None:
      return
    keep = gt != 0
    s, g = seg[keep], gt[keep]
    if not s.size:
      return
    s_dense, s_ids = _dense(s)
    g_dense, g_ids = _dense(g)
    n_gt = np.uint64(len(g_ids))
    code = s_dense.astype(np.uint64)
    code *= n_gt
    code += g_dense
    pairs, counts = fastremap.unique(code, return_counts=True)
    pairs = pairs.astype(np.uint64)
    (self.pair_seg, self.pair_gt), self.pair_counts = _reduce(
        [np.concatenate([self.pair_seg, s_ids[pairs // n_gt]]),
         np.concatenate([self.pair_gt, g_ids[pairs % n_gt]])],
        np.concatenate([self.pair_counts, counts.astype(np.int64)]))

  def contingency(self) -> Contingency:
    """The table as :func:`ffn.metrics.scores.contingency` builds it from the whole arrays."""
    seg_labels, seg_index = np.unique(self.pair_seg, return_inverse=True)
    gt_labels, gt_index = np.unique(self.pair_gt, return_inverse=True)
    seg_sizes = np.zeros(len(seg_labels), np.int64)
    np.add.at(seg_sizes, seg_index, self.pair_counts)
    gt_sizes = np.zeros(len(gt_labels), np.int64)
    np.add.at(gt_sizes, gt_index, self.pair_counts)
    return Contingency(seg_index=seg_index.astype(np.int64), gt_index=gt_index.astype(np.int64),
                       counts=self.pair_counts, seg_sizes=seg_sizes, gt_sizes=gt_sizes,
                       seg_labels=seg_labels, gt_labels=gt_labels)

  def scores(self) -> dict:
    """The dict of :func:`ffn.metrics.scores.evaluate` (same keys, same values)."""
    table = self.contingency()
    split, merge = variation_of_information(table)
    voxels = int(self.sizes.sum())
    unsegmented = int(self.sizes[0]) if self.ids.size and self.ids[0] == 0 else 0
    return {"vi_split": split, "vi_merge": merge, "vi": split + merge,
            "adjusted_rand_error": adjusted_rand_error(table),
            "adapted_rand_error": adapted_rand_error(table),
            "segments": int(np.count_nonzero(self.ids)),
            "groundtruth_objects": int(np.count_nonzero(table.gt_labels)),
            "fraction_unsegmented": unsegmented / voxels if voxels else 0.0,
            "voxels": voxels, "voxels_scored": table.total}

  def stats(self) -> dict:
    """:func:`object_stats` of the segmentation so far, with the 5 largest objects."""
    nonzero = self.ids != 0
    out = object_stats(self.sizes[nonzero], int(self.sizes[~nonzero].sum()))
    top = np.argsort(-self.sizes[nonzero], kind="stable")[:5]
    out["largest"] = [[int(self.ids[nonzero][i]), int(self.sizes[nonzero][i])] for i in top]
    return out


def object_stats(sizes: np.ndarray, unsegmented: int) -> dict:
  """Statistics of objects of ``sizes`` voxels (one per object) beside ``unsegmented`` voxels:
  ``objects``, ``voxels`` (all), ``unsegmented_fraction`` and ``size_voxels`` (min, p10, median,
  p90, max, mean of the sizes; numpy's linear quantiles; absent without objects)."""
  voxels = int(np.sum(sizes)) + int(unsegmented)
  out: dict = {"objects": int(len(sizes)), "voxels": voxels,
               "unsegmented_fraction": unsegmented / voxels if voxels else 0.0}
  if len(sizes):
    out["size_voxels"] = {name: float(np.quantile(sizes, q)) for name, q in QUANTILES.items()}
    out["size_voxels"]["mean"] = float(np.mean(sizes))
  return out


def measure(seg: LabelSource, gt: LabelSource | None, box: BoundingBox,
            block_size_xyz: Sequence[int]) -> RunningTables:
  """The tables of ``seg`` (and of ``seg`` against ``gt`` unless None) in ``box`` (x,y,z), read
  one block (``block_size_xyz``) of each at a time."""
  seg.check_covers(box)
  if gt is not None:
    gt.check_covers(box)
  tables = RunningTables()
  for block in blocks(box, block_size_xyz):
    tables.add(seg.read(block), gt.read(block) if gt is not None else None)
  return tables


def chunk_mean(chunks: Sequence[dict]) -> dict:
  """Scores of several chunks in one dict: each of :data:`SCORE_KEYS` and
  ``fraction_unsegmented`` as the mean weighted by the chunk's voxels (scored voxels for the
  scores, all voxels for the unsegmented fraction); counts (segments, ground-truth objects,
  voxels) summed over the chunks (chunk-local ids: an object in two chunks counts twice)."""
  scored = np.array([c["voxels_scored"] for c in chunks], np.float64)
  voxels = np.array([c["voxels"] for c in chunks], np.float64)
  out: dict = {}
  for key in SCORE_KEYS:
    values = np.array([c[key] for c in chunks], np.float64)
    out[key] = float(np.sum(values * scored) / scored.sum()) if scored.sum() else 0.0
  unseg = np.array([c["fraction_unsegmented"] for c in chunks], np.float64)
  out["fraction_unsegmented"] = float(np.sum(unseg * voxels) / voxels.sum()) if voxels.sum() else 0.0
  for key in ("segments", "groundtruth_objects", "voxels", "voxels_scored"):
    out[key] = int(sum(c[key] for c in chunks))
  return out
