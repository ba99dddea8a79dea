"""``ffn export``: a segmentation to HDF5 (int64) / TIFF stack / PNG stack, plus a preview PNG.

  ffn export --segmentation results/75/75/seg-75_75_75.npz --format h5 --output seg.h5:seg
  ffn export --segmentation seg.h5:seg --format png --output seg_png/
  ffn export --segmentation ... --preview preview.png --image raw.h5:raw

PNG slices are 16-bit label images (ids modulo 65536; a warning is logged if ids exceed that),
one per z, named ``seg_00000.png``. The preview shows the three orthogonal centre slices (xy, xz,
yz) of the image with each object in its own colour (fixed hash of the id) at 40% opacity; when
the segmentation comes from a ``seg-x_y_z.npz`` result, the image is read at that box. A strip
above names each panel's plane in volume coordinates (``xy at z=75``, i.e. with the box offset),
and one below holds a scale bar (along x, for the voxel size ``--resolution``, default FIB-25's
10 nm), the voxel size and the number of objects (distinct non-zero ids) in the whole box.

Every output is replaced as a whole (:mod:`ffn.io.atomic`): a single file by rename, a PNG stack
or a precomputed export (both layers) by exchanging the folder, so a reader, or a job killed at any
moment, finds the previous export or the new one, never a mix.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Callable

import numpy as np

from ffn.axes import BoundingBox, zyx_to_xyz
from ffn.errors import FFNError
from ffn.io.atomic import atomic_dir, atomic_path

_log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--segmentation", required=True, help="result .npz or file.h5:dataset")
  parser.add_argument("--format", choices=("h5", "tiff", "png", "precomputed"), default=None,
                      help="h5: --output file.h5:dataset (int64); tiff: one multi-page .tif; "
                           "png: a directory of 16-bit slices; precomputed: a Neuroglancer "
                           "precomputed folder (layers 'segmentation' and, with --image, 'image')")
  parser.add_argument("--resolution", default="10,10,10",
                      help="voxel size in nm, x,y,z, for --format precomputed and the preview's "
                           "scale bar (default: FIB-25's)")
  parser.add_argument("--output", default=None, help="destination (see --format)")
  parser.add_argument("--preview", default=None, help="write an orthogonal-slice preview PNG here")
  parser.add_argument("--image", default=None, help="image file.h5:dataset for the preview")


def label_colors(labels: np.ndarray) -> np.ndarray:
  """A fixed pseudo-random RGB colour (uint8) per label; label 0 -> black."""
  x = labels.astype(np.uint64)
  x = (x * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
  rgb = np.stack([(x >> np.uint64(s)) & np.uint64(0xFF) for s in (16, 32, 48)], axis=-1)
  rgb = (rgb.astype(np.uint16) // 2 + 96).astype(np.uint8)  # bright, saturated enough to see
  rgb[labels == 0] = 0
  return rgb


def object_boundaries(labels: np.ndarray) -> np.ndarray:
  """True where a pixel's label differs from its right or lower neighbour (2D)."""
  edge = np.zeros(labels.shape, bool)
  edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
  return edge


