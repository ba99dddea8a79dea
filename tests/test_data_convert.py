"""Stack -> HDF5 conversion, image statistics and superpixel -> body ground truth."""

import json
import os
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_OFFSET_XYZ, SHARED_DATA, missing
from ffn.axes import BoundingBox
from ffn.cli import main
from ffn.data import convert, groundtruth, stats
from ffn.errors import FFNError


def _write_png_stack(folder, data):
  folder.mkdir()
  for z, plane in enumerate(data):
    Image.fromarray(plane).save(folder / f"slice{z}.png")


def test_convert_png_stack_roundtrip_via_cli(tmp_path, capsys):
  data = np.random.default_rng(0).integers(0, 255, (70, 8, 9), dtype=np.uint8)  # > one slab
  _write_png_stack(tmp_path / "png", data)
  assert main(["convert", "--input", str(tmp_path / "png"), "--output", f"{tmp_path}/out.h5:raw"]) == 0
  with h5py.File(tmp_path / "out.h5", "r") as f:
    assert f["raw"].dtype == np.uint8
    np.testing.assert_array_equal(f["raw"][()], data)


def test_convert_labels_to_int64(tmp_path):
  import tifffile
  labels = np.random.default_rng(1).integers(0, 60000, (4, 5, 6)).astype(np.uint16)
  tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
  convert.convert_volume(str(tmp_path / "labels.tif"), f"{tmp_path}/l.h5:stack", "labels")
  with h5py.File(tmp_path / "l.h5", "r") as f:
    assert f["stack"].dtype == np.int64
    np.testing.assert_array_equal(f["stack"][()], labels)


