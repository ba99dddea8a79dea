"""A real viewer: ``ffn export --format precomputed`` -> ``ffn serve --client local`` -> Neuroglancer
in headless Chromium, checked on the screenshot's pixels.

Everything runs on 127.0.0.1: ``ffn serve`` serves the exported folder and, with ``--client local``,
the Neuroglancer client bundled in the ``neuroglancer`` Python package (test extra). Chromium
(Debian's ``chromium``; ``run_tests.sh`` installs it as root) is driven over the DevTools protocol
on a pipe (``tests/browser.py``), WebGL rendered by SwiftShader on the CPU. The page's
``viewer.display.isReady()`` (Neuroglancer's own "every visible chunk is loaded" flag) and two
identical consecutive screenshots mark the end of loading.

Checks on the xy panel (top left of the 4-panel layout), located by the yellow outline that
Neuroglancer draws around a layer's bounds:

* the EM: Pearson r between the screenshot's grey level and the raw slice at the viewed z
  (``floor`` of the viewer's position, in volume voxels, i.e. including the box offset), after
  subtracting each object's mean from both (the 50% segment tint adds a constant per object);
  a slice 8 voxels away must correlate clearly worse, so this is the viewed slice, not any EM;
* the segment colours: where the segmentation is non-zero the tint (R-G, G-B) is that object's
  colour (constant over the object whatever the EM under it: the grey adds equally to R, G, B)
  and equals ``alpha * (colour_R - colour_G, colour_G - colour_B)`` for Neuroglancer's own colour
  of the id (``neuroglancer.segment_colors``, the Python copy of the viewer's hash); where it is
  zero the pixel is grey and equals the raw value.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from PIL import Image

from browser import Browser, browser  # noqa: F401 (browser: the fixture)
from conftest import REPO_ROOT, SAMPLE_CROP
from ffn.cli import main
from ffn.inference import storage

LOAD_TIMEOUT_S = 120.0  # bounded wait for the viewer to load (~5 s per view on an idle 2-core machine)


@contextmanager
def ffn_serve(directory: Path) -> Iterator[str]:
  """Runs ``ffn serve DIRECTORY --port 0 --client local`` and yields the viewer link it prints
  (its request log goes to ``DIRECTORY.log``)."""
  log = open(f"{directory}.log", "wb")
  proc = subprocess.Popen([sys.executable, "-c", "import sys; from ffn.cli import main; sys.exit(main())",
                           "serve", str(directory), "--port", "0", "--client", "local"],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log)
  try:
    deadline, out = time.monotonic() + 60, b""
    while b"open in Neuroglancer" not in out or not out.endswith(b"\n"):
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
        raise TimeoutError(f"ffn serve printed no link within 60 s: {out!r}")
      chunk = os.read(proc.stdout.fileno(), 1 << 16)
      if not chunk:
        raise RuntimeError(f"ffn serve exited: {out!r} (log: {log.name})")
      out += chunk
    lines = out.decode().splitlines()
    assert lines[0].startswith(f"serving {directory} at http://localhost:")
    url = lines[-1].split(": ", 1)[1]
    assert url.startswith("http://127.0.0.1:") and "/v/" in url  # the local client, not the internet
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def load_view(browser: Browser, url: str) -> tuple[np.ndarray, dict]:
  """Opens ``url``, waits until every visible chunk is drawn; returns (screenshot, viewer state)."""
  browser.call("Page.navigate", url=url)
  deadline, previous = time.monotonic() + LOAD_TIMEOUT_S, None
  while time.monotonic() < deadline:
    time.sleep(1.0)
    ready = browser.evaluate("typeof viewer !== 'undefined' && viewer.layerManager.managedLayers.length"
                             " === 2 && viewer.display.isReady()")
    shot = browser.screenshot()
    if ready and previous is not None and np.array_equal(shot, previous) and xy_box(shot) is not None:
      state = json.loads(browser.evaluate("JSON.stringify(viewer.state.toJSON())"))
      return shot, state
    previous = shot if ready else None
  raise TimeoutError(f"Neuroglancer did not finish loading {url} within {LOAD_TIMEOUT_S:.0f} s")


def xy_box(shot: np.ndarray) -> tuple[int, int, int, int] | None:
  """(row0, row1, col0, col1), inclusive, of the yellow bounds outline in the top-left (xy) panel."""
  h, w, _ = shot.shape
  panel = shot[: h // 2, : w // 2].astype(int)
  yellow = (panel[..., 0] > 200) & (panel[..., 1] > 200) & (panel[..., 2] < 60)
  rows, cols = np.nonzero(yellow.sum(axis=1) > 20)[0], np.nonzero(yellow.sum(axis=0) > 20)[0]
  if len(rows) < 2 or len(cols) < 2:
    return None
  return rows[0], rows[-1], cols[0], cols[-1]


def xy_panel_voxels(shot: np.ndarray, size_yx: tuple[int, int]) -> np.ndarray:
  """The xy panel's pixels inside the outline, one per voxel of the box, as float RGB of shape
  (ny, nx, 3), at Neuroglancer's default zoom (``crossSectionScale`` 1: one voxel per pixel): the
  outline's first line is on the pixels before the box's first voxel, its last line on the one
  or two pixels after the box's last voxel."""
  r0, r1, c0, c1 = xy_box(shot)
  ny, nx = size_yx
  assert r1 - (r0 + 1 + ny) in (0, 1) and c1 - (c0 + 1 + nx) in (0, 1), ((r0, r1, c0, c1), size_yx)
  return shot[r0 + 1:r0 + 1 + ny, c0 + 1:c0 + 1 + nx].astype(np.float64)


