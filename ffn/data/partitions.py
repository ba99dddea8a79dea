"""Local-shape partitions of a label volume (google/ffn ``compute_partitions.py``, same output).

For every voxel of an object, the *active fraction* is the share of voxels in the
(2r+1)-sided box around it (r = ``lom_radius``, per axis) that carry the same label. It is quantised
by ``thresholds`` into 1..len(thresholds)+1: value ``i + 1`` for the first threshold ``i`` (in list
order) with ``fraction < thresholds[i]``, else ``len(thresholds) + 1``. Background (label 0) and
objects smaller than ``min_size`` voxels get 0; voxels closer than r to the volume border (where the
box does not fit) and excluded regions get :data:`IGNORE_PARTITION` (255). ``build_coordinates``
then samples training centres evenly across these values.

google/ffn computes a summed-volume table of the whole volume once per label. Here each object
is processed only inside its own bounding box (no voxel of the object lies outside it, so box sums
restricted to it are exact), with integer running sums, and the fractions are compared through a
lookup table built from the very same float64 division google uses -- the output is identical.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import h5py
import numpy as np
from scipy import ndimage

from ffn.axes import BoundingBox, parse_xyz, xyz_to_zyx
from ffn.errors import FFNError
from ffn.io.volumes import Volume, check_dtype, parse_spec, write_h5
from ffn.progress import Progress

IGNORE_PARTITION = 255

_log = logging.getLogger(__name__)


def quantisation_table(thresholds: Sequence[float], fov_volume: int) -> np.ndarray:
  """uint8 table: partition value for every same-label count 0..fov_volume in the box.

  Built from ``count / fov_volume`` in float64, the exact division google/ffn performs, so the
  comparisons with the thresholds are bit-for-bit the same.
  """
  if not len(thresholds):
    raise FFNError("thresholds: at least one threshold is required")
  if len(thresholds) + 1 >= IGNORE_PARTITION:
    raise FFNError(f"thresholds: at most {IGNORE_PARTITION - 2} thresholds fit in uint8 partitions")
  fraction = np.arange(fov_volume + 1, dtype=np.int64) / np.int64(fov_volume)
  # The first threshold (in list order) above the fraction is the first running maximum above it.
  running_max = np.maximum.accumulate(np.asarray(thresholds, dtype=np.float64))
  return (np.searchsorted(running_max, fraction, side="right") + 1).astype(np.uint8)


def _box_sum(values: np.ndarray, radius: int, axis: int) -> np.ndarray:
  """Sums of ``values`` over [i - radius, i + radius] along ``axis``, clipped to the array (int32)."""
  n = values.shape[axis]
  csum = np.cumsum(values, axis=axis, dtype=np.int32)

  def sl(start: int | None, stop: int | None) -> tuple[slice, ...]:
    index = [slice(None)] * values.ndim
    index[axis] = slice(start, stop)
    return tuple(index)

  out = np.empty_like(csum)
  keep = max(n - radius, 0)  # positions whose upper window end lies inside the array
  out[sl(0, keep)] = csum[sl(radius, radius + keep)]
  out[sl(keep, None)] = csum[sl(n - 1, n)]
  if n - radius - 1 > 0:
    out[sl(radius + 1, None)] -= csum[sl(0, n - radius - 1)]
  return out


def _compact_labels(labels: np.ndarray, min_size: int,
                    whitelist: Sequence[int] | None) -> tuple[np.ndarray, int]:
  """Relabels objects that are kept (not 0, >= min_size voxels, whitelisted) as 1..n (int32).

  Everything else becomes 0. Returns (compact labels z,y,x, n).
  """
  flat = labels.reshape(-1)
  if flat.size and flat.min() >= 0 and flat.max() < max(flat.size, 1 << 20):
    sizes = np.bincount(flat)
    ids = np.arange(sizes.size)
    inverse = flat
  else:
    ids, inverse, sizes = np.unique(flat, return_inverse=True, return_counts=True)
  keep = (sizes >= min_size) & (ids != 0) & (sizes > 0)
  if whitelist is not None:
    keep &= np.isin(ids, np.asarray(list(whitelist), dtype=np.int64))
  lut = np.zeros(ids.size, dtype=np.int32)
  lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
  return lut[inverse].reshape(labels.shape), int(keep.sum())


def exclusion_mask(shape_zyx: Sequence[int], regions_xyzr: Sequence[Sequence[int]]) -> np.ndarray:
  """Boolean z,y,x mask of the union of spheres given as (x, y, z, r) in voxels (r inclusive)."""
  mask = np.zeros(tuple(shape_zyx), dtype=bool)
  hz, hy, hx = np.ogrid[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]
  for x, y, z, r in regions_xyzr:
    mask |= (hx - x) ** 2 + (hy - y) ** 2 + (hz - z) ** 2 <= r ** 2
  return mask


def compute_partitions(labels_zyx: np.ndarray, thresholds: Sequence[float],
                       lom_radius_xyz: Sequence[int], min_size: int = 10000,
                       id_whitelist: Sequence[int] | None = None,
                       exclusion_regions_xyzr: Sequence[Sequence[int]] | None = None,
                       progress: bool = False) -> np.ndarray:
  """Partition map of a label volume, identical to google/ffn's ``compute_partitions``.

  Args:
    labels_zyx: integer labels, z,y,x; 0 is background. Not modified.
    thresholds: active-fraction thresholds (fractions of the box volume).
    lom_radius_xyz: box radius r in voxels, x,y,z; the box has (2r+1) voxels per axis.
    min_size: objects with fewer voxels are treated as background (google's ``clear_dust``).
    id_whitelist: if given, only these object ids get partition values (others 0).
    exclusion_regions_xyzr: spheres (x, y, z, r), voxels, in volume coordinates, set to 255.
    progress: report progress per object.

  Returns:
    uint8 array of ``labels_zyx.shape`` (z,y,x): values 1..len(thresholds)+1 on objects, 0 on
    background/dust, 255 within r of the border and in excluded regions. google/ffn's pure function
    returns only the inner part ``[rz:-rz, ry:-ry, rx:-rx]``; its script writes it padded with 255,
    as here.
  """
  if labels_zyx.ndim != 3:
    raise FFNError(f"labels: expected a 3D (z,y,x) array, got shape {labels_zyx.shape}")
  check_dtype("labels", labels_zyx.dtype, "ui")
  radius = np.array(xyz_to_zyx(lom_radius_xyz), dtype=np.int64)
  if np.any(radius < 0):
    raise FFNError(f"lom_radius: must be >= 0, got {list(lom_radius_xyz)} (x,y,z)")
  shape = np.array(labels_zyx.shape, dtype=np.int64)
  if np.any(shape - 2 * radius <= 0):
    raise FFNError(f"lom_radius {list(lom_radius_xyz)} (x,y,z) leaves no voxel of a volume of shape "
                   f"{list(labels_zyx.shape)[::-1]} (x,y,z): every axis needs more than 2r voxels")
  fov_volume = int(np.prod(2 * radius + 1))
  table = quantisation_table(thresholds, fov_volume)

  output = np.full(labels_zyx.shape, IGNORE_PARTITION, dtype=np.uint8)
  inner = tuple(slice(int(r), int(s - r)) for r, s in zip(radius, shape))
  output[inner] = 0
  if exclusion_regions_xyzr:
    output[exclusion_mask(labels_zyx.shape, exclusion_regions_xyzr)] = IGNORE_PARTITION

  compact, n_objects = _compact_labels(labels_zyx, min_size, id_whitelist)
  _log.info("objects to process: %d (of at least %d voxels)", n_objects, min_size)
  boxes = ndimage.find_objects(compact, max_label=n_objects)
  meter = Progress(n_objects, "partitions", unit="objects") if progress else None
  for index, box in enumerate(boxes, start=1):
    if box is None:
      continue
    obj = compact[box] == index
    counts = obj.astype(np.int32)
    for axis in (2, 1, 0):
      counts = _box_sum(counts, int(radius[axis]), axis)
    # Only voxels whose full box lies inside the volume get a value (google's 'VALID' region).
    lo = [max(int(r) - s.start, 0) for r, s in zip(radius, box)]
    hi = [min(int(n - r) - s.start, s.stop - s.start) for n, r, s in zip(shape, radius, box)]
    if all(h > l for l, h in zip(lo, hi)):
      local = tuple(slice(l, h) for l, h in zip(lo, hi))
      target = output[tuple(slice(s.start + l, s.start + h) for s, l, h in zip(box, lo, hi))]
      select = obj[local] & (target == 0)
      target[select] = table[counts[local][select]]
    if meter is not None:
      meter.update()
  if meter is not None:
    meter.close()
  return output


def partition_counts(partitions: np.ndarray, lom_radius_xyz: Sequence[int]) -> np.ndarray:
  """google's ``partition_counts`` attribute: unique values and counts of the inner region, (2, K)."""
  radius = xyz_to_zyx(lom_radius_xyz)
  inner = tuple(slice(r, n - r) for r, n in zip(radius, partitions.shape))
  return np.array(np.unique(partitions[inner], return_counts=True))


# ----------------------------------------------------------------------------------------------
# Command line (google/ffn flags)


def _float_list(text: str) -> list[float]:
  try:
    return [float(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise FFNError(f"thresholds: expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str, name: str) -> list[int]:
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise FFNError(f"{name}: expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--input_volume", required=True,
                      help="label volume as path.h5:dataset (z,y,x integer labels, 0 = background)")
  parser.add_argument("--output_volume", required=True,
                      help="partition map output as path.h5:dataset (uint8, same shape as input)")
  parser.add_argument("--thresholds", required=True,
                      help="comma-separated active-fraction thresholds, e.g. 0.025,0.05,...,0.9")
  parser.add_argument("--lom_radius", required=True,
                      help="local object mask radius in voxels as x,y,z (one value: all axes)")
  parser.add_argument("--min_size", type=int, default=10000,
                      help="objects with fewer voxels are treated as background (default 10000)")
  parser.add_argument("--id_whitelist", default=None,
                      help="comma-separated object ids; only these get partition values")
  parser.add_argument("--exclusion_regions", default=None,
                      help="spheres to mark 255, as x,y,z,r[,x,y,z,r...] in voxels")
  parser.add_argument("--mask_configs", default=None,
                      help="google's MaskConfigs proto: not supported (an error if given)")


def _read_bounding_boxes(path: str, dataset: str) -> list[BoundingBox]:
  """google's optional 'bounding_boxes*' attributes of the input dataset: (start, size) x,y,z."""
  boxes = []
  with h5py.File(path, "r") as f:
    for name, value in f[dataset].attrs.items():
      if name.startswith("bounding_boxes"):
        for item in np.asarray(value):
          if np.shape(item) != (2, 3):
            raise FFNError(f"{path}:{dataset}: attribute {name!r} must hold (start, size) x,y,z pairs")
          boxes.append(BoundingBox(item[0], item[1]))
  return boxes


def run(args: argparse.Namespace) -> int:
  if args.mask_configs is not None:
    raise FFNError("--mask_configs is not supported; use --exclusion_regions or mask the labels")
  in_spec = parse_spec(args.input_volume)
  out_spec = parse_spec(args.output_volume)
  if in_spec.dataset is None or out_spec.dataset is None:
    raise FFNError("--input_volume and --output_volume must be HDF5 specs path.h5:dataset")
  thresholds = _float_list(args.thresholds)
  lom_radius = parse_xyz(args.lom_radius, "lom_radius")
  whitelist = _int_list(args.id_whitelist, "id_whitelist") if args.id_whitelist else None
  regions = None
  if args.exclusion_regions:
    values = _int_list(args.exclusion_regions, "exclusion_regions")
    if len(values) % 4:
      raise FFNError(f"exclusion_regions: expected groups of 4 integers x,y,z,r, got {len(values)} values")
    regions = [values[i:i + 4] for i in range(0, len(values), 4)]

  with Volume(in_spec) as vol:
    check_dtype(str(in_spec), vol.dtype, "ui")
    labels = vol.read_all()
  boxes = _read_bounding_boxes(in_spec.path, in_spec.dataset)
  if not boxes:
    boxes = [BoundingBox((0, 0, 0), labels.shape[::-1])]

  partitions = compute_partitions(labels, thresholds, lom_radius, args.min_size, whitelist, regions,
                                  progress=True)
  counts = partition_counts(partitions, lom_radius)
  if not np.any((counts[0] > 0) & (counts[0] != IGNORE_PARTITION)):
    raise FFNError(f"{in_spec}: no object of at least {args.min_size} voxels "
                   "(every partition value would be background or ignored)")
  r = np.array(lom_radius)
  adjusted = [(b.start + r, b.size - 2 * r) for b in boxes if np.all(b.size - 2 * r > 0)]
  attrs = {"bounding_boxes": np.array(adjusted, dtype=np.int64).reshape(-1, 2, 3),
           "partition_counts": counts}
  write_h5(out_spec.path, out_spec.dataset, partitions, attrs)
  _log.info("wrote %s: partition counts %s", out_spec,
            dict(zip(counts[0].tolist(), counts[1].tolist())))
  return 0
