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


def _ink(rgb: np.ndarray) -> np.ndarray:
  """Text/bar pixels of a white strip: any channel below mid-grey."""
  return rgb.min(axis=-1) < 128


def _text_found(strip: np.ndarray, text: str) -> bool:
  """Whether ``text``, rendered with the preview's font, appears pixel for pixel (as ink) in an
  RGB strip at some integer position."""
  from PIL import ImageDraw, ImageFont
  from numpy.lib.stride_tricks import sliding_window_view
  from ffn.inference.export import PREVIEW_FONT_PX
  font = ImageFont.load_default(size=PREVIEW_FONT_PX)
  probe = Image.new("RGB", (400, 40), "white")
  ImageDraw.Draw(probe).text((10, 10), text, fill="black", font=font)
  ink = _ink(np.asarray(probe))
  rows, cols = np.nonzero(ink)
  template = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  hay = _ink(strip)
  if hay.shape[0] < template.shape[0] or hay.shape[1] < template.shape[1]:
    return False
  windows = sliding_window_view(hay, template.shape)
  return bool(np.any(np.all(windows == template, axis=(-2, -1))))


def test_preview_pixels_labels_scale_bar_and_count(tmp_path):
  """The preview of a box at x,y,z = (7, 5, 3) of a random image, 8 x 8 x 30 nm voxels: each panel
  shows the raw slice at the box's centre (volume coordinates) where nothing is segmented, every
  object in one colour, the plane labels with the offset included, a 50 nm scale bar and the
  object count."""
  from ffn.inference.export import PREVIEW_FOOTER_PX, PREVIEW_HEADER_PX
  rng = np.random.default_rng(3)
  volume = rng.integers(0, 256, (20, 24, 30), dtype=np.uint8)
  with h5py.File(tmp_path / "img.h5", "w") as f:
    f["raw"] = volume
  nz, ny, nx = 8, 12, 14
  labels = np.zeros((nz, ny, nx), np.int64)
  labels[:, 0:5, 0:6] = 1
  labels[2:, 6:12, 2:9] = 300
  labels[:5, 2:10, 10:14] = 2**40 + 1
  path = storage.segmentation_path(str(tmp_path / "res"), (3, 5, 7))  # corner z,y,x
  storage.save_subvolume(labels, {}, path)
  out = tmp_path / "p.png"
  assert main(["export", "--segmentation", path, "--preview", str(out), "--image", f"{tmp_path}/img.h5:raw",
               "--resolution", "8,8,30"]) == 0
  rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
  s = 19  # smallest integer zoom making (14 + 4 + 14 + 4 + 12) voxels at least 900 pixels wide
  assert rgb.shape == (PREVIEW_HEADER_PX + 12 * s + PREVIEW_FOOTER_PX, 48 * s, 3)
  # panel -> (column of its first pixel, its labels (rows, columns), the raw slice it shows); the
  # centre slices z = 3 + 4 = 7, y = 5 + 6 = 11, x = 7 + 7 = 14 in volume coordinates
  box = volume[3:11, 5:17, 7:21]
  panels = {"xy at z=7": (0, labels[4], box[4]),
            "xz at y=11": (18 * s, labels[:, 6, :], box[:, 6, :]),
            "yz at x=14": (36 * s, labels[:, :, 7], box[:, :, 7])}
  tints = {}
  for name, (col0, lab, raw) in panels.items():
    # the centre pixel of every voxel's s x s block
    r = PREVIEW_HEADER_PX + np.arange(lab.shape[0]) * s + s // 2
    c = col0 + np.arange(lab.shape[1]) * s + s // 2
    centres = rgb[r][:, c]
    grey = centres.mean(axis=-1)
    empty = lab == 0
    assert np.all(centres[empty].max(axis=-1) == centres[empty].min(axis=-1)), name  # grey
    assert np.corrcoef(grey[empty], raw[empty])[0, 1] > 0.99, name  # contrast-stretched raw
    for ident in np.unique(lab[lab != 0]):
      m = lab == ident
      tint = np.stack([centres[m][:, 0] - centres[m][:, 1], centres[m][:, 1] - centres[m][:, 2]], -1)
      # 60% grey + 40% colour, truncated to uint8: the grey cancels in R-G and G-B up to +-1
      assert np.ptp(tint, axis=0).max() <= 2, (name, ident)
      tints.setdefault(int(ident), []).append(np.median(tint, axis=0))
      assert np.corrcoef(grey[m], raw[m])[0, 1] > 0.95, (name, ident)  # the image shows through
    header = rgb[:PREVIEW_HEADER_PX, col0:col0 + 17 * s]
    assert _text_found(header, name), name
  assert not _text_found(rgb[:PREVIEW_HEADER_PX], "xy at z=4")  # box-relative: wrong
  assert sorted(tints) == [1, 300, 2**40 + 1]
  for ident, seen in tints.items():  # the same colour in every panel
    assert np.ptp(np.array(seen), axis=0).max() <= 1, ident
  assert len({tuple(np.round(seen[0])) for seen in tints.values()}) == 3  # distinct colours
  footer = rgb[-PREVIEW_FOOTER_PX:]
  # scale bar: the xy panel is 14 voxels x 8 nm = 112 nm wide; the largest 1-2-5 length within half
  # of it is 50 nm = 6.25 voxels = 118.75 -> 119 pixels, a black bar under the xy panel
  bar_rows = [row for row in _ink(footer) if row[:14 * s].sum() >= 100]
  assert bar_rows and all(row[:14 * s].sum() == 119 for row in bar_rows), [r[:14 * s].sum() for r in bar_rows]
  assert _text_found(footer[:, :14 * s], "50 nm")
  assert _text_found(footer, "voxel 8 x 8 x 30 nm (x, y, z)")
  assert _text_found(footer, "3 objects")


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


