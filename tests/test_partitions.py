"""compute_partitions: hand-checked values, identity with google's algorithm, CLI behaviour."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT
from ffn.cli import main
from ffn.data.partitions import compute_partitions, quantisation_table
from ffn.errors import FFNError

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from google_reference import compute_partitions_reference  # noqa: E402

GOOGLE_THRESHOLDS = [0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def _cube_volume() -> np.ndarray:
  """7^3 volume (z,y,x) with a 3^3 cube of label 5 at indices 2..4."""
  labels = np.zeros((7, 7, 7), dtype=np.uint16)
  labels[2:5, 2:5, 2:5] = 5
  return labels


def test_cube_golden_values():
  # Radius 1: 27-voxel box. Same-label counts inside the cube: corner 2*2*2 = 8 (0.296),
  # edge 2*2*3 = 12 (0.444), face 2*3*3 = 18 (0.667), centre 27 (1.0).
  out = compute_partitions(_cube_volume(), [0.3, 0.5, 0.7, 0.9], (1, 1, 1), min_size=1)
  assert out.dtype == np.uint8 and out.shape == (7, 7, 7)
  expected = np.full((7, 7, 7), 255, dtype=np.uint8)
  expected[1:6, 1:6, 1:6] = 0
  for z in range(2, 5):
    for y in range(2, 5):
      for x in range(2, 5):
        on_face = sum(c in (2, 4) for c in (z, y, x))  # 3: corner, 2: edge, 1: face, 0: centre
        expected[z, y, x] = {3: 1, 2: 2, 1: 3, 0: 5}[on_face]
  np.testing.assert_array_equal(out, expected)


def test_anisotropic_radius_is_xyz():
  labels = np.zeros((9, 11, 13), dtype=np.int32)
  labels[3:6, 4:7, 5:8] = 1
  out = compute_partitions(labels, [0.5], (3, 2, 1), min_size=1)  # x=3, y=2, z=1
  assert (out[:1] == 255).all() and (out[-1:] == 255).all()
  assert (out[:, :2] == 255).all() and (out[:, -2:] == 255).all()
  assert (out[:, :, :3] == 255).all() and (out[:, :, -3:] == 255).all()
  assert (out[1:-1, 2:-2, 3:-3] != 255).all()
  # Centre voxel: box 3 (z) x 5 (y) x 7 (x) = 105; the object covers 3*3*3 = 27 of it.
  assert out[4, 5, 6] == 1  # 27/105 < 0.5


def test_min_size_and_background_are_zero():
  labels = _cube_volume()
  out = compute_partitions(labels, [0.5], (1, 1, 1), min_size=28)  # the cube has 27 voxels
  assert (out[1:6, 1:6, 1:6] == 0).all()
  out = compute_partitions(labels, [0.5], (1, 1, 1), min_size=27)
  assert (out[2:5, 2:5, 2:5] > 0).all() and out[1, 1, 1] == 0


def test_threshold_equality_compares_like_google():
  # 9/27 is exactly 1/3 in float64: 'fraction < threshold' is false, so the next value.
  table = quantisation_table([9 / 27], 27)
  assert table[8] == 1 and table[9] == 2 and table[27] == 2
  # Unsorted thresholds: the first threshold (in list order) above the fraction wins.
  table = quantisation_table([0.5, 0.2], 10)
  assert table.tolist() == [1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3]


def test_input_not_modified_and_whitelist_and_exclusion():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 4, size=(12, 14, 16)).astype(np.int64)
  before = labels.copy()
  out = compute_partitions(labels, GOOGLE_THRESHOLDS, (2, 2, 2), min_size=1, id_whitelist=[2])
  np.testing.assert_array_equal(labels, before)
  inner = out[2:-2, 2:-2, 2:-2]
  assert (inner[labels[2:-2, 2:-2, 2:-2] != 2] == 0).all()
  assert (inner[labels[2:-2, 2:-2, 2:-2] == 2] > 0).all()
  out = compute_partitions(labels, GOOGLE_THRESHOLDS, (2, 2, 2), min_size=1,
                           exclusion_regions_xyzr=[(8, 7, 6, 2)])
  assert out[6, 7, 8] == 255 and out[6, 7, 10] == 255 and out[6, 7, 11] != 255


@pytest.mark.parametrize("seed", range(8))
def test_identical_to_google_random(seed):
  rng = np.random.default_rng(seed)
  shape = tuple(int(s) for s in rng.integers(6, 24, size=3))
  labels = rng.integers(0, int(rng.integers(2, 7)), size=shape)
  labels = np.repeat(labels, 2, axis=seed % 3)  # elongated objects
  if seed % 4 == 1:
    labels = labels * (1 << 40) + 7  # huge ids (the np.unique path)
  elif seed % 4 == 2:
    labels = labels.astype(np.int16) - 2  # negative ids are objects too
  radius = tuple(int(r) for r in rng.integers(0, 3, size=3))
  thresholds = GOOGLE_THRESHOLDS if seed % 2 else [0.6, 0.1, 0.35]
  min_size = int(rng.integers(0, 60))
  np.testing.assert_array_equal(
      compute_partitions(labels, thresholds, radius, min_size),
      compute_partitions_reference(labels, thresholds, radius, min_size))


def test_identical_to_google_on_the_shipped_crop(sample_fib25):
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    labels = f["stack"][10:90, 0:100, 20:110]  # z,y,x; body labels of 80 x 100 x 90 voxels
  ours = compute_partitions(labels, GOOGLE_THRESHOLDS, (8, 8, 8), min_size=1000)
  np.testing.assert_array_equal(ours, compute_partitions_reference(labels, GOOGLE_THRESHOLDS,
                                                                   (8, 8, 8), 1000))
  values = np.unique(ours)
  assert set(values.tolist()) >= {0, 2, 5, 13, 255}


def test_errors():
  with pytest.raises(FFNError, match="dtype float32"):
    compute_partitions(np.zeros((5, 5, 5), np.float32), [0.5], (1, 1, 1))
  with pytest.raises(FFNError, match="leaves no voxel"):
    compute_partitions(np.zeros((5, 5, 5), np.uint8), [0.5], (1, 1, 3))
  with pytest.raises(FFNError, match="at least one threshold"):
    compute_partitions(np.zeros((5, 5, 5), np.uint8), [], (1, 1, 1))


def _cli(*args: str) -> int:
  return main(["compute_partitions", *args])


def test_cli_output_and_attrs(tmp_path):
  labels = np.zeros((9, 10, 11), dtype=np.uint32)
  labels[2:7, 3:8, 2:9] = 4
  labels[0, 0, 0] = 9  # dust
  with h5py.File(tmp_path / "seg.h5", "w") as f:
    f["stack"] = labels
  rc = _cli(f"--input_volume={tmp_path}/seg.h5:stack", "--output_volume", f"{tmp_path}/af.h5:af",
            "--thresholds", "0.2,0.6", "--lom_radius", "2,1,1", "--min_size", "5")
  assert rc == 0
  with h5py.File(tmp_path / "af.h5", "r") as f:
    af = f["af"][...]
    np.testing.assert_array_equal(af, compute_partitions_reference(labels, [0.2, 0.6], (2, 1, 1), 5))
    # By hand: the box is 3 (z) x 3 (y) x 5 (x) = 45 voxels. A corner of the object holds
    # 2*2*3 = 12 (0.27) of it, an edge along x 2*2*5 = 20 (0.44), a z face 2*3*5 = 30 (0.67).
    assert (af[2, 3, 2], af[2, 3, 5], af[2, 5, 5], af[4, 5, 5], af[1, 1, 2]) == (2, 2, 3, 3, 0)
    assert set(np.unique(af).tolist()) == {0, 2, 3, 255}
    # google: bounding box shrunk by the radius (start, size; x,y,z), counts of the inner part.
    np.testing.assert_array_equal(f["af"].attrs["bounding_boxes"], [[[2, 1, 1], [7, 8, 7]]])
    values, counts = np.unique(af[1:-1, 1:-1, 2:-2], return_counts=True)
    np.testing.assert_array_equal(f["af"].attrs["partition_counts"], [values, counts])


@pytest.mark.parametrize("problem", ["missing_dataset", "float", "all_dust", "mask_configs"])
def test_cli_errors(tmp_path, capsys, problem):
  with h5py.File(tmp_path / "seg.h5", "w") as f:
    f["stack"] = np.ones((8, 8, 8), dtype=np.float32 if problem == "float" else np.uint8)
  dataset = "nope" if problem == "missing_dataset" else "stack"
  extra = ["--mask_configs", "x.pbtxt"] if problem == "mask_configs" else []
  rc = _cli("--input_volume", f"{tmp_path}/seg.h5:{dataset}", "--output_volume", f"{tmp_path}/af.h5:af",
            "--thresholds", "0.5", "--lom_radius", "1", "--min_size", "1000" if problem == "all_dust" else "1",
            *extra)
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("ffn compute_partitions: error:")
  assert not (tmp_path / "af.h5").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.h5"]  # no temporary file left
