"""ffn/labels.py against independent oracles (scipy.ndimage per object, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ffn import labels


def _oracle_components(volume: np.ndarray, connectivity: int) -> np.ndarray:
  """Pieces of each id separately with scipy.ndimage.label, then numbered 1..N in raster order
  of their first voxel."""
  rank = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}[connectivity]
  structure = ndimage.generate_binary_structure(volume.ndim, rank)
  pieces = np.zeros(volume.shape, np.int64)
  count = 0
  for value in np.unique(volume):
    if value == 0:
      continue
    piece, n = ndimage.label(volume == value, structure)
    pieces[piece > 0] = piece[piece > 0] + count
    count += n
  flat = pieces.reshape(-1)
  order = []
  seen = set()
  for p in flat[flat > 0]:
    if p not in seen:
      seen.add(p)
      order.append(p)
  table = np.zeros(count + 1, np.int64)
  table[np.array(order, np.int64)] = np.arange(1, len(order) + 1)
  return table[pieces]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.uint64])
def test_connected_components_match_scipy_per_object(connectivity, dtype):
  rng = np.random.default_rng(connectivity)
  values = np.array([0, 3, 5, 7 if dtype == np.uint8 else 2**40], dtype)
  volume = rng.choice(values, size=(9, 11, 13), p=[0.4, 0.2, 0.2, 0.2])
  pieces, count = labels.connected_components(volume, connectivity)
  expected = _oracle_components(volume, connectivity)
  assert count == expected.max() > 10
  np.testing.assert_array_equal(pieces.astype(np.int64), expected)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_2d(connectivity):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 3, (17, 19)).astype(np.uint32)
  pieces, count = labels.connected_components(image, connectivity)
  np.testing.assert_array_equal(pieces.astype(np.int64), _oracle_components(image, connectivity))
  assert count == int(pieces.max())


def test_connected_components_of_a_fortran_array_are_numbered_in_zyx_raster_order():
  rng = np.random.default_rng(2)
  volume = rng.integers(0, 4, (6, 7, 8)).astype(np.uint16)
  pieces, _ = labels.connected_components(np.asfortranarray(volume), 6)
  np.testing.assert_array_equal(pieces.astype(np.int64), _oracle_components(volume, 6))


def test_connected_components_edge_cases():
  pieces, count = labels.connected_components(np.zeros((0, 4, 4), np.uint32))
  assert count == 0 and pieces.shape == (0, 4, 4)
  pieces, count = labels.connected_components(np.zeros((3, 4, 5), np.uint32))
  assert count == 0 and not pieces.any()
  with pytest.raises(ValueError, match="connectivity"):
    labels.connected_components(np.ones((2, 2, 2), np.uint8), 8)


def test_unique_first_voxels_remap_and_clear_small_match_numpy():
  rng = np.random.default_rng(5)
  volume = rng.choice(np.array([0, 2, 9, 2**33], np.uint64), size=(5, 6, 7))
  ids, inverse, counts = labels.unique(volume, return_inverse=True, return_counts=True)
  ref_ids, ref_inverse, ref_counts = np.unique(volume, return_inverse=True, return_counts=True)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(inverse.reshape(-1), ref_inverse.reshape(-1))
  np.testing.assert_array_equal(counts, ref_counts)
  np.testing.assert_array_equal(labels.unique(volume), ref_ids)

  ids, first = labels.first_voxels(np.asfortranarray(volume))
  flat = volume.reshape(-1)
  np.testing.assert_array_equal(first, [int(np.flatnonzero(flat == i)[0]) for i in ref_ids])

  out = labels.remap(volume, {0: 0, 2: 1, 9: 2, 2**33: 3})
  np.testing.assert_array_equal(out, np.searchsorted(ref_ids, volume))
  with pytest.raises(KeyError):
    labels.remap(volume, {0: 0, 2: 1})

  small = np.zeros((4, 4, 4), np.uint32)
  small[0, 0, :3] = 5  # 3 voxels
  small[1] = 6  # 16 voxels
  small[2, 0, 0] = 7  # 1 voxel
  labels.clear_small(small, 3)
  assert set(np.unique(small)) == {0, 5, 6} and int((small == 5).sum()) == 3
