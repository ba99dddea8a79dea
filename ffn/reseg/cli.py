"""``ffn reseg <step>`` (also ``python run_resegmentation.py <step>``): FFN-guided resegmentation.

Steps, each a pure function in its module plus this thin CLI::

  ffn reseg pairs --segmentation SEG --output pairs.csv [--max_distance D] [--block_size x,y,z]
  ffn reseg run --pairs pairs.csv --inference_request I.pbtxt --output_directory D --radius r
                [--segmentation SEG] | --resegmentation_request R.pbtxt
  ffn reseg analyze --resegmentation_request D/request.pbtxt --output D/affinities.csv
                [--groundtruth GT]
  ffn reseg agglomerate --affinities D/affinities.csv --resegmentation_request D/request.pbtxt
                --output_dir D/agglomerated [--score_threshold t] [--preserve ids]
  ffn reseg queue --affinities D/affinities.csv --output_dir D/queue --segmentation_source URL

``SEG`` is a volume spec (``path.h5:dataset``...) or a result ``seg-<x>_<y>_<z>.npz`` (its corner
from the file name, or ``--corner``); points and boxes are global (image) x,y,z.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from typing import Sequence

import numpy as np

from ffn.axes import BoundingBox, parse_xyz, xyz_to_zyx
from ffn.blockwise import (TaskInterrupted, TaskReport, WorkItem, Worker, check_manifest,
                           plan, run_array, status_lines)
from ffn.errors import FFNError

_log = logging.getLogger(__name__)

STEPS = ("pairs", "run", "analyze", "agglomerate", "queue", "post")


# ---------------------------------------------------------------------------- segmentation

class Segmentation:
  """A label volume in global coordinates: a volume spec, or a result npz at its corner."""

  def __init__(self, spec: str, corner_xyz: Sequence[int] | None = None):
    self.spec = spec
    self._array: np.ndarray | None = None
    if spec.endswith(".npz"):
      from ffn.inference.storage import corner_from_path, load_segmentation_file
      self._array, _ = load_segmentation_file(spec)
      if corner_xyz is None:
        try:
          corner_xyz = tuple(reversed(corner_from_path(spec)))
        except FFNError:
          corner_xyz = (0, 0, 0)
      self.shape_zyx = tuple(self._array.shape)
    else:
      from ffn.io.volumes import Volume, check_dtype
      with Volume(spec) as vol:
        check_dtype(str(vol.spec), vol.dtype, "ui")
        self.shape_zyx = tuple(vol.shape)
    self.corner_xyz = tuple(int(v) for v in (corner_xyz or (0, 0, 0)))

  def read_local(self, box: BoundingBox) -> np.ndarray:
    """A box in the volume's own coordinates (x,y,z), as z,y,x."""
    if self._array is not None:
      from ffn.io.volumes import check_box_inside
      check_box_inside(box, self.shape_zyx, self.spec)
      return self._array[box.to_slices()]
    from ffn.io.volumes import Volume
    with Volume(self.spec) as vol:
      return vol.read_box(box)


def _xyz(text: str | None, name: str) -> tuple[int, int, int] | None:
  return None if text is None else parse_xyz(text, name)


# ----------------------------------------------------------------------------------- pairs

class PairsWorker(Worker):
  """One block of ``ffn reseg pairs --block_size`` (pickled: texts and numbers only)."""

  def __init__(self, spec: str, corner_xyz: Sequence[int], max_distance: float | None,
               run_dir: str):
    self.spec, self.corner_xyz = spec, tuple(corner_xyz)
    self.max_distance, self.run_dir = max_distance, run_dir

  def is_done(self, item: WorkItem) -> bool:
    from ffn.reseg.pairs import block_path
    return os.path.exists(block_path(self.run_dir, item.id))

  def process(self, item: WorkItem) -> None:
    from ffn.reseg.pairs import block_contacts, block_path
    labels = Segmentation(self.spec, self.corner_xyz).read_local(item.read_box)
    lo = np.array(xyz_to_zyx(item.write_box.start - item.read_box.start))
    hi = lo + np.array(xyz_to_zyx(item.write_box.size))
    origin = np.array(xyz_to_zyx(item.read_box.start + np.array(self.corner_xyz)))
    os.makedirs(os.path.join(self.run_dir, "blocks"), exist_ok=True)
    contacts = block_contacts(labels, lo, hi, origin, self.max_distance)
    contacts.save(block_path(self.run_dir, item.id))


