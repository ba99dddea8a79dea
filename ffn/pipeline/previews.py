"""PNG previews of a stage's segmentation: the xy, xz and yz planes through the region centre,
the image in grey with each object tinted in its colour (the colours and boundaries of
``ffn export --preview``, :mod:`ffn.inference.export`).

Only the three planes are read (of the image and of the segmentation), never the volume. Each
panel is labelled on the image in x,y,z: a first line with the plane and its position in volume
coordinates (``xy at z=75``), a second with the axes and voxel ranges it shows (an arrow to the
right and ``x 25..124`` for the columns, an arrow down and ``y 25..124`` for the rows). Planes
longer than :data:`MAX_PANEL_VOXELS` are subsampled by an integer step (written on the panel);
small ones are enlarged (nearest neighbour) so the mosaic is at least ``min_width`` pixels wide.
A strip below holds a scale bar along x, the voxel size and the number of objects in the three
planes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ffn.axes import BoundingBox
from ffn.inference.export import scale_bar_nm, tinted_panel

MAX_PANEL_VOXELS = 400  # longest panel side (voxels) before subsampling
HEADER_PX = 44  # two label lines above the panels
FOOTER_PX = 36
FONT_PX = (16, 13)  # first and second header line
GAP_VOXELS = 4  # white columns between panels (in subsampled voxels)

Reader = Callable[[BoundingBox], np.ndarray]  # box (x,y,z) -> z,y,x array


def plane_boxes(box: BoundingBox, centre_xyz: Sequence[int]) -> list[BoundingBox]:
  """The xy (at z), xz (at y) and yz (at x) planes of ``box`` through ``centre_xyz`` (x,y,z)."""
  planes = []
  for axis in (2, 1, 0):  # z, y, x fixed
    start, size = box.start.copy(), box.size.copy()
    start[axis], size[axis] = int(centre_xyz[axis]), 1
    planes.append(BoundingBox(start, size))
  return planes


def read_planes(read: Reader, box: BoundingBox, centre_xyz: Sequence[int]) -> list[np.ndarray]:
  """The three planes as 2D arrays: xy (rows y, columns x), xz (rows z, columns x), yz (rows z,
  columns y), read by ``read`` one plane at a time."""
  xy, xz, yz = (read(p) for p in plane_boxes(box, centre_xyz))
  return [xy[0], xz[:, 0, :], yz[:, :, 0]]


def _arrow(draw, x: float, y: float, direction: str) -> None:
  """A 10-pixel black arrow pointing ``direction`` ("right" or "down") from (x, y) (top left)."""
  if direction == "right":
    draw.line((x, y + 6, x + 9, y + 6), fill="black", width=2)
    draw.polygon(((x + 11, y + 6), (x + 6, y + 2), (x + 6, y + 10)), fill="black")
  else:
    draw.line((x + 5, y, x + 5, y + 9), fill="black", width=2)
    draw.polygon(((x + 5, y + 12), (x + 1, y + 7), (x + 9, y + 7)), fill="black")


def plane_preview(image_planes: Sequence[np.ndarray] | None, label_planes: Sequence[np.ndarray],
                  box: BoundingBox, centre_xyz: Sequence[int], resolution_nm_xyz=(10, 10, 10),
                  alpha: float = 0.4, min_width: int = 900) -> np.ndarray:
  """The labelled mosaic (RGB uint8, height x width x 3) of the planes of :func:`read_planes`
  (``image_planes`` None: a black background) of ``box`` through ``centre_xyz`` (x,y,z voxels,
  absolute); ``resolution_nm_xyz``: nm per voxel for the scale bar."""
  from PIL import Image, ImageDraw, ImageFont
  (x0, y0, z0), (x1, y1, z1) = box.start.tolist(), (box.end - 1).tolist()
  step = max(1, -(-int(box.size.max()) // MAX_PANEL_VOXELS))
  labels = [p[::step, ::step] for p in label_planes]
  if image_planes is None:
    greys = [np.zeros(p.shape, np.float32) for p in labels]
  else:
    images = [p[::step, ::step].astype(np.float32) for p in image_planes]
    lo, hi = np.percentile(np.concatenate([p.ravel() for p in images]), [1, 99])
    greys = [np.clip((p - lo) / max(hi - lo, 1e-6), 0, 1) * 255 for p in images]
  width_voxels = sum(p.shape[1] for p in labels) + 2 * GAP_VOXELS
  zoom = max(1, -(-min_width // width_voxels))
  tiles = [tinted_panel(g, lab, zoom, alpha) for g, lab in zip(greys, labels)]
  height = max(t.shape[0] for t in tiles)
  gap = np.full((height, GAP_VOXELS * zoom, 3), 255, np.uint8)
  padded = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
  mosaic = np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)
  canvas = Image.new("RGB", (mosaic.shape[1], HEADER_PX + height + FOOTER_PX), "white")
  canvas.paste(Image.fromarray(mosaic), (0, HEADER_PX))
  draw = ImageDraw.Draw(canvas)
  big, small = (ImageFont.load_default(size=px) for px in FONT_PX)
  cx, cy, cz = (int(v) for v in centre_xyz)
  every = f" every {step}" if step > 1 else ""
  x_range, y_range, z_range = f"x {x0}..{x1}", f"y {y0}..{y1}", f"z {z0}..{z1}"
  panels = ((f"xy at z={cz}", x_range, y_range), (f"xz at y={cy}", x_range, z_range),
            (f"yz at x={cx}", y_range, z_range))
  left = 0
  for tile, (first, columns, rows) in zip(tiles, panels):
    draw.text((left + 4, 3), first, fill="black", font=big)
    at = left + 4
    for direction, text in (("right", columns), ("down", rows + every)):
      _arrow(draw, at, 25, direction)
      at += 14
      draw.text((at, 24), text, fill="black", font=small)
      at += draw.textlength(text, font=small) + 10
    left += tile.shape[1] + GAP_VOXELS * zoom
  rx, ry, rz = (float(v) for v in resolution_nm_xyz)
  nm_per_px = rx * step / zoom
  bar_nm = scale_bar_nm(tiles[0].shape[1], nm_per_px)
  bar_px = max(1, round(bar_nm / nm_per_px))
  top = HEADER_PX + height
  draw.rectangle((4, top + 6, 4 + bar_px - 1, top + 9), fill="black")
  draw.text((4, top + 12), f"{bar_nm} nm", fill="black", font=small)
  objects = int(np.count_nonzero(np.unique(np.concatenate([p.ravel() for p in label_planes]))))
  draw.text((tiles[0].shape[1] + GAP_VOXELS * zoom + 4, top + 8),
            f"voxel {rx:g} x {ry:g} x {rz:g} nm (x, y, z); {objects} object"
            f"{'s' if objects != 1 else ''} in these planes", fill="black", font=small)
  return np.asarray(canvas)


def png_bytes(rgb: np.ndarray) -> bytes:
  """``rgb`` (height x width x 3 uint8) encoded as PNG."""
  import io
  from PIL import Image
  out = io.BytesIO()
  Image.fromarray(rgb).save(out, format="PNG", optimize=False)
  return out.getvalue()