def test_convert_rejects_16bit_image_and_leaves_no_output(tmp_path, capsys):
  import tifffile
  tifffile.imwrite(tmp_path / "img.tif", np.zeros((3, 4, 4), np.uint16), photometric="minisblack")
  rc = main(["convert", "--input", str(tmp_path / "img.tif"), "--output", f"{tmp_path}/o.h5:raw"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "not 8-bit" in err[0] and "img.tif" in err[0]
  assert not (tmp_path / "o.h5").exists()


def test_stats_golden_values(tmp_path):
  data = np.zeros((2, 2, 2), np.uint8)
  data[0] = 10
  data[1] = 30  # mean 20, population std 10
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["raw"] = data
  result = stats.compute_stats(f"{tmp_path}/v.h5:raw")
  assert result.mean == 20.0 and result.stddev == 10.0 and result.count == 8
  assert result.histogram[10] == 4 and result.histogram[30] == 4 and (result.min, result.max) == (10, 30)


def test_stats_cli_box_and_json(tmp_path, capsys):
  data = np.random.default_rng(3).integers(0, 255, (40, 30, 20), dtype=np.uint8)
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["raw"] = data
  rc = main(["stats", "--input", f"{tmp_path}/v.h5:raw", "--bounding_box_start", "2,3,4",
             "--bounding_box_size", "10,11,35", "--output", str(tmp_path / "s.json")])
  assert rc == 0
  sub = data[4:39, 3:14, 2:12].astype(np.float64)
  saved = json.loads((tmp_path / "s.json").read_text())
  assert saved["mean"] == pytest.approx(sub.mean(), abs=1e-9)
  assert saved["stddev"] == pytest.approx(sub.std(), abs=1e-9)
  assert saved["shape_zyx"] == [35, 11, 10]


def test_stats_on_the_shipped_crop_match_numpy(sample_fib25):
  """On the shipped 150^3 crop (slabs of 32 slices leave a partial last slab): numpy's figures."""
  spec = f"{sample_fib25}/training_sample2_crop.h5:raw"
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    raw = f["raw"][()]
  for box, sub in ((None, raw), (BoundingBox((10, 20, 30), (100, 90, 80)), raw[30:110, 20:110, 10:110])):
    result = stats.compute_stats(spec, box)
    values = sub.astype(np.float64)
    # sums of <= 150^3 integers <= 255 are exact in float64 (< 2^53), so the means are equal; the
    # variances sum squares in different orders: a few ulps apart
    assert result.mean == values.mean()
    assert result.stddev == pytest.approx(values.std(), rel=1e-12)
    assert (result.count, result.min, result.max) == (sub.size, int(sub.min()), int(sub.max()))
    levels, counts = np.unique(sub, return_counts=True)
    hist = np.array(result.histogram)
    np.testing.assert_array_equal(hist[levels], counts)
    assert hist.sum() == counts.sum() == sub.size


def _readme_stats(name: str) -> tuple[float, float]:
  """Mean and standard deviation that ``../shared/data/README.md`` states for ``name``'s raw."""
  text = (SHARED_DATA / "README.md").read_text()
  section = text[text.index(f"## fib25/{name}.h5"):]
  found = re.search(r"[Mm]ean ([0-9.]+), (?:standard deviation|std) ([0-9.]+)", section)
  assert found, f"no mean/std for {name} in {SHARED_DATA / 'README.md'}"
  return float(found.group(1)), float(found.group(2))


@pytest.mark.parametrize("name", ["training_sample2", "training_sample1"])
def test_stats_of_the_whole_volumes_match_the_shared_readme(fib25_dir, name):
  if not (fib25_dir / f"{name}.h5").exists():
    missing(f"needs {fib25_dir / name}.h5")
  mean, stddev = _readme_stats(name)  # stated with 2 decimals: within 0.005
  result = stats.compute_stats(f"{fib25_dir}/{name}.h5:raw")
  assert result.shape_zyx == [250, 250, 250]
  assert result.mean == pytest.approx(mean, abs=0.005)
  assert result.stddev == pytest.approx(stddev, abs=0.005)


def test_shipped_crop_is_the_stated_crop_of_training_sample2(fib25_dir, sample_fib25):
  """sample_data/fib25/README.md: x,y,z 50..199 of training_sample2, raw and body labels."""
  with h5py.File(fib25_dir / "training_sample2.h5", "r") as full, \
       h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as crop:
    for name in ("raw", "stack"):
      assert crop[name].dtype == full[name].dtype
      assert crop[name].attrs["offset_xyz"].tolist() == list(SAMPLE_OFFSET_XYZ)
      np.testing.assert_array_equal(crop[name][()], full[name][50:200, 50:200, 50:200])


def test_apply_transforms_maps_superpixels_to_bodies(tmp_path):
  sp = np.array([[[0, 1, 2], [3, 4, 5]]] * 40, dtype=np.int32)  # 40 z-slices: > one slab
  table = np.array([[1, 100], [2, 100], [3, 7], [4, 7], [4, 7]], dtype=np.int32)  # dup row is fine
  with h5py.File(tmp_path / "gt.h5", "w") as f:
    f["stack"] = sp
    f["transforms"] = table
  counters = groundtruth.convert_groundtruth(f"{tmp_path}/gt.h5:stack", f"{tmp_path}/gt.h5:transforms",
                                             f"{tmp_path}/bodies.h5:stack")
  with h5py.File(tmp_path / "bodies.h5", "r") as f:
    out = f["stack"][()]
  assert out.dtype == np.int64
  np.testing.assert_array_equal(out[7], [[0, 100, 100], [7, 7, 5]])  # 5 unmapped: kept
  assert counters == {"bodies": 3, "unmapped_superpixels": 1}
  zeroed = groundtruth.apply_transforms(sp[:1], groundtruth.validate_transforms(table, "t"), "zero")
  np.testing.assert_array_equal(zeroed[0], [[0, 100, 100], [7, 7, 0]])
  with pytest.raises(FFNError, match="not in the transforms"):
    groundtruth.apply_transforms(sp[:1], groundtruth.validate_transforms(table, "t"), "error")


def test_conflicting_transforms_rejected():
  with pytest.raises(FFNError, match="superpixel 4 is mapped to more than one body"):
    groundtruth.validate_transforms(np.array([[4, 1], [4, 2]]), "gt.h5:transforms")
  with pytest.raises(FFNError, match="shape \\[N, 2\\]"):
    groundtruth.validate_transforms(np.zeros((3, 3), np.int64), "gt.h5:transforms")


def test_cli_missing_dataset_one_line_error(tmp_path, capsys):
  with h5py.File(tmp_path / "gt.h5", "w") as f:
    f["stack"] = np.zeros((2, 2, 2), np.int32)
  rc = main(["apply_transforms", "--superpixels", f"{tmp_path}/gt.h5:stack",
             "--transforms", f"{tmp_path}/gt.h5:transforms", "--output", f"{tmp_path}/b.h5:stack"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "no dataset 'transforms'" in err[0]
  assert sorted(os.listdir(tmp_path)) == ["gt.h5"]


# -- binary masks, 16-bit label PNGs, CLAHE -------------------------------------------------------

def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether two label volumes are equal up to a one-to-one renaming of ids (0 kept as 0)."""
  pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
  return (len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
          and np.array_equal(a == 0, b == 0))


def _objects_with_membranes(labels: np.ndarray) -> np.ndarray:
  """``labels`` with every voxel that touches another id (6-neighbourhood) set to 0: the
  interiors, separated by one-voxel membranes."""
  out = labels.copy()
  for axis in range(3):
    for step in (1, -1):
      shifted = np.roll(labels, step, axis)
      edge = [slice(None)] * 3
      edge[axis] = 0 if step == 1 else -1
      shifted[tuple(edge)] = labels[tuple(edge)]
      out[shifted != labels] = 0
  return out


def test_inverted_mask_stack_converts_to_the_label_volumes_instances(tmp_path, sample_fib25, capsys):
  """A membrane-separated crop of the shipped bodies as a black-objects-on-white TIF stack:
  `ffn convert --kind mask --invert` gives back the same instances (its 6-connected objects)."""
  import tifffile
  from scipy import ndimage
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    bodies = f["stack"][:24, :40, :40]
  interiors = _objects_with_membranes(bodies)
  # The oracle (scipy, not cc3d): each interior's own 6-connected pieces (a body may fall apart).
  truth = np.zeros_like(interiors)
  next_id = 1
  for body in np.unique(interiors[interiors > 0]):
    pieces, n = ndimage.label(interiors == body, ndimage.generate_binary_structure(3, 1))
    for piece in range(1, n + 1):
      truth[pieces == piece] = next_id
      next_id += 1
  assert next_id > 10
  stack = tmp_path / "mask"
  stack.mkdir()
  for z, plane in enumerate(np.where(interiors > 0, 0, 255).astype(np.uint8)):  # objects black
    tifffile.imwrite(stack / f"m{z:03d}.tif", plane)
  assert main(["convert", "--kind", "mask", "--invert", "--threshold", "127", "--input", str(stack),
               "--output", f"{tmp_path}/gt.h5:stack"]) == 0
  with h5py.File(tmp_path / "gt.h5", "r") as f:
    out = f["stack"][()]
  assert out.dtype == np.int64 and _same_partition(out, truth)
  assert f"{next_id - 1} objects" in capsys.readouterr().out
  # ids in the order of their first voxel (z, y, x)
  first = [np.flatnonzero(out.ravel() == i)[0] for i in range(1, next_id)]
  assert first == sorted(first)


def test_mask_connectivity_and_min_size():
  from ffn.data import masks
  mask = np.zeros((4, 6, 6), bool)
  mask[0, 0, 0] = mask[1, 1, 1] = True  # corner neighbours: joined only at 26
  mask[0, 3, 3] = mask[0, 4, 4] = True  # edge neighbours: joined at 18 and 26
  mask[2:4, 0:3, 3:6] = True  # 18 voxels
  counts = {c: int(masks.instances(mask, c).max()) for c in (6, 18, 26)}
  assert counts == {6: 5, 18: 4, 26: 3}
  big_only = masks.instances(mask, 6, min_size=3)
  assert big_only.max() == 1 and (big_only == 1).sum() == 18 and not big_only[0].any()
  grey = np.array([[[0, 100, 200]]], np.uint8)
  np.testing.assert_array_equal(masks.foreground(grey, 100), [[[False, False, True]]])
  np.testing.assert_array_equal(masks.foreground(grey, 100, invert=True), [[[True, True, False]]])
  with pytest.raises(FFNError, match="--connectivity must be one of"):
    masks.instances(mask, 8)


def test_16bit_label_pngs_convert_to_int64(tmp_path):
  labels = np.random.default_rng(5).integers(0, 65536, (3, 6, 7)).astype(np.uint16)
  labels[0, 0, 0] = 65535
  _write_png_stack(tmp_path / "png16", labels)
  with Image.open(tmp_path / "png16" / "slice0.png") as im:
    assert im.mode == "I;16"  # a real 16-bit greyscale PNG
  assert main(["convert", "--kind", "labels", "--input", str(tmp_path / "png16"),
               "--output", f"{tmp_path}/l.h5:stack"]) == 0
  with h5py.File(tmp_path / "l.h5", "r") as f:
    assert f["stack"].dtype == np.int64
    np.testing.assert_array_equal(f["stack"][()], labels)


def test_preprocess_clahe_matches_skimage(tmp_path, sample_fib25):
  """`ffn preprocess --clahe` on a PNG stack of the shipped raw equals skimage's
  equalize_adapthist of each section with the same kernel / clip / bins (as uint8), and raises the
  contrast of a low-contrast section."""
  from skimage import exposure
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    raw = f["raw"][:3, :64, :80]
  raw[1] = (raw[1] // 4 + 96).astype(np.uint8)  # low contrast: values 96..159
  _write_png_stack(tmp_path / "png", raw)
  assert main(["preprocess", "--clahe", "--input", str(tmp_path / "png"),
               "--output", f"{tmp_path}/c.h5:raw", "--clahe_kernel_size", "20,16",
               "--clahe_clip_limit", "0.02", "--clahe_nbins", "128"]) == 0
  with h5py.File(tmp_path / "c.h5", "r") as f:
    out = f["raw"][()]
  assert out.dtype == np.uint8 and out.shape == raw.shape
  for z in range(3):
    want = exposure.equalize_adapthist(raw[z], kernel_size=(16, 20), clip_limit=0.02, nbins=128)
    # both round the same float64 values: identical
    np.testing.assert_array_equal(out[z], np.rint(want * 255).astype(np.uint8))
  assert out[1].std() > 1.5 * raw[1].std()


def test_preprocess_bad_input_is_one_line_and_no_output(tmp_path, capsys):
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["raw"] = np.zeros((2, 8, 8), np.float32)
  rc = main(["preprocess", "--clahe", "--input", f"{tmp_path}/v.h5:raw", "--output", f"{tmp_path}/o.h5:raw"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "float32 is not allowed" in err[0]
  assert not (tmp_path / "o.h5").exists()