def run_pairs(args: argparse.Namespace) -> int:
  from ffn.reseg import pairs
  from slurm.executor import SlurmOptions
  corner = _xyz(args.corner, "--corner")
  seg = Segmentation(args.segmentation, corner)
  pairs.neighbour_offsets(args.max_distance)  # checks --max_distance
  if args.block_size is None:
    start = time.monotonic()
    labels = seg.read_local(BoundingBox((0, 0, 0), tuple(reversed(seg.shape_zyx))))
    table = pairs.find_pairs(labels, args.max_distance, xyz_to_zyx(seg.corner_xyz))
    _log.info("contacts of %s in %.1f s", args.segmentation, time.monotonic() - start)
  else:
    block = parse_xyz(args.block_size, "--block_size")
    full = BoundingBox((0, 0, 0), tuple(reversed(seg.shape_zyx)))
    c = pairs.context_voxels(args.max_distance)
    items = plan(pairs.tile(seg.shape_zyx, block), (c, c, c), full)
    run_dir = os.path.abspath(args.output + ".run")
    os.makedirs(run_dir, exist_ok=True)
    worker = PairsWorker(args.segmentation, seg.corner_xyz, args.max_distance, run_dir)
    check_manifest(run_dir, {"stage": "reseg_pairs", "segmentation": args.segmentation,
                             "corner_xyz": list(seg.corner_xyz),
                             "max_distance": args.max_distance}, items)
    status = run_array(run_dir, worker, items, SlurmOptions.from_args(args),
                       chunks_per_task=args.chunks_per_task, max_tasks=args.num_tasks,
                       retry_failed=args.retry_failed, wait=args.wait)
    for line in status_lines(status):
      print(line)
    if status.count("done") < len(items):
      print(f"{len(items) - status.count('done')} blocks not done: rerun this command (with "
            "--wait) to merge once they are")
      return 1 if status.count("failed") else 0
    table = pairs.merge_blocks([pairs.BlockContacts.load(pairs.block_path(run_dir, item.id))
                                for item in items])
  keep = (table.size_a >= args.min_size) & (table.size_b >= args.min_size) & (
      table.area >= args.min_area)
  table = pairs.PairTable(*(getattr(table, f)[keep] for f in
                            ("id_a", "id_b", "point_zyx", "area", "contact_voxels", "size_a",
                             "size_b")))
  pairs.write_csv(table, args.output)
  print(f"{len(table)} pairs -> {args.output}")
  return 0


# ------------------------------------------------------------------------------------- run

def request_from_args(args: argparse.Namespace):
  """The ResegmentationRequest of ``run`` (a given one, or built from the pairs table)."""
  from ffn.inference import inference_pb2
  from ffn.inference.request import load_request
  from ffn.io.textproto import read_text_proto
  if args.resegmentation_request:
    request = read_text_proto(args.resegmentation_request, inference_pb2.ResegmentationRequest(),
                              "--resegmentation_request", "resegmentation request")
    if not request.output_directory:
      raise FFNError("resegmentation request: output_directory is not set")
    return request
  for flag in ("pairs", "inference_request", "output_directory", "radius"):
    if getattr(args, flag) is None:
      raise FFNError(f"--{flag} is required (or give --resegmentation_request)")
  from ffn.reseg.pairs import read_csv
  table = read_csv(args.pairs)
  request = inference_pb2.ResegmentationRequest()
  request.inference.CopyFrom(load_request(args.inference_request))
  out = os.path.abspath(args.output_directory)
  request.output_directory = out
  for name in ("radius", "exclusion_radius", "init_exclusion_radius", "analysis_radius"):
    value = _xyz(getattr(args, name), f"--{name}")
    if value is not None:
      if min(value) < 0:
        raise FFNError(f"--{name} must be >= 0, got {list(value)}")
      field = getattr(request, name)
      field.x, field.y, field.z = value
  request.max_retry_iters = args.max_retry_iters
  request.segment_recovery_fraction = args.segment_recovery_fraction
  request.terminate_early = args.terminate_early
  request.subdir_digits = args.subdir_digits
  for i in range(len(table)):
    point = request.points.add()
    point.id_a, point.id_b = int(table.id_a[i]), int(table.id_b[i])
    z, y, x = (int(v) for v in table.point_zyx[i])
    point.point.x, point.point.y, point.point.z = x, y, z
  if not request.inference.HasField("init_segmentation"):
    if args.segmentation is None:
      raise FFNError("--segmentation is required: the inference request has no init_segmentation")
    request.inference.init_segmentation.hdf5 = _base_segmentation(args, request, out)
  return request


