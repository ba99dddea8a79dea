"""Image statistics for normalisation (``ffn stats``).

FFNs feed the network ``(raw - image_mean) / image_stddev``; this computes both (and a histogram)
slab by slab over a volume or a bounding box of it, in float64 so large volumes stay exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from ffn.axes import BoundingBox, parse_xyz
from ffn.io.atomic import check_output_file, write_text_atomic
from ffn.errors import FFNError
from ffn.io.volumes import Volume, check_box_inside
from ffn.progress import Progress


@dataclasses.dataclass
class ImageStats:
  """Summary of an image volume. ``histogram[i]`` counts voxels with value ``i`` (uint8 images)."""
  volume: str
  shape_zyx: list[int]
  count: int
  mean: float
  stddev: float
  min: int
  max: int
  histogram: list[int]

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)


def accumulate_histogram(values: np.ndarray) -> np.ndarray:
  """256-bin histogram of a uint8 array (int64 counts)."""
  return np.bincount(values.ravel(), minlength=256).astype(np.int64)


def stats_from_histogram(hist: np.ndarray) -> tuple[float, float]:
  """Mean and population standard deviation of the values counted in ``hist``."""
  values = np.arange(hist.size, dtype=np.float64)
  n = hist.sum()
  mean = float((hist * values).sum() / n)
  var = float((hist * (values - mean) ** 2).sum() / n)
  return mean, var ** 0.5


def compute_stats(spec: str, box: BoundingBox | None = None, slab_z: int = 32) -> ImageStats:
  """Mean, standard deviation and histogram of a uint8 image volume (or a box of it)."""
  with Volume(spec) as vol:
    if vol.dtype != np.uint8:
      raise FFNError(f"{vol.spec}: stats expect uint8 images, got {vol.dtype}")
    if box is None:
      box = BoundingBox((0, 0, 0), tuple(reversed(vol.shape)))
    check_box_inside(box, vol.shape, str(vol.spec))
    zs, ys, xs = box.to_slices()
    hist = np.zeros(256, np.int64)
    with Progress(zs.stop - zs.start, f"stats {vol.spec}", unit="slices") as progress:
      for z0 in range(zs.start, zs.stop, slab_z):
        z1 = min(z0 + slab_z, zs.stop)
        hist += accumulate_histogram(vol[z0:z1, ys, xs])
        progress.update(z1 - z0)
  mean, stddev = stats_from_histogram(hist)
  nonzero = np.flatnonzero(hist)
  return ImageStats(volume=str(spec), shape_zyx=list(box.shape_zyx()), count=int(hist.sum()),
                    mean=mean, stddev=stddev, min=int(nonzero[0]), max=int(nonzero[-1]),
                    histogram=hist.tolist())


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--input", required=True, help="uint8 image volume spec (path.h5:dataset, slices...)")
  parser.add_argument("--bounding_box_start", default=None, help="x,y,z start of the box (default: whole)")
  parser.add_argument("--bounding_box_size", default=None, help="x,y,z size of the box")
  parser.add_argument("--output", default=None, help="write the stats as JSON here (atomic)")


def run(args: argparse.Namespace) -> int:
  box = None
  if args.bounding_box_start or args.bounding_box_size:
    if not args.bounding_box_size:
      raise FFNError("--bounding_box_start needs --bounding_box_size")
    box = BoundingBox(parse_xyz(args.bounding_box_start or "0,0,0", "--bounding_box_start"),
                      parse_xyz(args.bounding_box_size, "--bounding_box_size"))
  if args.output:
    check_output_file(args.output)  # before the volume is read
  stats = compute_stats(args.input, box)
  if args.output:
    write_text_atomic(args.output, stats.to_json())
  print(f"{stats.volume}: {stats.count} voxels, mean {stats.mean:.3f}, stddev {stats.stddev:.3f}, "
        f"range [{stats.min}, {stats.max}]")
  print(f"normalisation flags: --image_mean {stats.mean:.0f} --image_stddev {stats.stddev:.0f}")
  return 0
