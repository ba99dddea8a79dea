"""``ffn evaluate``: score a segmentation against ground truth (VI split/merge, adjusted Rand error).

  ffn evaluate --segmentation results/75/75/seg-75_75_75.npz \\
      --groundtruth sample_data/fib25/training_sample2_crop.h5:stack

The segmentation is an FFN result ``.npz`` (its box is read from the file name ``seg-x_y_z.npz``
and the array shape) or an HDF5 ``file.h5:dataset``. ``--bounding_box`` (x,y,z, google's text
format) selects the scored box in ground-truth coordinates; a segmentation covering the whole
ground-truth volume is cropped to it.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ffn.axes import BoundingBox, zyx_to_xyz
from ffn.errors import FFNError
from ffn.metrics.scores import evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--segmentation", required=True, help="result .npz or file.h5:dataset")
  parser.add_argument("--groundtruth", required=True, help="ground-truth labels file.h5:dataset")
  parser.add_argument("--bounding_box", default=None,
                      help="'start { x: y: z: } size { x: y: z: }' in ground-truth coordinates")
  parser.add_argument("--output_json", default=None, help="also write the scores to this JSON file")


def load_labels(spec: str) -> tuple[np.ndarray, tuple[int, int, int] | None]:
  """Labels (z,y,x) and, for an FFN .npz result, its corner (x,y,z) from the file name."""
  if spec.endswith((".npz", ".cpoint")):
    from ffn.inference import storage
    if not os.path.exists(spec):
      raise FFNError(f"{spec}: segmentation file not found")
    labels, _ = storage.load_segmentation_file(spec)
    try:
      corner = zyx_to_xyz(storage.corner_from_path(spec.replace(".cpoint", ".npz")))
    except FFNError:
      corner = None
    return labels, corner  # type: ignore[return-value]
  from ffn.io.volumes import read_volume
  return read_volume(spec, dtype_kinds="uib"), None


def run(args: argparse.Namespace) -> int:
  from ffn.inference.request import parse_bounding_box
  from ffn.io.volumes import Volume
  seg, corner = load_labels(args.segmentation)
  with Volume(args.groundtruth) as gt_vol:
    from ffn.io.volumes import check_dtype
    check_dtype(str(gt_vol.spec), gt_vol.dtype, "uib")
    if args.bounding_box:
      box = parse_bounding_box(args.bounding_box)
    elif corner is not None:
      box = BoundingBox(corner, zyx_to_xyz(seg.shape))
    else:
      box = BoundingBox((0, 0, 0), zyx_to_xyz(gt_vol.shape))
    gt = gt_vol.read_box(box)
  if seg.shape != gt.shape:
    if tuple(seg.shape) == tuple(gt_vol.shape):
      seg = seg[box.to_slices()]
    else:
      raise FFNError(f"{args.segmentation}: shape {list(seg.shape)} (z,y,x) matches neither the scored "
                     f"box {list(gt.shape)} nor the ground truth volume {list(gt_vol.shape)}")
  for name, labels in ((args.segmentation, seg), (args.groundtruth, gt)):
    if labels.dtype.kind == "i" and labels.size and int(labels.min()) < 0:
      raise FFNError(f"{name}: negative ids (min {int(labels.min())}); labels must be >= 0")
  scores = evaluate(seg, gt)
  scores["bounding_box"] = {"start": box.start.tolist(), "size": box.size.tolist()}
  print(format_table(scores))
  if args.output_json:
    from ffn.io.atomic import write_text_atomic
    write_text_atomic(args.output_json, json.dumps(scores, indent=2) + "\n")
  return 0


def format_table(scores: dict) -> str:
  rows = [("VI split (nats)", f"{scores['vi_split']:.4f}"),
          ("VI merge (nats)", f"{scores['vi_merge']:.4f}"),
          ("adjusted Rand error (1-ARI)", f"{scores['adjusted_rand_error']:.4f}"),
          ("adapted Rand error (1-F)", f"{scores['adapted_rand_error']:.4f}"),
          ("segments (ids > 0)", str(scores["segments"])),
          ("ground-truth objects", str(scores["groundtruth_objects"])),
          ("unsegmented", f"{100 * scores['fraction_unsegmented']:.1f}%")]
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