def _base_segmentation(args: argparse.Namespace, request, out: str) -> str:
  """An HDF5 spec of the base segmentation in the image's coordinates: the given volume when it
  already is one, else ``<out>/base_segmentation.h5:seg`` (the segmentation placed at its
  corner in an image-sized volume of zeros)."""
  from ffn.inference.request import image_spec
  from ffn.io.volumes import Volume, write_h5
  with Volume(image_spec(request.inference)) as vol:
    image_shape = tuple(vol.shape)
  seg = Segmentation(args.segmentation, _xyz(args.corner, "--corner"))
  if (not args.segmentation.endswith(".npz") and args.segmentation.count(":") == 1
      and seg.corner_xyz == (0, 0, 0) and seg.shape_zyx == image_shape):
    return args.segmentation
  corner = np.array(xyz_to_zyx(seg.corner_xyz))
  end = corner + np.array(seg.shape_zyx)
  if np.any(corner < 0) or np.any(end > np.array(image_shape)):
    raise FFNError(f"{args.segmentation}: at corner {list(seg.corner_xyz)} (x,y,z) it does not fit "
                   f"in the image of size {list(reversed(image_shape))} (x,y,z)")
  path = os.path.join(out, "base_segmentation.h5")
  if not os.path.exists(path):
    volume = np.zeros(image_shape, np.uint64)
    volume[tuple(slice(int(a), int(b)) for a, b in zip(corner, end))] = seg.read_local(
        BoundingBox((0, 0, 0), tuple(reversed(seg.shape_zyx))))
    os.makedirs(out, exist_ok=True)
    write_h5(path, "seg", volume)
  return f"{path}:seg"


_RANGE = re.compile(r"^points_(\d+)_(\d+)$")


def point_items(request, points_per_item: int) -> list[WorkItem]:
  """Items of ``points_per_item`` consecutive points (id ``points_<first>_<end>``); cost: canvas
  voxels; boxes: the hull of the canvases."""
  from ffn.reseg.run import canvas_box
  items = []
  n = len(request.points)
  for s in range(0, n, points_per_item):
    e = min(s + points_per_item, n)
    boxes = [canvas_box(request, i) for i in range(s, e)]
    lo = np.min([b.start for b in boxes], axis=0)
    hi = np.max([b.end for b in boxes], axis=0)
    hull = BoundingBox(lo, hi - lo)
    items.append(WorkItem(f"points_{s}_{e}", hull, hull,
                          int(sum(int(np.prod(b.size)) for b in boxes))))
  return items


def item_points(item: WorkItem) -> range:
  match = _RANGE.match(item.id)
  if match is None:
    raise FFNError(f"{item.id}: not a resegmentation work item")
  return range(int(match.group(1)), int(match.group(2)))


class ResegWorker(Worker):
  """Points of a task: the model loaded once, points batched (pickled: texts and numbers)."""

  def __init__(self, request_text: str, compute_dtype: str, voxel_size_zyx: Sequence[float],
               batch_size: int, concurrent: int):
    self.request_text, self.compute_dtype = request_text, compute_dtype
    self.voxel_size_zyx = tuple(voxel_size_zyx)
    self.batch_size, self.concurrent = batch_size, concurrent

  def _request(self):
    from ffn.inference import inference_pb2
    from ffn.io.textproto import parse_text_proto
    return parse_text_proto(self.request_text, inference_pb2.ResegmentationRequest(),
                            "resegmentation request")

  def is_done(self, item: WorkItem) -> bool:
    from ffn.reseg.run import target_path
    if not hasattr(self, "_parsed"):
      self._parsed = self._request()
    return all(os.path.exists(target_path(self._parsed, i)) for i in item_points(item))

  def run(self, items: Sequence[WorkItem], report: TaskReport) -> None:
    from ffn.inference.canvas import InferenceInterrupted
    from ffn.reseg.run import make_processor, process_points
    todo = [item for item in items if not self.is_done(item)]
    if not todo:
      return
    self._processor = make_processor(self._request(), self.compute_dtype, self.voxel_size_zyx)
    for item in todo:
      if self._stopping:
        raise TaskInterrupted("stopped before the next points")
      report.started(item)
      try:
        process_points(self._processor, list(item_points(item)), self.batch_size,
                       self.concurrent)
      except InferenceInterrupted as e:
        raise TaskInterrupted("stopped; unfinished points are redone on resume") from e
      report.finished(item)

  def stop(self) -> None:
    super().stop()
    processor = getattr(self, "_processor", None)
    if processor is not None:
      processor.request_stop()


