"""REFERENCE ONLY: re-implementation of google/ffn's data-preparation algorithms, as they are.

Written from reading google/ffn's ``compute_partitions.py``, ``build_coordinates.py`` and
``ffn/inference/segmentation.py:clear_dust`` (github.com/google/ffn), kept deliberately naive: one
whole-volume summed-volume table per label, a Python list of (volume, index) tuples per partition
value and one ``tf.train.Example`` per record. It is the baseline of ``bench_data_prep.py`` and the
oracle of the tests of :mod:`ffn.data.partitions` and :mod:`ffn.data.coordinates`. Not used by the
toolkit itself.

Deliberate differences from google's scripts: the random generator is seeded (google uses the
unseeded global one); a margin of 0 keeps the whole axis (google's ``m:-m`` slicing would keep
nothing); Examples are serialised deterministically (map entries sorted by key: ``center`` first).
The default protobuf (upb) serialisation orders the two map entries differently from process to
process, so google's own files are not byte-reproducible; parsed, they are the same.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

IGNORE_PARTITION = 255


def clear_dust(labels: np.ndarray, min_size: int) -> np.ndarray:
  """Sets objects smaller than ``min_size`` voxels to 0 (in place, like google's)."""
  ids, sizes = np.unique(labels, return_counts=True)
  small = ids[sizes < min_size]
  labels[np.isin(labels, small)] = 0
  return labels


def _summed_volume_table(mask: np.ndarray) -> np.ndarray:
  table = mask.astype(np.int32).cumsum(axis=0).cumsum(axis=1).cumsum(axis=2)
  return np.pad(table, [[1, 0], [1, 0], [1, 0]], mode="constant")


def _box_sums_valid(table: np.ndarray, diam: Sequence[int]) -> np.ndarray:
  """Inclusion-exclusion over the 8 corners of every box of size ``diam`` (z,y,x) that fits."""
  dz, dy, dx = (int(d) for d in diam)
  nz, ny, nx = (s - 1 for s in table.shape)

  def corner(z0: int, y0: int, x0: int) -> np.ndarray:
    return table[z0:z0 + nz - dz + 1, y0:y0 + ny - dy + 1, x0:x0 + nx - dx + 1]

  return (corner(dz, dy, dx) - corner(dz, dy, 0) - corner(dz, 0, dx) - corner(0, dy, dx)
          + corner(0, 0, dx) + corner(0, dy, 0) + corner(dz, 0, 0) - corner(0, 0, 0))


def compute_partitions_reference(labels_zyx: np.ndarray, thresholds: Sequence[float],
                                 lom_radius_xyz: Sequence[int], min_size: int = 10000) -> np.ndarray:
  """google's per-label algorithm; returns the partitions padded with 255 to the input shape.

  (google's function returns the inner part; its script writes it into a 255-filled dataset.)
  """
  labels = clear_dust(labels_zyx.copy(), min_size)
  radius_zyx = np.array(lom_radius_xyz)[::-1]
  diam_zyx = 2 * radius_zyx + 1
  inner = tuple(slice(r, n - r) for r, n in zip(radius_zyx, labels.shape))
  output = np.zeros(labels[inner].shape, dtype=np.uint8)
  fov_volume = np.prod(diam_zyx)
  for label in set(np.unique(labels)):
    if label == 0:
      continue
    mask = labels == label
    fraction = _box_sums_valid(_summed_volume_table(mask), diam_zyx) / fov_volume
    mask = mask[inner]
    for i, th in enumerate(thresholds):
      output[mask & (fraction < th) & (output == 0)] = i + 1
    output[mask & (fraction >= thresholds[-1]) & (output == 0)] = len(thresholds) + 1
  padded = np.full(labels.shape, IGNORE_PARTITION, dtype=np.uint8)
  padded[inner] = output
  return padded


def sample_coordinates_reference(partitions: Sequence[np.ndarray], margin_zyx: Sequence[int],
                                 seed: int) -> list[tuple[int, tuple[int, int, int]]]:
  """google's balanced resampling; returns [(volume index, (x, y, z))] in file order."""
  np.random.seed(seed)
  totals: dict = defaultdict(int)
  indices: dict = defaultdict(list)
  shapes = []
  mz, my, mx = (int(m) for m in margin_zyx)
  crop = tuple(slice(m, -m if m else None) for m in (mz, my, mx))
  for i, volume in enumerate(partitions):
    part = volume[crop]
    shapes.append(part.shape)
    values, counts = np.unique(part, return_counts=True)
    for value, count in zip(values, counts):
      if value == IGNORE_PARTITION:
        continue
      totals[value] += count
      indices[value].extend([(i, flat) for flat in np.flatnonzero(part == value)])
  max_count = max(totals.values())
  rows = np.concatenate([np.resize(np.random.permutation(v), (max_count, 2))
                         for v in indices.values()], axis=0)
  np.random.shuffle(rows)
  out = []
  for i, flat in rows:
    z, y, x = np.unravel_index(flat, shapes[i])
    out.append((int(i), (int(mx + x), int(my + y), int(mz + z))))
  return out


def write_coordinates_reference(path: str, records: list[tuple[int, tuple[int, int, int]]],
                                names: Sequence[str]) -> None:
  """One tf.train.Example per record into a GZIP TFRecord file, as google's script does."""
  import tensorflow as tf
  options = tf.io.TFRecordOptions(compression_type="GZIP")
  with tf.io.TFRecordWriter(path, options=options) as writer:
    for i, center in records:
      example = tf.train.Example(features=tf.train.Features(feature=dict(
          center=tf.train.Feature(int64_list=tf.train.Int64List(value=list(center))),
          label_volume_name=tf.train.Feature(
              bytes_list=tf.train.BytesList(value=[names[i].encode("utf-8")])))))
      writer.write(example.SerializeToString(deterministic=True))
