"""``ffn export``: HDF5 / TIFF / PNG round trips and the preview image."""

from __future__ import annotations

import h5py
import numpy as np
import tifffile
from PIL import Image

from ffn.cli import main
from ffn.inference import storage
from ffn.inference.export import label_colors, ortho_preview


def make_result(tmp_path) -> tuple[str, np.ndarray]:
  labels = np.zeros((4, 6, 8), np.int64)
  labels[:, :3] = 1
  labels[1:, 3:, 4:] = 300
  path = storage.segmentation_path(str(tmp_path / "res"), (2, 1, 0))
  storage.save_subvolume(labels, {}, path)
  return path, labels


def test_h5_tiff_png_roundtrip(tmp_path):
  path, labels = make_result(tmp_path)
  assert main(["export", "--segmentation", path, "--format", "h5", "--output", f"{tmp_path}/o.h5:seg"]) == 0
  with h5py.File(tmp_path / "o.h5") as f:
    assert f["seg"].dtype == np.int64
    np.testing.assert_array_equal(f["seg"][:], labels)
  assert main(["export", "--segmentation", path, "--format", "tiff", "--output", f"{tmp_path}/o.tif"]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "o.tif"), labels)
  assert main(["export", "--segmentation", path, "--format", "png", "--output", f"{tmp_path}/png"]) == 0
  planes = [np.asarray(Image.open(tmp_path / "png" / f"seg_{z:05d}.png")) for z in range(4)]
  np.testing.assert_array_equal(np.stack(planes), labels)


def test_preview_with_image(tmp_path):
  path, labels = make_result(tmp_path)
  img = tmp_path / "img.h5"
  with h5py.File(img, "w") as f:
    f["raw"] = np.arange(10 * 10 * 10, dtype=np.uint16).reshape(10, 10, 10) % 256
  out = tmp_path / "p.png"
  assert main(["export", "--segmentation", path, "--preview", str(out), "--image", f"{img}:raw"]) == 0
  rgb = np.asarray(Image.open(out))
  # xy (6x8), xz (4x8), yz (4x6) tiles side by side with 4-pixel gaps, enlarged by the smallest
  # integer factor that makes the mosaic at least 900 pixels wide (30 -> x30)
  assert rgb.shape == (6 * 30, (8 + 4 + 8 + 4 + 6) * 30, 3)


def test_preview_draws_object_boundaries_in_full_colour():
  labels = np.zeros((3, 4, 4), np.int64)
  labels[:, :2, :] = 5  # object 5 fills the upper half of every xy slice
  tile = ortho_preview(np.zeros((3, 4, 4)), labels, min_width=1)
  color = label_colors(np.array([5]))[0]
  np.testing.assert_array_equal(tile[1, 0], color)  # last row of the object: its boundary
  assert not np.array_equal(tile[0, 0], color)  # interior: tinted, not full colour
  assert np.all(tile[3, 0] == 0)  # background over a black image stays black


def test_colors_distinct_and_background_grey():
  colors = label_colors(np.array([0, 1, 2, 300]))
  assert np.all(colors[0] == 0)
  assert len({tuple(c) for c in colors[1:]}) == 3
  tile = ortho_preview(np.full((3, 3, 3), 7.0), np.zeros((3, 3, 3), np.int64))
  assert np.all(tile[:, :3, 0] == tile[:, :3, 1])  # unlabelled: grey