def run_run(args: argparse.Namespace) -> int:
  import ffn
  from google.protobuf import text_format
  from ffn.io.atomic import write_text_atomic
  from slurm.executor import SlurmOptions
  options = SlurmOptions.from_args(args)
  request = request_from_args(args)
  out = request.output_directory
  os.makedirs(out, exist_ok=True)
  text = text_format.MessageToString(request)
  if args.points_per_task < 1:
    raise FFNError(f"--points_per_task must be >= 1, got {args.points_per_task}")
  voxel_size = xyz_to_zyx(_floats(args.voxel_size, "--voxel_size"))
  items = point_items(request, args.points_per_task)
  run_dir = os.path.join(out, "run")
  check_manifest(run_dir, {"stage": "reseg_run", "ffn_version": ffn.__version__,
                           "request": text, "compute_dtype": args.compute_dtype,
                           "voxel_size_zyx": list(voxel_size)}, items)
  request_path = os.path.join(out, "request.pbtxt")
  if not os.path.exists(request_path):
    write_text_atomic(request_path, text)
  worker = ResegWorker(text, args.compute_dtype, voxel_size, args.batch_size,
                       args.concurrent_requests)
  if not items:
    print(f"no points: nothing to do ({request_path})")
    return 0
  status = run_array(run_dir, worker, items, options, chunks_per_task=1,
                     max_tasks=args.num_tasks, retry_failed=args.retry_failed, wait=args.wait)
  for line in status_lines(status, noun="point groups"):
    print(line)
  print(f"request: {request_path}")
  return 1 if status.count("failed") else 0


def _floats(text: str, name: str) -> tuple[float, float, float]:
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    raise FFNError(f"{name}: expected numbers 'x,y,z', got {text!r}") from None
  if len(values) == 1:
    values *= 3
  if len(values) != 3 or min(values) <= 0:
    raise FFNError(f"{name}: expected 3 positive numbers 'x,y,z', got {text!r}")
  return values[0], values[1], values[2]


# --------------------------------------------------------------------------------- analyze

def _load_request(path: str):
  from ffn.inference import inference_pb2
  from ffn.io.textproto import read_text_proto
  if os.path.isdir(path):
    path = os.path.join(path, "request.pbtxt")
  return read_text_proto(path, inference_pb2.ResegmentationRequest(), "--resegmentation_request",
                         "resegmentation request")


def _base_reader(request):
  from ffn.inference.request import hdf5_spec
  from ffn.io.volumes import Volume
  spec = hdf5_spec(request.inference.init_segmentation, "init_segmentation")
  volume = Volume(spec)

  def read(box: BoundingBox) -> np.ndarray:
    return volume.read_box(box)

  return spec, volume, read


def _groundtruth_report(rows, base_spec: str, gt_spec: str, prefix: str) -> dict:
  from ffn.io.volumes import read_volume
  from ffn.reseg.agglomerate import MergeRule
  from ffn.reseg.analyze import (majority_bodies, plot_precision_recall, precision_recall,
                                 threshold_sweep, write_rows)
  bodies = majority_bodies(read_volume(base_spec, dtype_kinds="ui"),
                           read_volume(gt_spec, dtype_kinds="ui"))
  sweep = threshold_sweep(rows, bodies, np.round(np.linspace(0, 1, 21), 3))
  rule = precision_recall(rows, bodies, MergeRule().merges)
  write_rows(sweep, prefix + "_pr.csv", ("threshold", "tp", "fp", "fn", "precision", "recall"))
  plot_precision_recall(sweep, prefix + "_pr.png", rule)
  return rule