def residual_r(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
  """Pearson r of ``a`` and ``b`` after subtracting each label's mean from each."""
  a, b = a.astype(np.float64).copy(), b.astype(np.float64).copy()
  for label in np.unique(labels):
    m = labels == label
    a[m] -= a[m].mean()
    b[m] -= b[m].mean()
  return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def segment_tint(segment_id: int, color_seed: int, alpha: float) -> np.ndarray:
  """(R-G, G-B) that Neuroglancer's colour for ``segment_id`` adds at opacity ``alpha``."""
  from neuroglancer.segment_colors import hex_string_from_segment_id
  hexa = hex_string_from_segment_id(color_seed, segment_id)
  r, g, b = (int(hexa[i:i + 2], 16) for i in (1, 3, 5))
  return alpha * np.array([r - g, g - b], np.float64)


def check_view(shot: np.ndarray, state: dict, raw_zyx: np.ndarray, labels: np.ndarray,
               box_start_xyz: tuple[int, int, int]) -> dict:
  """Asserts what the module docstring says on a screenshot of a box exported at
  ``box_start_xyz`` (``raw_zyx`` is the whole image volume, ``labels`` the box's segmentation)."""
  x0, y0, z0 = box_start_xyz
  nz, ny, nx = labels.shape
  # Neuroglancer's default position: the centre of the middle voxel of the layer's bounds, in
  # volume coordinates (voxel i spans [i, i + 1))
  position = state["position"]
  assert position == [math.floor(s + n / 2) + 0.5 for s, n in ((x0, nx), (y0, ny), (z0, nz))]
  z = math.floor(position[2])
  assert state["crossSectionScale"] == 1
  pixels = xy_panel_voxels(shot, (ny, nx))
  inner = (slice(3, -3), slice(3, -3))  # the outline covers the box's edge voxels
  grey, lab = pixels.mean(axis=-1)[inner], labels[z - z0][inner]

  def em(zz: int) -> np.ndarray:
    return raw_zyx[zz, y0:y0 + ny, x0:x0 + nx][inner].astype(np.float64)

  r_viewed = residual_r(grey, em(z), lab)
  r_away = max(residual_r(grey, em(zz), lab) for zz in (z - 8, z + 8))
  assert r_viewed > 0.8 and r_viewed > r_away + 0.2, (r_viewed, r_away)

  seg_layer = next(layer for layer in state["layers"] if layer["type"] == "segmentation")
  alpha, seed = seg_layer.get("selectedAlpha", 0.5), seg_layer.get("colorSeed", 0)
  rgb = pixels[inner]
  tint = np.stack([rgb[..., 0] - rgb[..., 1], rgb[..., 1] - rgb[..., 2]], axis=-1)
  ids = [int(i) for i in np.unique(lab) if i != 0]
  for segment_id in ids:
    m = lab == segment_id
    if m.sum() < 30:
      continue  # a sliver: too few pixels away from its edges to judge
    # within an object the tint is constant up to 8-bit rounding (+-1 per channel, so +-2 in a
    # difference) and blending of boundary pixels: the median is exact, 90% of pixels within 3
    expected = segment_tint(segment_id, seed, alpha)
    np.testing.assert_allclose(np.median(tint[m], axis=0), expected, atol=3)
    assert np.mean(np.all(np.abs(tint[m] - expected) <= 3, axis=-1)) > 0.9, segment_id
  zero = lab == 0
  if zero.any():  # unsegmented: plain grey, the raw value (uint8 shown over its full range)
    assert np.mean(np.abs(tint[zero]).max(axis=-1) <= 2) > 0.95
    assert np.mean(np.abs(grey[zero] - em(z)[zero]) <= 2) > 0.95
  return {"r_viewed": r_viewed, "r_away": r_away, "objects": len(ids)}


def _record(shot: np.ndarray, name: str) -> None:
  """Keeps the screenshot for a human to look at when FFN_VIEWER_SHOTS names a folder."""
  folder = os.environ.get("FFN_VIEWER_SHOTS")
  if folder:
    Image.fromarray(shot).save(os.path.join(folder, name))


def test_export_at_an_offset_shows_in_neuroglancer(tmp_path, browser):
  """A synthetic box at x,y,z = (70, 9, 130) (not chunk-aligned, several chunks): smooth random EM,
  rectangles of 64-bit ids on a zero background."""
  from scipy.ndimage import gaussian_filter
  rng = np.random.default_rng(17)
  corner_xyz, shape_zyx = (70, 9, 130), (24, 80, 90)
  noise = gaussian_filter(rng.normal(size=(160, 100, 170)), 1.5)
  raw = np.clip(128 + noise / noise.std() * 50, 0, 255).astype(np.uint8)
  labels = np.zeros(shape_zyx, np.int64)
  labels[:, 5:40, 5:50] = 2**40 + 3
  labels[:, 45:75, 10:40] = 7
  labels[:, 20:70, 55:85] = 123456789
  with h5py.File(tmp_path / "raw.h5", "w") as f:
    f["raw"] = raw
  x, y, z = corner_xyz
  seg = storage.segmentation_path(str(tmp_path / "res"), (z, y, x))
  storage.save_subvolume(labels, {}, seg)
  assert main(["export", "--segmentation", seg, "--format", "precomputed", "--output",
               str(tmp_path / "view"), "--image", f"{tmp_path}/raw.h5:raw"]) == 0
  with ffn_serve(tmp_path / "view") as url:
    shot, state = load_view(browser, url)
  _record(shot, "offset.png")
  found = check_view(shot, state, raw, labels, corner_xyz)
  print(found)
  assert found["objects"] == 3


def test_demo_box_shows_in_neuroglancer(tmp_path, browser, sample_fib25):
  """The demo's export: google's benchmark box (start 25,25,25 of the shipped crop, 100^3) with the
  crop's ground truth standing in for the demo's segmentation (same box, ids, dtype), exported with
  the demo's command."""
  with h5py.File(SAMPLE_CROP) as f:
    raw, truth = f["raw"][:], f["stack"][:]
  labels = truth[25:125, 25:125, 25:125]
  seg = storage.segmentation_path(str(tmp_path / "segmentation"), (25, 25, 25))
  storage.save_subvolume(labels, {}, seg)
  assert main(["export", "--segmentation", seg, "--format", "precomputed", "--output",
               str(tmp_path / "neuroglancer"), "--image", f"{SAMPLE_CROP}:raw"]) == 0
  with ffn_serve(tmp_path / "neuroglancer") as url:
    shot, state = load_view(browser, url)
  _record(shot, "demo.png")
  found = check_view(shot, state, raw, labels, (25, 25, 25))
  print(found)
  assert found["objects"] >= 5


def test_serve_answers_byte_ranges(tmp_path):
  """Sharded precomputed layers are read as byte ranges of shard files: ``ffn serve`` answers a
  single range with 206 and exactly those bytes, a suffix range, an open range, 416 beyond the end,
  and the whole file without a Range header; CORS on every answer."""
  import functools
  import http.server
  import threading
  import urllib.error
  import urllib.request
  from ffn.inference.serve import CORSRequestHandler
  data = bytes(range(256)) * 4
  (tmp_path / "0.shard").write_bytes(data)
  handler = functools.partial(CORSRequestHandler, directory=str(tmp_path))
  with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/0.shard"

    def get(range_header: str | None):
      request = urllib.request.Request(url, headers={"Range": range_header} if range_header else {})
      try:
        with urllib.request.urlopen(request, timeout=10) as r:
          return r.status, r.headers, r.read()
      except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()

    try:
      for header, status, body, content_range in (
          ("bytes=10-19", 206, data[10:20], "bytes 10-19/1024"),
          ("bytes=1000-", 206, data[1000:], "bytes 1000-1023/1024"),
          ("bytes=-5", 206, data[-5:], "bytes 1019-1023/1024"),
          ("bytes=1020-5000", 206, data[1020:], "bytes 1020-1023/1024"),
          ("bytes=2000-2001", 416, b"", "bytes */1024"),
          (None, 200, data, None)):
        got_status, headers, got = get(header)
        assert (got_status, got) == (status, body), header
        assert headers["Content-Range"] == content_range, header
        assert headers["Access-Control-Allow-Origin"] == "*"
    finally:
      server.shutdown()


def test_stitched_sharded_precomputed_shows_in_neuroglancer(tmp_path, browser, sample_fib25):
  """``ffn stitch --output precomputed://view/segmentation --sharded``: 8 overlapping chunks of the
  crop's ground truth (box 25,25,25 +100, chunks 64^3 overlap 28, random ids per chunk) stitched
  into one sharded precomputed layer; the EM of the box beside it as view/image. Neuroglancer
  reads the shards (byte ranges) and shows the stitched global ids over the EM."""
  from ffn.axes import BoundingBox, split_box
  from ffn.inference.export import write_precomputed_layer
  from ffn.io.tensorstore_volumes import read_labels
  with h5py.File(SAMPLE_CROP) as f:
    raw, truth = f["raw"][:], f["stack"][:]
  rng = np.random.default_rng(5)
  for box in split_box(BoundingBox((25, 25, 25), (100, 100, 100)), (64, 64, 64), (28, 28, 28)):
    (x, y, z), (sx, sy, sz) = box.start.tolist(), box.size.tolist()
    sub = truth[z:z + sz, y:y + sy, x:x + sx]
    ids, inverse = np.unique(sub, return_inverse=True)
    new = 1 + rng.choice((1 << 30) - 1, size=ids.size, replace=False)  # distinct ids in [1, 2^30)
    storage.save_subvolume(new[inverse.reshape(sub.shape)], {},
                           storage.segmentation_path(str(tmp_path / "chunks"), (z, y, x)))
  view = tmp_path / "view"
  assert main(["stitch", "--cluster", "debug", "--segmentation_dir", str(tmp_path / "chunks"),
               "--output", f"precomputed://{view}/segmentation", "--sharded", "--chunk_size",
               "32,32,32", "--block_size", "64,64,64", "--min_overlap", "1"]) == 0
  assert any(p.suffix == ".shard" for p in (view / "segmentation").rglob("*"))
  write_precomputed_layer(str(view / "image"), raw[25:125, 25:125, 25:125], "image", (25, 25, 25),
                          (10, 10, 10))  # the EM of the same box: one outline, one default position
  labels, corner = read_labels(f"precomputed://{view}/segmentation")
  assert corner == (25, 25, 25) and labels.shape == (100, 100, 100)
  with ffn_serve(view) as url:
    shot, state = load_view(browser, url)
  _record(shot, "stitched.png")
  found = check_view(shot, state, raw, labels, (25, 25, 25))
  print(found)
  assert found["objects"] >= 5
