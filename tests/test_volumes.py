"""Volume specs, lazy reads, slice stacks and atomic writes."""

import os

import h5py
import numpy as np
import pytest
from PIL import Image

from ffn.axes import BoundingBox, parse_xyz, xyz_to_zyx, zyx_to_xyz
from ffn.errors import FFNError
from ffn.io import volumes


def test_axis_helpers_reverse_order():
  assert xyz_to_zyx((1, 2, 3)) == (3, 2, 1)
  assert zyx_to_xyz((3, 2, 1)) == (1, 2, 3)
  assert parse_xyz("24,24,24") == (24, 24, 24)
  assert parse_xyz("5") == (5, 5, 5)
  with pytest.raises(FFNError, match="expected 3 integers"):
    parse_xyz("1,2")


def test_bounding_box_slices_index_zyx_arrays():
  vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # z=4, y=5, x=6
  box = BoundingBox(start=(1, 2, 3), size=(2, 3, 1))  # x,y,z
  np.testing.assert_array_equal(vol[box.to_slices()], vol[3:4, 2:5, 1:3])
  assert box.shape_zyx() == (1, 3, 2)


@pytest.mark.parametrize("spec,expected", [
    ("a.h5:raw", volumes.VolumeSpec("a.h5", "raw")),
    ("vol1:a.h5:raw", volumes.VolumeSpec("a.h5", "raw", "vol1")),
    ("slices/", volumes.VolumeSpec("slices/")),
])
def test_parse_spec(spec, expected):
  assert volumes.parse_spec(spec) == expected
  assert str(volumes.parse_spec(spec)) == spec


def test_parse_named_specs_rejects_duplicates_and_missing_names():
  specs = volumes.parse_named_specs("a:x.h5:raw,b:y.h5:raw")
  assert list(specs) == ["a", "b"] and specs["b"].path == "y.h5"
  with pytest.raises(FFNError, match="given twice"):
    volumes.parse_named_specs("a:x.h5:raw,a:y.h5:raw")
  with pytest.raises(FFNError, match="name is required"):
    volumes.parse_named_specs("x.h5:raw")


def test_h5_box_read_matches_numpy(tmp_path):
  data = np.random.default_rng(0).integers(0, 255, (20, 30, 40), dtype=np.uint8)
  volumes.write_h5(str(tmp_path / "v.h5"), "raw", data)
  box = BoundingBox((5, 6, 7), (10, 11, 12))
  with volumes.Volume(f"{tmp_path}/v.h5:raw") as vol:
    assert vol.shape == (20, 30, 40)
    np.testing.assert_array_equal(vol.read_box(box), data[7:19, 6:17, 5:15])
    with pytest.raises(FFNError, match="outside the volume"):
      vol.read_box(BoundingBox((35, 0, 0), (10, 1, 1)))


def test_write_h5_keeps_other_datasets_and_leaves_no_temp_files(tmp_path):
  path = str(tmp_path / "v.h5")
  volumes.write_h5(path, "raw", np.zeros((2, 2, 2), np.uint8))
  volumes.write_h5(path, "stack", np.ones((2, 2, 2), np.int64), attrs={"note": "x"})
  with h5py.File(path, "r") as f:
    assert set(f) == {"raw", "stack"} and f["stack"].attrs["note"] == "x"
  assert os.listdir(tmp_path) == ["v.h5"]


def test_failed_write_leaves_original_intact(tmp_path):
  path = str(tmp_path / "v.h5")
  volumes.write_h5(path, "raw", np.zeros((2, 2, 2), np.uint8))
  before = open(path, "rb").read()
  with pytest.raises(TypeError):
    volumes.write_h5(path, "bad", np.array([object()], dtype=object).reshape(1, 1, 1))
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["v.h5"]