def run_analyze(args: argparse.Namespace) -> int:
  from ffn.reseg.analyze import analyze_request, write_rows
  request = _load_request(args.resegmentation_request)
  if args.analysis_radius is not None:
    value = parse_xyz(args.analysis_radius, "--analysis_radius")
    if min(value) < 0 or any(v > r for v, r in zip(value, (request.radius.x, request.radius.y,
                                                            request.radius.z))):
      raise FFNError(f"--analysis_radius {list(value)} must be >= 0 and at most the request's "
                     f"radius {[request.radius.x, request.radius.y, request.radius.z]} (x,y,z)")
    request.analysis_radius.x, request.analysis_radius.y, request.analysis_radius.z = value
  spec, volume, read = _base_reader(request)
  voxel_size = xyz_to_zyx(_floats(args.voxel_size, "--voxel_size"))
  try:
    rows = analyze_request(request, read, voxel_size, args.threshold)
  finally:
    volume.close()
  write_rows(rows, args.output)
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  print(f"{len(rows)} pairs -> {args.output}: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
  if args.groundtruth:
    prefix = os.path.splitext(args.output)[0]
    rule = _groundtruth_report(rows, spec, args.groundtruth, prefix)
    print(f"manual rule vs ground truth: precision {rule['precision']:.3f}, recall "
          f"{rule['recall']:.3f} ({rule['tp']} true merges found, {rule['fp']} false, "
          f"{rule['fn']} missed); sweep: {prefix}_pr.csv, {prefix}_pr.png")
  return 0


# ----------------------------------------------------------------------------- agglomerate

def _preserve(values: Sequence[str]) -> set[int]:
  ids: set[int] = set()
  for value in values:
    if os.path.exists(value):
      with open(value) as f:
        text = f.read()
    else:
      text = value
    for token in re.split(r"[\s,]+", text.strip()):
      if token:
        try:
          ids.add(int(token))
        except ValueError:
          raise FFNError(f"--preserve: {token!r} is not an id (ids, comma separated, or a file "
                         "of ids)") from None
  return ids


def run_agglomerate(args: argparse.Namespace) -> int:
  from ffn.io.volumes import read_volume, write_h5
  from ffn.reseg import agglomerate as ag
  from ffn.reseg.analyze import read_rows
  rows = read_rows(args.affinities)
  rule = ag.MergeRule(args.iou_threshold, args.consistency_threshold, args.deleted_threshold,
                      args.score_threshold)
  merged = ag.decide(rows, rule, _preserve(args.preserve))
  if args.segmentation:
    base_spec = args.segmentation
  elif args.resegmentation_request:
    from ffn.inference.request import hdf5_spec
    base_spec = hdf5_spec(_load_request(args.resegmentation_request).inference.init_segmentation,
                          "init_segmentation")
  else:
    raise FFNError("--resegmentation_request or --segmentation (the base segmentation) is required")
  base = read_volume(base_spec, dtype_kinds="ui")
  supervoxels = np.unique(base)
  supervoxels = supervoxels[supervoxels != 0].astype(np.uint64)
  body = ag.bodies(supervoxels, [(r["id_a"], r["id_b"]) for r in merged])
  out = args.output_dir
  os.makedirs(out, exist_ok=True)
  ag.write_merge_table(ag.merge_table(rows), os.path.join(out, "merge_table.csv"),
                       os.path.join(out, "merge_table.npy"))
  ag.write_merge_table(ag.merge_table(merged), os.path.join(out, "merges.csv"))
  ag.write_mapping(supervoxels, body, os.path.join(out, "mapping.csv"))
  volume_spec = args.output_volume or os.path.join(out, "agglomerated.h5") + ":seg"
  path, _, dataset = volume_spec.rpartition(":")
  if not path or not dataset:
    raise FFNError(f"--output_volume: expected path.h5:dataset, got {volume_spec!r}")
  agglomerated = ag.relabel(base, supervoxels, body)
  write_h5(path, dataset, agglomerated)
  summary = {"pairs": len(rows), "ok": sum(r.get("status") == "ok" for r in rows),
             "merges": len(merged), "supervoxels": int(supervoxels.size),
             "bodies": int(np.unique(body).size), "rule": dataclasses.asdict(rule)}
  if args.groundtruth:
    from ffn.metrics.scores import evaluate
    from ffn.reseg.analyze import majority_bodies, precision_recall
    gt = read_volume(args.groundtruth, dtype_kinds="ui")
    box = _xyz_box(args.evaluate_box)
    crop = (lambda a: a[box.to_slices()]) if box is not None else (lambda a: a)
    summary["base_scores"] = evaluate(crop(base), crop(gt))
    summary["agglomerated_scores"] = evaluate(crop(agglomerated), crop(gt))
    bodies_gt = majority_bodies(base, gt)
    made = {(r["id_a"], r["id_b"]) for r in merged}
    summary["merge_precision_recall"] = precision_recall(
        rows, bodies_gt, lambda r: (r["id_a"], r["id_b"]) in made)
  from ffn.io.atomic import write_text_atomic
  write_text_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
  print(f"{len(merged)} merges of {summary['ok']} scored pairs: {summary['supervoxels']} "
        f"supervoxels -> {summary['bodies']} bodies; {volume_spec}")
  if args.groundtruth:
    for key in ("base_scores", "agglomerated_scores"):
      s = summary[key]
      print(f"  {key:20s} VI split {s['vi_split']:.3f} merge {s['vi_merge']:.3f} adapted RE "
            f"{s['adapted_rand_error']:.4f} ({s['segments']} segments)")
    pr = summary["merge_precision_recall"]
    print(f"  merges vs ground truth: precision {pr['precision']:.3f} recall {pr['recall']:.3f}")
  return 0


def _xyz_box(text: str | None) -> BoundingBox | None:
  if not text:
    return None
  from ffn.inference.request import parse_bounding_box
  return parse_bounding_box(text)


# ----------------------------------------------------------------------------------- queue

def run_queue(args: argparse.Namespace) -> int:
  from ffn.reseg.analyze import read_rows
  from ffn.reseg.queue import build_queue, write_queue
  rows = read_rows(args.affinities)
  try:
    low, high = (float(v) for v in args.band.split(","))
  except ValueError:
    raise FFNError(f"--band: expected 'low,high', got {args.band!r}") from None
  if not low <= high:
    raise FFNError(f"--band: low {low} is above high {high}")
  queue = build_queue(rows, low, high, args.center, args.limit)
  os.makedirs(args.output_dir, exist_ok=True)
  csv_path = os.path.join(args.output_dir, "queue.csv")
  html_path = os.path.join(args.output_dir, "queue.html")
  write_queue(queue, csv_path, html_path, args.segmentation_source, args.image_source,
              _floats(args.voxel_size_nm, "--voxel_size_nm"))
  print(f"{len(queue)} pairs to proofread -> {csv_path}, {html_path}")
  return 0


# -------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)

  p = sub.add_parser("pairs", help="touching supervoxel pairs -> CSV (contact point, area, sizes)")
  p.add_argument("--segmentation", required=True,
                 help="label volume spec (path.h5:dataset, slices...) or a result seg-x_y_z.npz")
  p.add_argument("--corner", default=None,
                 help="x,y,z of the segmentation's first voxel in image coordinates (default: "
                      "from a seg-<x>_<y>_<z>.npz name, else 0,0,0)")
  p.add_argument("--output", required=True, help="pairs CSV")
  p.add_argument("--max_distance", type=float, default=None,
                 help="voxels within this Euclidean distance touch (default: 26-connected)")
  p.add_argument("--min_size", type=int, default=0, help="drop pairs with a smaller segment")
  p.add_argument("--min_area", type=int, default=0, help="drop pairs with fewer contact faces")
  p.add_argument("--block_size", default=None,
                 help="x,y,z: blocks on a job array (run state in <output>.run/); default: one "
                      "block in this process")
  _array_arguments(p)
  add_slurm_arguments(p)

  p = sub.add_parser("run", help="resegment every pair with the FFN (job array, resumable)")
  p.add_argument("--resegmentation_request", default=None,
                 help="a full ResegmentationRequest pbtxt (instead of the flags below)")
  p.add_argument("--pairs", default=None, help="pairs CSV of `ffn reseg pairs`")
  p.add_argument("--inference_request", default=None, help="InferenceRequest pbtxt (model etc.)")
  p.add_argument("--segmentation", default=None,
                 help="base segmentation (as for pairs) when the inference request has no "
                      "init_segmentation")
  p.add_argument("--corner", default=None, help="x,y,z corner of --segmentation (as for pairs)")
  p.add_argument("--output_directory", default=None, help="results, request.pbtxt, run/ state")
  p.add_argument("--radius", default=None, help="canvas radius x,y,z (canvas 2r+1)")
  p.add_argument("--analysis_radius", default=None, help="x,y,z (default: the radius)")
  p.add_argument("--exclusion_radius", default="0,0,0", help="x,y,z around a failed seed")
  p.add_argument("--init_exclusion_radius", default=None, help="x,y,z around the point")
  p.add_argument("--max_retry_iters", type=int, default=1)
  p.add_argument("--segment_recovery_fraction", type=float, default=0.0)
  p.add_argument("--terminate_early", action="store_true")
  p.add_argument("--subdir_digits", type=int, default=0)
  p.add_argument("--voxel_size", default="1,1,1",
                 help="x,y,z voxel size for the distance transforms (default: isotropic)")
  p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--batch_size", type=int, default=1, help="network inputs per call")
  p.add_argument("--concurrent_requests", type=int, default=1, help="points at once per task")
  p.add_argument("--points_per_task", type=int, default=64, help="points per array task")
  p.add_argument("--num_tasks", type=int, default=None, help="at most this many tasks")
  p.add_argument("--wait", action="store_true")
  p.add_argument("--retry_failed", action="store_true")
  add_slurm_arguments(p)

  p = sub.add_parser("analyze", help="affinity table (IoU, consistencies, deleted voxels)")
  p.add_argument("--resegmentation_request", required=True,
                 help="the run's request.pbtxt (or its output directory)")
  p.add_argument("--output", required=True, help="affinity CSV")
  p.add_argument("--analysis_radius", default=None,
                 help="x,y,z: overrides the request's analysis_radius (at most its radius)")
  p.add_argument("--voxel_size", default="1,1,1", help="x,y,z for the distance transforms")
  p.add_argument("--threshold", type=float, default=0.5, help="probability of a reconstruction")
  p.add_argument("--groundtruth", default=None,
                 help="ground-truth bodies in image coordinates: merge precision/recall sweep")

  p = sub.add_parser("agglomerate", help="merge rule + union-find -> merge table, mapping, volume")
  p.add_argument("--affinities", required=True)
  p.add_argument("--resegmentation_request", default=None, help="for its base segmentation")
  p.add_argument("--segmentation", default=None, help="base segmentation (HDF5, image coords)")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--output_volume", default=None,
                 help="agglomerated volume path.h5:dataset "
                      "(default: <output_dir>/agglomerated.h5:seg)")
  p.add_argument("--iou_threshold", type=float, default=0.8)
  p.add_argument("--consistency_threshold", type=float, default=0.6)
  p.add_argument("--deleted_threshold", type=float, default=0.02)
  p.add_argument("--score_threshold", type=float, default=None,
                 help="merge when score >= this (replaces the three thresholds)")
  p.add_argument("--preserve", action="append", default=[],
                 help="ids never merged (comma separated, or a file of ids); repeatable")
  p.add_argument("--groundtruth", default=None, help="score base and agglomeration against it")
  p.add_argument("--evaluate_box", default=None,
                 help="'start { x: y: z: } size { x: y: z: }': score only this box")

  p = sub.add_parser("queue", help="uncertain pairs, ranked, with Neuroglancer links (CSV, HTML)")
  p.add_argument("--affinities", required=True)
  p.add_argument("--output_dir", required=True)
  p.add_argument("--segmentation_source", required=True,
                 help="Neuroglancer source of the base segmentation "
                      "(e.g. precomputed://http://...)")
  p.add_argument("--image_source", default=None, help="Neuroglancer source of the image")
  p.add_argument("--band", default="0.4,0.9", help="score band 'low,high' (default: %(default)s)")
  p.add_argument("--center", type=float, default=0.8, help="rank by distance from this score")
  p.add_argument("--limit", type=int, default=None, help="at most this many pairs")
  p.add_argument("--voxel_size_nm", default="1,1,1", help="x,y,z voxel size in nm for the viewer")

  from ffn.dvid.cli import add_post_merges_arguments
  p = sub.add_parser("post", help="post the agglomeration's merges to DVID (ffn dvid post-merges: "
                                  "dry run unless --apply, idempotent, JSONL log)")
  add_post_merges_arguments(p)


def _array_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--chunks_per_task", type=int, default=1, help="blocks per array task")
  p.add_argument("--num_tasks", type=int, default=None, help="at most this many tasks")
  p.add_argument("--wait", action="store_true", help="wait for the array, then merge")
  p.add_argument("--retry_failed", action="store_true")


def run_post(args: argparse.Namespace) -> int:
  from ffn.dvid.cli import run_post_merges
  return run_post_merges(args)


def run(args: argparse.Namespace) -> int:
  return {"pairs": run_pairs, "run": run_run, "analyze": run_analyze,
          "agglomerate": run_agglomerate, "queue": run_queue, "post": run_post}[args.step](args)