def _read_precomputed(layer_dir):
  """Reassembles a raw-encoded precomputed layer into a z,y,x array (test-side reader); chunk
  names are absolute voxel ranges x0-x1_y0-y1_z0-z1, so the scale's voxel_offset is subtracted."""
  import json
  info = json.loads((layer_dir / "info").read_text())
  scale = info["scales"][0]
  sx, sy, sz = scale["size"]
  ox, oy, oz = scale["voxel_offset"]
  dtype = np.dtype(info["data_type"]).newbyteorder("<")
  out = np.zeros((sz, sy, sx), dtype)
  for chunk in (layer_dir / scale["key"]).iterdir():
    (x0, x1), (y0, y1), (z0, z1) = [map(int, r.split("-")) for r in chunk.name.split("_")]
    block = np.frombuffer(chunk.read_bytes(), dtype).reshape(z1 - z0, y1 - y0, x1 - x0)
    out[z0 - oz:z1 - oz, y0 - oy:y1 - oy, x0 - ox:x1 - ox] = block
  return info, out


def _export_precomputed(tmp_path, seed: int, *flags: str):
  """Random 64-bit labels and a uint8 image (z,y,x, more than one chunk) exported to ``view``."""
  labels = np.random.default_rng(seed).integers(0, 2**40, (70, 5, 66), dtype=np.int64)
  image = np.random.default_rng(seed + 1).integers(0, 255, (70, 5, 66), dtype=np.uint8)
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["seg"] = labels
    f["raw"] = image
  out = tmp_path / "view"
  assert main(["export", "--segmentation", f"{tmp_path}/v.h5:seg", "--format", "precomputed",
               "--output", str(out), "--image", f"{tmp_path}/v.h5:raw", *flags]) == 0
  return labels, image, out


def test_precomputed_export_round_trip(tmp_path, capsys):
  labels, image, out = _export_precomputed(tmp_path, 0, "--resolution", "8,8,30")
  info, seg = _read_precomputed(out / "segmentation")
  assert info["type"] == "segmentation" and info["data_type"] == "uint64"
  assert info["scales"][0]["size"] == [66, 5, 70] and info["scales"][0]["resolution"] == [8, 8, 30]
  np.testing.assert_array_equal(seg, labels)
  info, img = _read_precomputed(out / "image")
  assert info["type"] == "image" and info["data_type"] == "uint8"
  np.testing.assert_array_equal(img, image)
  assert "precomputed://http://localhost:8000/segmentation" in capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["v.h5", "view"]  # no temporary folders left


def test_precomputed_export_reads_back_with_tensorstore(tmp_path):
  """Google's own precomputed reader (tensorstore) opens both layers and returns our arrays."""
  import tensorstore as ts
  labels, image, out = _export_precomputed(tmp_path, 2)
  for layer, expected, dtype in (("segmentation", labels, "uint64"), ("image", image, "uint8")):
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/{layer}"}).result()
    assert store.domain.labels == ("x", "y", "z", "channel")
    assert store.dtype.name == dtype
    xyzc = store.read().result()
    np.testing.assert_array_equal(xyzc[..., 0].transpose(2, 1, 0), expected.astype(dtype))


def _export_precomputed_at_offset(tmp_path, corner_xyz=(7, 130, 65)):
  """A seg-x_y_z.npz result at ``corner_xyz`` (z,y,x shape (70, 5, 66): two chunks along x and
  z, the last ones partial) and the image volume it was cut from, exported to ``view``."""
  rng = np.random.default_rng(6)
  cx, cy, cz = corner_xyz
  labels = rng.integers(0, 2**40, (70, 5, 66), dtype=np.int64)
  volume = rng.integers(0, 255, (cz + 75, cy + 9, cx + 70), dtype=np.uint8)
  with h5py.File(tmp_path / "raw.h5", "w") as f:
    f["raw"] = volume
  path = storage.segmentation_path(str(tmp_path / "res"), (cz, cy, cx))
  storage.save_subvolume(labels, {}, path)
  out = tmp_path / "view"
  assert main(["export", "--segmentation", path, "--format", "precomputed", "--output", str(out),
               "--image", f"{tmp_path}/raw.h5:raw"]) == 0
  image = volume[cz:cz + 70, cy:cy + 5, cx:cx + 66]
  return labels, image, out


