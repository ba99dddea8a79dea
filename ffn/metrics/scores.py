"""Pure-numpy segmentation scores on label arrays (any shape, any integer dtype).

Conventions (the ones google/ffn's published FIB-25 numbers use):

* voxels whose ground-truth label is 0 (background) are ignored;
* unsegmented voxels (segmentation label 0) are kept and count as one more segment;
* VI split = H(segmentation | ground truth), VI merge = H(ground truth | segmentation), natural log
  (nats); a split of one true object into two equal halves scores split log 2;
* adjusted Rand error = 1 - adjusted Rand index (Hubert & Arabie), over pairs of voxels;
* adapted Rand error = 1 - F-score of Rand precision and recall (the SNEMI3D / CREMI score,
  sums of squared overlaps). This is the convention of the google/ffn reference figures for the
  fib25 100^3 box (0.198 there and here, while 1 - ARI is 0.285 for the same segmentation).

Everything is computed from a sparse contingency table (only the label pairs that occur).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Contingency:
  """Overlap counts: ``counts[k]`` voxels have segment ``seg_index[k]`` and true ``gt_index[k]``.

  Indices refer to ``seg_sizes``/``gt_sizes`` (voxel totals per segment / true object).
  """
  seg_index: np.ndarray
  gt_index: np.ndarray
  counts: np.ndarray
  seg_sizes: np.ndarray
  gt_sizes: np.ndarray
  seg_labels: np.ndarray
  gt_labels: np.ndarray

  @property
  def total(self) -> int:
    return int(self.counts.sum())


def contingency(segmentation: np.ndarray, groundtruth: np.ndarray,
                ignore_gt_zero: bool = True) -> Contingency:
  """Sparse contingency table of two equally shaped label arrays."""
  if segmentation.shape != groundtruth.shape:
    raise ValueError(f"segmentation shape {segmentation.shape} != ground truth shape {groundtruth.shape}")
  seg = segmentation.ravel()
  gt = groundtruth.ravel()
  if ignore_gt_zero:
    keep = gt != 0
    seg, gt = seg[keep], gt[keep]
  seg_labels, seg_inv = np.unique(seg, return_inverse=True)
  gt_labels, gt_inv = np.unique(gt, return_inverse=True)
  pair = seg_inv.astype(np.int64) * max(len(gt_labels), 1) + gt_inv
  pairs, counts = np.unique(pair, return_counts=True)
  n_gt = max(len(gt_labels), 1)
  return Contingency(seg_index=pairs // n_gt, gt_index=pairs % n_gt, counts=counts.astype(np.int64),
                     seg_sizes=np.bincount(seg_inv, minlength=len(seg_labels)).astype(np.int64),
                     gt_sizes=np.bincount(gt_inv, minlength=len(gt_labels)).astype(np.int64),
                     seg_labels=seg_labels, gt_labels=gt_labels)


def variation_of_information(table: Contingency) -> tuple[float, float]:
  """(VI split, VI merge) in nats: H(seg | gt), H(gt | seg)."""
  n = table.total
  if n == 0:
    return 0.0, 0.0
  p = table.counts / n
  p_seg = table.seg_sizes[table.seg_index] / n
  p_gt = table.gt_sizes[table.gt_index] / n
  split = float(-np.sum(p * np.log(p / p_gt)))
  merge = float(-np.sum(p * np.log(p / p_seg)))
  return max(split, 0.0), max(merge, 0.0)


def _pairs(x: np.ndarray) -> float:
  x = x.astype(np.float64)
  return float(np.sum(x * (x - 1) / 2))


def adjusted_rand_error(table: Contingency) -> float:
  """1 - adjusted Rand index (0 for identical partitions)."""
  n = table.total
  if n < 2:
    return 0.0
  index = _pairs(table.counts)
  a, b = _pairs(table.seg_sizes), _pairs(table.gt_sizes)
  expected = a * b / (n * (n - 1) / 2)
  maximum = (a + b) / 2
  if maximum == expected:
    return 0.0
  return float(1.0 - (index - expected) / (maximum - expected))


def adapted_rand_error(table: Contingency) -> float:
  """1 - 2PR/(P+R) with Rand precision P = sum n_ij^2 / sum a_i^2 and recall R = sum n_ij^2 / sum b_j^2."""
  if table.total == 0:
    return 0.0
  overlap = float(np.sum(table.counts.astype(np.float64) ** 2))
  precision = overlap / float(np.sum(table.seg_sizes.astype(np.float64) ** 2))
  recall = overlap / float(np.sum(table.gt_sizes.astype(np.float64) ** 2))
  return float(1.0 - 2.0 * precision * recall / (precision + recall))


def evaluate(segmentation: np.ndarray, groundtruth: np.ndarray) -> dict:
  """All scores as a dict (see the module docstring for the conventions)."""
  table = contingency(segmentation, groundtruth)
  split, merge = variation_of_information(table)
  return {
      "vi_split": split,
      "vi_merge": merge,
      "vi": split + merge,
      "adjusted_rand_error": adjusted_rand_error(table),
      "adapted_rand_error": adapted_rand_error(table),
      "segments": int(np.count_nonzero(np.unique(segmentation))),  # ids > 0
      "groundtruth_objects": int(np.count_nonzero(table.gt_labels)),
      "fraction_unsegmented": float(np.mean(segmentation == 0)) if segmentation.size else 0.0,
      "voxels": int(segmentation.size),
      "voxels_scored": table.total,
  }
