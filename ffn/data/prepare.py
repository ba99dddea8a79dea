"""Training-data preparation of a labelled volume in one command (``ffn prepare``).

Runs the same steps a user runs by hand, through the same commands, on one image + label volume
(default: the shipped FIB-25 sample):

1. ``ffn stats``            -> ``<output_dir>/image_stats.json`` (image_mean / image_stddev);
2. ``compute_partitions``   -> ``<output_dir>/partitions.h5:af``;
3. ``build_coordinates``    -> ``<output_dir>/coordinates.tfrecord.gz``.

A step whose output already exists is skipped (outputs are written atomically, so an existing file
is complete), which makes an interrupted run resumable; ``--overwrite`` redoes everything.

Self-training: ``--labels`` may be an FFN result (``seg-<x>_<y>_<z>.npz`` of ``run_inference`` or
``consensus``), typically agglomerated and proofread. Its box of the image and its labels are first
written to ``<output_dir>/image.h5:raw`` and ``<output_dir>/labels.h5:stack`` (int64), so that
image, labels and coordinates are aligned, and the steps run on those. An HDF5 result that covers
the whole image (``ffn stitch`` output, an exported proofread volume) is used as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from ffn.errors import FFNError
from ffn.io.volumes import parse_spec

_log = logging.getLogger(__name__)

REPO_SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "fib25" / "training_sample2_crop.h5"
# google/ffn README parameters for FIB-25.
GOOGLE_THRESHOLDS = "0.025,0.05,0.075,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
GOOGLE_LOM_RADIUS = "24,24,24"
GOOGLE_MIN_SIZE = 10000


def result_box_volumes(result_npz: str, image_spec: str, output_dir: Path,
                       overwrite: bool = False) -> tuple[str, str]:
  """Writes the image box under an FFN result and its labels (int64) as ``<output_dir>/image.h5:raw``
  and ``<output_dir>/labels.h5:stack`` (each skipped when it exists); returns the two specs."""
  import numpy as np
  from ffn.axes import BoundingBox, zyx_to_xyz
  from ffn.io.volumes import Volume, write_spec
  from ffn.metrics.cli import load_labels
  image_out, labels_out = output_dir / "image.h5", output_dir / "labels.h5"
  if overwrite or not labels_out.exists() or not image_out.exists():
    labels, corner = load_labels(result_npz)
    if corner is None:
      raise FFNError(f"{result_npz}: not named seg-<x>_<y>_<z>.npz, so its box in {image_spec} is "
                     f"unknown")
    box = BoundingBox(corner, zyx_to_xyz(labels.shape))
    with Volume(image_spec) as vol:
      image = vol.read_box(box)
    if overwrite or not image_out.exists():
      write_spec(f"{image_out}:raw", image, attrs={"offset_xyz": list(box.start)})
    if overwrite or not labels_out.exists():
      if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise FFNError(f"{result_npz}: ids above 2^63-1 cannot be stored as int64")
      write_spec(f"{labels_out}:stack", labels.astype(np.int64), attrs={"offset_xyz": list(box.start)})
    _log.info("%s: image box start %s size %s (x,y,z) and labels written to %s", result_npz,
              box.start.tolist(), box.size.tolist(), output_dir)
  return f"{image_out}:raw", f"{labels_out}:stack"


@dataclasses.dataclass
class PreparedData:
  """Where ``prepare`` put its outputs (all paths absolute)."""
  image: str
  labels: str
  stats_json: str
  partitions: str
  coordinates: str
  image_mean: float
  image_stddev: float


def _run_step(argv: list[str]) -> None:
  from ffn.cli import main  # the same code path as the user-facing commands
  status = main(argv)
  if status != 0:
    raise FFNError(f"step '{' '.join(argv[:1])}' failed with status {status}")


def prepare(image_spec: str, label_spec: str, output_dir: str, volume_name: str = "sample",
            thresholds: str = GOOGLE_THRESHOLDS, lom_radius: str = GOOGLE_LOM_RADIUS,
            min_size: int = GOOGLE_MIN_SIZE, margin: str | None = None,
            overwrite: bool = False) -> PreparedData:
  """Runs stats, partitions and coordinates; returns where the outputs are."""
  out = Path(output_dir).absolute()
  out.mkdir(parents=True, exist_ok=True)
  stats_json = out / "image_stats.json"
  partitions_h5 = out / "partitions.h5"
  coords = out / "coordinates.tfrecord.gz"
  # build_coordinates' margin is z,y,x (google/ffn); the lom radius is x,y,z.
  margin = margin or ",".join(reversed(lom_radius.split(",")))
  if label_spec.endswith(".npz"):
    image_spec, label_spec = result_box_volumes(label_spec, image_spec, out, overwrite)

  def needed(path: Path) -> bool:
    if path.exists() and not overwrite:
      _log.info("%s exists, skipping (use --overwrite to redo)", path)
      return False
    return True

  if needed(stats_json):
    _run_step(["stats", "--input", image_spec, "--output", str(stats_json)])
  if needed(partitions_h5):
    _run_step(["compute_partitions", "--input_volume", label_spec,
               "--output_volume", f"{partitions_h5}:af", "--thresholds", thresholds,
               "--lom_radius", lom_radius, "--min_size", str(min_size)])
  if needed(coords):
    _run_step(["build_coordinates", "--partition_volumes", f"{volume_name}:{partitions_h5}:af",
               "--coordinate_output", str(coords), "--margin", margin])
  stats = json.loads(stats_json.read_text())
  return PreparedData(image=image_spec, labels=label_spec, stats_json=str(stats_json),
                      partitions=f"{partitions_h5}:af", coordinates=str(coords),
                      image_mean=stats["mean"], image_stddev=stats["stddev"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--image", default=f"{REPO_SAMPLE}:raw", help="uint8 image volume spec")
  parser.add_argument("--labels", default=f"{REPO_SAMPLE}:stack",
                      help="int label volume spec, or an FFN result seg-<x>_<y>_<z>.npz (self-training)")
  parser.add_argument("--output_dir", default="demo_output/prepare", help="where outputs go")
  parser.add_argument("--volume_name", default="sample",
                      help="name of the volume in the coordinate file (training's --data_volumes)")
  parser.add_argument("--thresholds", default=GOOGLE_THRESHOLDS)
  parser.add_argument("--lom_radius", default=GOOGLE_LOM_RADIUS, help="x,y,z voxels")
  parser.add_argument("--min_size", type=int, default=GOOGLE_MIN_SIZE)
  parser.add_argument("--margin", default=None, help="z,y,x voxels (default: the lom radius)")
  parser.add_argument("--overwrite", action="store_true", help="redo steps whose outputs exist")


def run(args: argparse.Namespace) -> int:
  result = prepare(args.image, args.labels, args.output_dir, args.volume_name, args.thresholds,
                   args.lom_radius, args.min_size, args.margin, args.overwrite)
  print("prepared training data:")
  for field in dataclasses.fields(result):
    print(f"  {field.name:13s} {getattr(result, field.name)}")
  image, labels = parse_spec(result.image), parse_spec(result.labels)
  if image.dataset and labels.dataset:
    print(f"train with: ffn train --train_coords {result.coordinates} "
          f"--data_volumes {args.volume_name}:{os.path.abspath(image.path)}:{image.dataset} "
          f"--label_volumes {args.volume_name}:{os.path.abspath(labels.path)}:{labels.dataset} "
          f"--image_mean {result.image_mean:.0f} --image_stddev {result.image_stddev:.0f} ...")
  return 0