def test_precomputed_export_at_an_offset_reads_back_with_tensorstore(tmp_path):
  """A box that does not start at 0 (like the demo's): chunk files carry absolute voxel ranges,
  so a reader that honours voxel_offset (tensorstore, Neuroglancer) finds every chunk."""
  import tensorstore as ts
  corner = (7, 130, 65)
  labels, image, out = _export_precomputed_at_offset(tmp_path, corner)
  names = sorted(p.name for p in (out / "segmentation" / "10_10_10").iterdir())
  assert names == sorted(["7-71_130-135_65-129", "7-71_130-135_129-135",
                          "71-73_130-135_65-129", "71-73_130-135_129-135"])
  for layer, expected, dtype in (("segmentation", labels, "uint64"), ("image", image, "uint8")):
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/{layer}"}).result()
    assert list(store.domain.origin[:3]) == list(corner)
    assert list(store.domain.exclusive_max[:3]) == [7 + 66, 130 + 5, 65 + 70]
    xyzc = store.read().result()
    np.testing.assert_array_equal(xyzc[..., 0].transpose(2, 1, 0), expected.astype(dtype))


def test_serve_sends_cors_header(tmp_path):
  import functools
  import http.server
  import threading
  import urllib.request
  from ffn.inference.serve import CORSRequestHandler
  (tmp_path / "info").write_text("{}")
  handler = functools.partial(CORSRequestHandler, directory=str(tmp_path))
  with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/info", timeout=10) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*" and r.read() == b"{}"
    finally:
      server.shutdown()


def test_neuroglancer_link_opens_every_exported_layer(tmp_path):
  import json
  import urllib.parse
  from ffn.inference.serve import NEUROGLANCER_CLIENT, neuroglancer_url, precomputed_layers
  _, _, out = _export_precomputed(tmp_path, 4)
  (out / "notes").mkdir()  # a folder without an info file is not a layer
  layers = precomputed_layers(str(out))
  assert layers == [("image", "image"), ("segmentation", "segmentation")]
  url = neuroglancer_url("http://localhost:8000/", layers)
  assert url.startswith(NEUROGLANCER_CLIENT + "#!")
  state = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
  assert [(layer["name"], layer["type"], layer["source"]) for layer in state["layers"]] == [
      ("image", "image", "precomputed://http://localhost:8000/image"),
      ("segmentation", "segmentation", "precomputed://http://localhost:8000/segmentation")]


def test_serve_on_a_busy_port_is_a_one_line_error(tmp_path, capsys):
  import socket
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_serve_local_client_on_a_busy_port_is_a_one_line_error(tmp_path, capsys):
  import socket
  _, _, out = _export_precomputed(tmp_path, 8)
  capsys.readouterr()
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    assert main(["serve", str(out), "--port", "0", "--client", "local", "--client_port", str(port)]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert len(err.splitlines()) == 1 and f"--client local: cannot listen on 127.0.0.1:{port}" in err
  assert captured.out == ""  # no "serving ..." line for a server that does not start


def test_png_export_replaces_a_longer_stack_and_refuses_a_folder_with_other_files(tmp_path, capsys):
  """A second, shorter export leaves exactly its own slices (the old code kept the earlier
  export's extra slices); a folder holding anything else is refused, untouched."""
  long_seg = np.arange(6 * 3 * 4, dtype=np.int64).reshape(6, 3, 4)
  short_seg = long_seg[:4] + 1000
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["long"], f["short"] = long_seg, short_seg
  out = tmp_path / "png"
  for name in ("long", "short"):
    assert main(["export", "--segmentation", f"{tmp_path}/v.h5:{name}", "--format", "png",
                 "--output", str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == [f"seg_{z:05d}.png" for z in range(4)]
  np.testing.assert_array_equal(np.stack([np.asarray(Image.open(out / f"seg_{z:05d}.png"))
                                          for z in range(4)]), short_seg)
  (out / "notes.txt").write_text("mine")
  before = sorted(p.name for p in out.iterdir())
  assert main(["export", "--segmentation", f"{tmp_path}/v.h5:long", "--format", "png",
               "--output", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "notes.txt" in err[0] and "refusing to replace" in err[0]
  assert sorted(p.name for p in out.iterdir()) == before


def test_precomputed_reexport_without_image_drops_the_stale_image_layer(tmp_path):
  """The export folder is replaced as a whole: exporting again without --image leaves no image
  layer of the earlier export beside the new segmentation (the old code kept it)."""
  labels, _, out = _export_precomputed(tmp_path, 6)
  assert main(["export", "--segmentation", f"{tmp_path}/v.h5:seg", "--format", "precomputed",
               "--output", str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["segmentation"]
  np.testing.assert_array_equal(_read_precomputed(out / "segmentation")[1], labels)
  assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