def preview_zoom(shape_zyx, min_width: int = 900) -> int:
  """The integer enlargement of the preview mosaic of a z,y,x box: the smallest that makes
  [xy | 4 | xz | 4 | yz] (nx + 4 + nx + 4 + ny voxels) at least ``min_width`` pixels wide."""
  _, ny, nx = shape_zyx
  width = 2 * nx + ny + 8
  return max(1, -(-min_width // max(width, 1)))


def tinted_panel(grey: np.ndarray, labels: np.ndarray, zoom: int, alpha: float = 0.4) -> np.ndarray:
  """RGB uint8 panel of one plane: ``grey`` (2D, 0..255) with the objects of ``labels`` (2D, same
  shape) tinted in their colour, their boundaries in full colour, enlarged ``zoom`` times
  (nearest neighbour)."""
  grey = np.kron(grey.astype(np.float32), np.ones((zoom, zoom), np.float32))
  labels = np.kron(labels, np.ones((zoom, zoom), labels.dtype))
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  color = label_colors(labels).astype(np.float32)
  tile = np.where((labels != 0)[..., None], (1 - alpha) * rgb + alpha * color, rgb)
  edge = (object_boundaries(labels) & (labels != 0))[..., None]
  return np.where(edge, color, tile).astype(np.uint8)


def ortho_preview(image: np.ndarray | None, labels: np.ndarray, alpha: float = 0.4,
                  min_width: int = 900) -> np.ndarray:
  """RGB uint8 mosaic [xy | xz | yz] of the centre slices of z,y,x arrays.

  Objects are tinted in their colour over the grey image, with their boundaries drawn in full
  colour; the mosaic is enlarged by :func:`preview_zoom` (nearest neighbour) so that small
  subvolumes can be seen. Panels: xy (rows y, columns x) at z = nz // 2, xz (rows z, columns x)
  at y = ny // 2, yz (rows z, columns y) at x = nx // 2, separated by 4 white voxel columns.
  """
  center = [s // 2 for s in labels.shape]
  cuts_l = [labels[center[0]], labels[:, center[1], :], labels[:, :, center[2]]]
  if image is None:
    cuts_i = [np.zeros(c.shape, np.float32) for c in cuts_l]
  else:
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    norm = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    cuts_i = [norm[center[0]], norm[:, center[1], :], norm[:, :, center[2]]]
  scale = preview_zoom(labels.shape, min_width)
  tiles = [tinted_panel(img, lab, scale, alpha) for img, lab in zip(cuts_i, cuts_l)]
  height = max(t.shape[0] for t in tiles)
  gap = np.full((height, 4 * scale, 3), 255, np.uint8)
  padded = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
  return np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)


PREVIEW_HEADER_PX = 28  # white strip above the mosaic with the panels' plane labels
PREVIEW_FOOTER_PX = 36  # white strip below it: scale bar, voxel size, object count
PREVIEW_FONT_PX = 16  # Pillow's default font at this size
SCALE_BAR_PX = 4  # scale bar thickness


def scale_bar_nm(width_px: int, nm_per_px: float) -> int:
  """Length (nm) of the preview's scale bar: the largest 1, 2 or 5 x 10^k nm that spans at most
  half of ``width_px`` pixels of ``nm_per_px`` nm each (at least 1 nm)."""
  best, k = 1, 0
  while True:
    for m in (1, 2, 5):
      if m * 10**k / nm_per_px > width_px / 2:
        return best
      best = m * 10**k
    k += 1


def annotated_preview(image: np.ndarray | None, labels: np.ndarray, offset_xyz=(0, 0, 0),
                      resolution_nm_xyz=(10, 10, 10), min_width: int = 900) -> np.ndarray:
  """:func:`ortho_preview` with a label strip above (``xy at z=..``, ``xz at y=..``, ``yz at x=..``:
  the slices' positions in volume coordinates, i.e. plus the box offset ``offset_xyz``, x,y,z
  voxels) and a strip below: a black scale bar under the xy panel (along x; length from
  :func:`scale_bar_nm` for ``resolution_nm_xyz``, nm per voxel x,y,z), its length in nm, the
  voxel size and the number of objects (distinct non-zero ids of ``labels``, z,y,x)."""
  from PIL import Image, ImageDraw, ImageFont
  mosaic = ortho_preview(image, labels, min_width=min_width)
  nz, ny, nx = labels.shape
  scale = preview_zoom(labels.shape, min_width)
  ox, oy, oz = (int(v) for v in offset_xyz)
  rx, ry, rz = (float(v) for v in resolution_nm_xyz)
  height, width = mosaic.shape[:2]
  canvas = Image.new("RGB", (width, PREVIEW_HEADER_PX + height + PREVIEW_FOOTER_PX), "white")
  canvas.paste(Image.fromarray(mosaic), (0, PREVIEW_HEADER_PX))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=PREVIEW_FONT_PX)
  panel_x = (0, (nx + 4) * scale, (2 * nx + 8) * scale)
  names = (f"xy at z={oz + nz // 2}", f"xz at y={oy + ny // 2}", f"yz at x={ox + nx // 2}")
  for x, name in zip(panel_x, names):
    draw.text((x + 4, 4), name, fill="black", font=font)
  bar_nm = scale_bar_nm(nx * scale, rx / scale)
  bar_px = round(bar_nm / rx * scale)
  top = PREVIEW_HEADER_PX + height
  draw.rectangle((4, top + 6, 4 + bar_px - 1, top + 6 + SCALE_BAR_PX - 1), fill="black")
  draw.text((4, top + 6 + SCALE_BAR_PX + 2), f"{bar_nm} nm", fill="black", font=font)
  objects = int(np.count_nonzero(np.unique(labels)))
  draw.text((panel_x[1] + 4, top + 8), f"voxel {rx:g} x {ry:g} x {rz:g} nm (x, y, z)", fill="black",
            font=font)
  draw.text((panel_x[2] + 4, top + 8), f"{objects} object{'s' if objects != 1 else ''}",
            fill="black", font=font)
  return np.asarray(canvas)


def _load(spec: str) -> tuple[np.ndarray, BoundingBox | None]:
  from ffn.metrics.cli import load_labels
  labels, corner = load_labels(spec)
  box = BoundingBox(corner, zyx_to_xyz(labels.shape)) if corner is not None else None
  return labels, box


PNG_SLICE = re.compile(r"seg_\d{5}\.png$")
PRECOMPUTED_LAYERS = ("segmentation", "image")


def _check_replaceable(directory: str, allowed: Callable[[str], bool], what: str) -> None:
  """FFNError unless ``directory`` is absent or a folder holding only entries ``allowed`` (or
  temporaries of atomic writes): an export replaces the whole folder, so it must not hold
  anything else."""
  if not os.path.lexists(directory):
    return
  if not os.path.isdir(directory):
    raise FFNError(f"{directory}: exists and is not a directory (expected {what})")
  foreign = sorted(n for n in os.listdir(directory) if not allowed(n)
                   and not (n.startswith(".") and n.endswith(".tmp")))
  if foreign:
    raise FFNError(f"{directory}: holds {foreign[0]!r}, which is not part of {what}; refusing to "
                   "replace it (give a new or empty directory)")


def write_png_stack(labels: np.ndarray, directory: str) -> None:
  """Writes z,y,x labels as ``directory/seg_<z:05d>.png`` (16-bit, ids modulo 65536).

  The whole folder is replaced in one step (:func:`ffn.io.atomic.atomic_dir`): a reader sees the
  old stack or the new one, never a mix, and no slice of an earlier, longer stack remains. An
  existing ``directory`` must hold nothing but such slices.
  """
  from PIL import Image
  if labels.max(initial=0) > 65535:
    _log.warning("ids above 65535 are wrapped in 16-bit PNG slices; use --format h5 to keep them")
  _check_replaceable(directory, lambda n: PNG_SLICE.match(n) is not None, "a PNG stack export")
  with atomic_dir(directory) as tmp:
    for z, plane in enumerate(labels):
      Image.fromarray((plane % 65536).astype(np.uint16)).save(tmp / f"seg_{z:05d}.png", format="PNG")


def write_precomputed_layer(directory: str, volume_zyx: np.ndarray, layer_type: str,
                            voxel_offset_xyz, resolution_nm_xyz, chunk: int = 64) -> None:
  """Writes a z,y,x array as one Neuroglancer *precomputed* layer (raw encoding, one scale).

  ``directory/info`` describes the volume; each chunk is a file ``x0-x1_y0-y1_z0-z1`` under the
  scale key, holding little-endian voxels with x varying fastest (i.e. C order of z,y,x). Chunk
  names are absolute voxel ranges, as the format requires: ``x0 = voxel_offset_x + i * chunk``,
  ``x1 = min(x0 + chunk, voxel_offset_x + size_x)`` (likewise y, z). Writes into a
  new directory (``directory`` must not exist; :func:`write_precomputed` makes the export atomic).
  """
  import json
  if layer_type == "segmentation":
    data = volume_zyx.astype("<u8")
  else:
    data = volume_zyx.astype("<u1") if volume_zyx.dtype == np.uint8 else volume_zyx.astype("<f4")
  size_xyz = [int(v) for v in zyx_to_xyz(data.shape)]
  key = "_".join(str(int(r)) for r in resolution_nm_xyz)
  info = {"@type": "neuroglancer_multiscale_volume", "type": layer_type,
          "data_type": {"u8": "uint64", "u1": "uint8", "f4": "float32"}[data.dtype.str[1:]],
          "num_channels": 1,
          "scales": [{"key": key, "size": size_xyz, "resolution": [float(r) for r in resolution_nm_xyz],
                      "voxel_offset": [int(v) for v in voxel_offset_xyz],
                      "chunk_sizes": [[chunk, chunk, chunk]], "encoding": "raw"}]}
  os.makedirs(os.path.join(directory, key))
  with open(os.path.join(directory, "info"), "w") as f:
    json.dump(info, f, indent=1)
  nz, ny, nx = data.shape
  ox, oy, oz = (int(v) for v in voxel_offset_xyz)
  for z0 in range(0, nz, chunk):
    for y0 in range(0, ny, chunk):
      for x0 in range(0, nx, chunk):
        z1, y1, x1 = min(z0 + chunk, nz), min(y0 + chunk, ny), min(x0 + chunk, nx)
        name = f"{ox + x0}-{ox + x1}_{oy + y0}-{oy + y1}_{oz + z0}-{oz + z1}"
        with open(os.path.join(directory, key, name), "wb") as f:
          f.write(np.ascontiguousarray(data[z0:z1, y0:y1, x0:x1]).tobytes())


def write_precomputed(output: str, labels: np.ndarray, image: np.ndarray | None,
                      voxel_offset_xyz, resolution_nm_xyz) -> None:
  """Writes the folder ``output`` with the layers ``segmentation`` (``labels``, z,y,x) and, if
  given, ``image`` (z,y,x), replacing an earlier export as a whole in one step
  (:func:`ffn.io.atomic.atomic_dir`): never a mix of two exports, never a stale layer. An
  existing ``output`` must hold nothing but those layers."""
  _check_replaceable(output, lambda n: n in PRECOMPUTED_LAYERS, "a Neuroglancer precomputed export")
  with atomic_dir(output) as tmp:
    write_precomputed_layer(str(tmp / "segmentation"), labels, "segmentation", voxel_offset_xyz,
                            resolution_nm_xyz)
    if image is not None:
      write_precomputed_layer(str(tmp / "image"), image, "image", voxel_offset_xyz,
                              resolution_nm_xyz)


def run(args: argparse.Namespace) -> int:
  if args.format is None and args.preview is None:
    raise FFNError("nothing to do: give --format with --output, and/or --preview")
  if args.format is not None and not args.output:
    raise FFNError(f"--format {args.format} needs --output")
  from ffn.axes import parse_xyz
  resolution = parse_xyz(args.resolution, "--resolution")
  labels, box = _load(args.segmentation)
  if args.format == "h5":
    from ffn.io.volumes import write_spec
    write_spec(args.output, labels.astype(np.int64))
  elif args.format == "tiff":
    import tifffile
    with atomic_path(args.output, suffix=".tif") as tmp:
      tifffile.imwrite(tmp, labels.astype(np.uint32 if labels.max(initial=0) < 2**32 else np.uint64),
                       photometric="minisblack")
  elif args.format == "png":
    write_png_stack(labels, args.output)
  elif args.format == "precomputed":
    offset = box.start if box is not None else (0, 0, 0)
    image = None
    if args.image:
      from ffn.io.volumes import Volume
      with Volume(args.image) as vol:
        image = vol.read_box(box or BoundingBox((0, 0, 0), zyx_to_xyz(labels.shape)))
    write_precomputed(args.output, labels, image, offset, resolution)
  if args.format:
    _log.info("wrote %s (%s, shape z,y,x %s)", args.output, args.format, list(labels.shape))
  if args.format == "precomputed":
    print(f"Neuroglancer: run `ffn serve {args.output}` (add `--client local` without internet) and "
          "open the link it prints (layers precomputed://http://localhost:8000/image and "
          "precomputed://http://localhost:8000/segmentation)")
  if args.preview:
    image = None
    if args.image:
      from ffn.io.volumes import Volume
      with Volume(args.image) as vol:
        if box is None:
          box = BoundingBox((0, 0, 0), zyx_to_xyz(labels.shape))
        image = vol.read_box(box)
    from PIL import Image
    figure = annotated_preview(image, labels, box.start if box is not None else (0, 0, 0), resolution)
    with atomic_path(args.preview, suffix=".png") as tmp:
      Image.fromarray(figure).save(tmp, format="PNG")
    _log.info("wrote preview %s", args.preview)
  return 0