@pytest.mark.parametrize("bad,message", [
    ("missing.h5:raw", "file not found"),
    ("{tmp}/v.h5:nope", "no dataset 'nope' \\(datasets: raw\\)"),
    ("{tmp}/v.h5", "needs a dataset name"),
    ("{tmp}/empty_dir", "no PNG/TIFF slices"),
])
def test_bad_specs_give_clear_errors(tmp_path, bad, message):
  volumes.write_h5(str(tmp_path / "v.h5"), "raw", np.zeros((2, 2, 2), np.uint8))
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(FFNError, match=message):
    volumes.Volume(bad.format(tmp=tmp_path))


def test_png_stack_natural_order_and_lazy_slices(tmp_path):
  data = np.random.default_rng(1).integers(0, 255, (12, 9, 7), dtype=np.uint8)
  for z in range(12):  # unpadded names: natural order must put 2 before 10
    Image.fromarray(data[z]).save(tmp_path / f"iso.{z}.png")
  with volumes.Volume(str(tmp_path)) as vol:
    assert vol.shape == (12, 9, 7) and vol.dtype == np.uint8
    np.testing.assert_array_equal(vol[2:11, 1:4, 2:6], data[2:11, 1:4, 2:6])
    np.testing.assert_array_equal(vol.read_all(), data)
  with volumes.Volume(str(tmp_path / "iso.*.png")) as vol:
    np.testing.assert_array_equal(vol[10], data[10])


def test_multipage_tiff(tmp_path):
  import tifffile
  data = np.random.default_rng(2).integers(0, 255, (5, 6, 7), dtype=np.uint8)
  tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack")
  with volumes.Volume(str(tmp_path / "v.tif")) as vol:
    assert vol.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol[1:4, :, 3:], data[1:4, :, 3:])


def test_check_dtype_message():
  with pytest.raises(FFNError, match="x.h5:raw: dtype float32 is not allowed here \\(expected unsigned"):
    volumes.check_dtype("x.h5:raw", np.dtype(np.float32), "u")


def test_atomic_writes_get_umask_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    volumes.write_h5(str(tmp_path / "v.h5"), "raw", np.zeros((2, 2, 2), np.uint8))
  finally:
    os.umask(old)
  assert (tmp_path / "v.h5").stat().st_mode & 0o777 == 0o644


def test_read_h5_box_corner_channels_and_outside(tmp_path):
  from ffn.io.volumes import read_h5_box, read_label_box
  data = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["v"] = data
    f["neg"] = -np.ones((2, 2, 2), np.int32)
  spec = f"{tmp_path}/v.h5:v"
  np.testing.assert_array_equal(read_h5_box(spec, (1, 2, 3), (2, 2, 2)), data[0, 1:3, 2:4, 3:5])
  out = read_h5_box(spec, (3, 4, 5), (2, 2, 2), channels=2, fill_outside=True)
  assert out.shape == (2, 2, 2, 2) and out[1, 0, 0, 0] == data[1, 3, 4, 5] and out[1, 1, 1, 1] == 0
  with pytest.raises(FFNError, match=r"does not cover the box at \[5, 4, 3\]"):
    read_h5_box(spec, (3, 4, 5), (2, 2, 2), what="shift_mask")
  with pytest.raises(FFNError, match=r"at least 3 channels"):
    read_h5_box(spec, (0, 0, 0), (1, 1, 1), channels=3)
  with pytest.raises(FFNError, match=r"no dataset 'w'.*\(init_segmentation\)"):
    read_label_box(f"{tmp_path}/v.h5:w", (0, 0, 0), (1, 1, 1), what="init_segmentation")
  with pytest.raises(FFNError, match="negative ids"):
    read_label_box(f"{tmp_path}/v.h5:neg", (0, 0, 0), (2, 2, 2))


def _open_fds_to(path) -> int:
  target = os.path.realpath(path)
  count = 0
  for fd in os.listdir("/proc/self/fd"):
    try:
      count += os.path.realpath(f"/proc/self/fd/{fd}") == target
    except OSError:
      pass
  return count


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5, 6), (7,)])
def test_non_3d_hdf5_dataset_is_one_ffnerror_and_closes_the_file(tmp_path, shape):
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["raw"] = np.zeros(shape, np.uint8)
  with pytest.raises(FFNError, match=rf"v.h5:raw: expected a 3D \(z,y,x\) volume, got shape "
                                     rf"\[{', '.join(map(str, shape))}\]"):
    volumes.Volume(f"{tmp_path}/v.h5:raw")
  assert _open_fds_to(tmp_path / "v.h5") == 0


def test_4d_hdf5_needs_channels_and_reads_channel_first(tmp_path):
  data = np.arange(3 * 4 * 5 * 6, dtype=np.int32).reshape(3, 4, 5, 6)  # channel,z,y,x
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["v"] = data
  spec = f"{tmp_path}/v.h5:v"
  with pytest.raises(FFNError, match=r"expected a 3D \(z,y,x\) volume, got shape \[3, 4, 5, 6\]"):
    volumes.Volume(spec)
  with volumes.Volume(spec, channels=True) as vol:
    assert vol.shape == (4, 5, 6) and vol.num_channels == 3
    np.testing.assert_array_equal(vol[1:3, :, 2], data[0, 1:3, :, 2])
    np.testing.assert_array_equal(vol.read_channels(slice(1, 3), (slice(0, 2),) * 3), data[1:3, :2, :2, :2])
  with volumes.Volume(volumes.VolumeSpec(f"{tmp_path}/v.h5", "v", channel=2)) as vol:
    np.testing.assert_array_equal(vol.read_all(), data[2])
  with pytest.raises(FFNError, match="no channel 3 \\(the volume has 3"):
    volumes.Volume(volumes.VolumeSpec(f"{tmp_path}/v.h5", "v", channel=3))


def test_empty_volume_is_refused(tmp_path):
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["raw"] = np.zeros((0, 4, 4), np.uint8)
  with pytest.raises(FFNError, match=r"v.h5:raw: the volume is empty \(shape \[4, 4, 0\]"):
    volumes.Volume(f"{tmp_path}/v.h5:raw")


def test_tiff_with_colour_pages_is_refused_and_closed(tmp_path):
  import tifffile
  tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((2, 4, 5, 3), np.uint8), photometric="rgb")
  with pytest.raises(FFNError, match="rgb.tif: expected a single-channel 2D slice, got shape \\(4, 5, 3\\)"):
    volumes.Volume(str(tmp_path / "rgb.tif"))
  assert _open_fds_to(tmp_path / "rgb.tif") == 0


def _write_tensorstore(spec: dict, data: np.ndarray) -> None:
  import tensorstore as ts
  ts.open(spec, create=True).result()[...] = data


def test_tensorstore_specs_read_lazily_like_hdf5(tmp_path):
  from ffn.io import tensorstore_volumes as tv
  data = np.random.default_rng(3).integers(0, 255, (6, 7, 8), dtype=np.uint8)  # z,y,x
  _write_tensorstore({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a.zarr")},
                      "metadata": {"dtype": "|u1", "shape": [6, 7, 8], "chunks": [3, 3, 3]}}, data)
  _write_tensorstore({"driver": "n5", "kvstore": {"driver": "file", "path": str(tmp_path / "a.n5")},
                      "metadata": {"dataType": "uint8", "dimensions": [6, 7, 8], "blockSize": [3, 3, 3],
                                   "compression": {"type": "raw"}}}, data)
  layer = tv.parse_labels_spec(f"precomputed://{tmp_path}/p")
  tv.create_labels(layer, tv.LabelsLayout((6, 7, 8), offset_zyx=(10, 20, 30), chunk_zyx=(4, 4, 4)))
  tv.LabelsWriter(layer).write((10, 20, 30), data.astype(np.uint64))
  json_spec = '{"driver": "zarr", "kvstore": "file://%s/a.zarr"}' % tmp_path
  box = BoundingBox((1, 2, 3), (5, 4, 2))  # x,y,z
  for spec in (f"zarr://{tmp_path}/a.zarr", f"n5://{tmp_path}/a.n5", f"precomputed://{tmp_path}/p",
               json_spec, f"vol1:zarr://{tmp_path}/a.zarr"):
    with volumes.Volume(spec) as vol:
      assert vol.shape == (6, 7, 8), spec
      np.testing.assert_array_equal(vol.read_box(box), data[3:5, 2:6, 1:6])
      with pytest.raises(FFNError, match="outside the volume"):
        vol.read_box(BoundingBox((0, 0, 0), (9, 1, 1)))
  assert volumes.parse_spec(f"vol1:zarr://{tmp_path}/a.zarr").name == "vol1"
  np.testing.assert_array_equal(volumes.read_h5_box(f"zarr://{tmp_path}/a.zarr", (5, 6, 7), (2, 2, 2),
                                                    fill_outside=True)[0, 0], [data[5, 6, 7], 0])


@pytest.mark.parametrize("spec,message", [
    ("zarr://{tmp}/none.zarr", "none.zarr: file or directory not found"),
    ("gs3://bucket/x", "unknown scheme 'gs3://'"),
    ("zarr://", "no path after zarr://"),
    ('{"driver": "zarr", "kvstore"', "not valid JSON"),
    ("zarr://{tmp}", "cannot open as a TensorStore volume"),
])
def test_bad_tensorstore_specs_are_one_line(tmp_path, spec, message):
  with pytest.raises(FFNError, match=message) as e:
    volumes.Volume(spec.replace("{tmp}", str(tmp_path)))
  assert "\n" not in str(e.value)


def test_tensorstore_inputs_through_the_commands(tmp_path, sample_fib25, capsys):
  """`ffn stats` and `ffn evaluate` read zarr://, n5:// and precomputed:// inputs exactly as HDF5."""
  from ffn.cli import main
  from ffn.io import tensorstore_volumes as tv
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    raw, stack = f["raw"][:40, :40, :40], f["stack"][:40, :40, :40]
  volumes.write_h5(str(tmp_path / "v.h5"), "raw", raw)
  volumes.write_h5(str(tmp_path / "v.h5"), "stack", stack)
  _write_tensorstore({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "raw.zarr")},
                      "metadata": {"dtype": "|u1", "shape": [40, 40, 40], "chunks": [16, 16, 16]}}, raw)
  _write_tensorstore({"driver": "n5", "kvstore": {"driver": "file", "path": str(tmp_path / "raw.n5")},
                      "metadata": {"dataType": "uint8", "dimensions": [40, 40, 40], "blockSize": [16, 16, 16],
                                   "compression": {"type": "gzip"}}}, raw)
  layer = tv.parse_labels_spec(f"precomputed://{tmp_path}/gt")
  tv.create_labels(layer, tv.LabelsLayout((40, 40, 40), chunk_zyx=(16, 16, 16)))
  tv.LabelsWriter(layer).write((0, 0, 0), stack.astype(np.uint64))
  outputs = []
  for spec in (f"{tmp_path}/v.h5:raw", f"zarr://{tmp_path}/raw.zarr", f"n5://{tmp_path}/raw.n5"):
    assert main(["stats", "--input", spec]) == 0
    outputs.append(capsys.readouterr().out.split(": ", 1)[1])
  assert outputs[0] == outputs[1] == outputs[2] and "64000 voxels" in outputs[0]
  scores = []
  for gt in (f"{tmp_path}/v.h5:stack", f"precomputed://{tmp_path}/gt"):
    assert main(["evaluate", "--segmentation", f"{tmp_path}/v.h5:stack", "--groundtruth", gt]) == 0
    scores.append(capsys.readouterr().out)
  assert scores[0] == scores[1] and "0.0000" in scores[0]  # a segmentation scored against itself
