"""``ffn batch_inference``: segment a large box as overlapping chunks on a Slurm job array.

  ffn batch_inference --inference_request=configs/inference_training_sample2.pbtxt \\
      --subvolume_size 80,80,80 --overlap 32,32,32 --chunks_per_task 4 --wait

The box (``--bounding_box``, default: the whole image) is tiled with :func:`ffn.axes.split_box`
-- the same chunks ``ffn run_inference --subvolume_size`` makes -- and every chunk's result is
saved in google's layout under each request's ``segmentation_output_dir``
(``<dir>/<x>/<y>/seg-<x>_<y>_<z>.npz``, :mod:`ffn.inference.storage`), exactly as
``run_inference`` would save it. ``--inference_request`` may be given several times: on each
chunk the requests run in that order (e.g. forward ``PolicyPeaks``, then reverse
``PolicyInvertOrigins`` whose ``segmentation_dir`` is the forward run's output); requests with
the same model share it.

Chunks are handed to the tasks of one submitit job array (:mod:`ffn.blockwise`): largest first
into the least-loaded task, ``ceil(chunks / --chunks_per_task)`` tasks (at most ``--num_tasks``).
Each task loads the model once and segments its chunks through the batching executor
(:func:`ffn.inference.executor.segment_boxes`, ``--concurrent_requests`` canvases, network
batches of ``--batch_size``). Run state lives in ``<first request's segmentation_output_dir>/batch/``
(``manifest.json``, ``submissions/``, ``tasks/``, ``logs/<job id>/``); every other request's
output directory gets the same ``batch/manifest.json``.

Resume: a chunk is done when every request's result file exists; finished chunks are never
submitted again, nor chunks running or queued in a live task. Chunks of a failed task (an
exception, SIGKILL, a node lost, SIGTERM after saving ``.cpoint`` checkpoints) are listed with
their log paths and submitted again only with ``--retry_failed``, resuming from their
checkpoints. Slurm's preemption/time-limit signal (submitit's USR2) saves checkpoints and
requeues the task. A re-run whose requests, box, tiling, model, compute dtype or toolkit
version differ from the manifest is refused in one line.

Exit status: 0 once submitted (with ``--wait``: once every chunk is done), 1 when chunks failed,
2 on bad input (nothing written).

``ffn batch_status RUN``: ``RUN`` is the run directory, its ``manifest.json`` or one of the run's
inference requests; prints chunks done / running / failed / pending, voxels per second, ETA,
the slowest chunks and each failed task's log; exit status 1 when any chunk failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from google.protobuf import text_format

import ffn
from ffn.axes import BoundingBox, parse_xyz, split_box, xyz_to_zyx
from ffn.blockwise import (RunStatus, TaskInterrupted, TaskReport, WorkItem, Worker,
                           check_manifest, compute_status, load_manifest, plan, run_array,
                           status_lines, task_count)
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.inference.request import (format_bounding_box, load_request, parse_bounding_box,
                                   parse_request)
from ffn.inference.runner import Runner
from ffn.models import COMPUTE_DTYPES

_log = logging.getLogger(__name__)

RUN_SUBDIR = "batch"


# ----------------------------------------------------------------------------------- worker

class InferenceWorker(Worker):
  """Segments a task's chunks with every request in order (pickled to the task: texts only)."""

  def __init__(self, requests: Sequence[str], output_dirs: Sequence[str], compute_dtype: str,
               jit_compile: bool, batch_size: int, concurrent_requests: int):
    self.requests = list(requests)
    self.output_dirs = list(output_dirs)
    self.compute_dtype = compute_dtype
    self.jit_compile = jit_compile
    self.batch_size = batch_size
    self.concurrent_requests = concurrent_requests

  def is_done(self, item: WorkItem) -> bool:
    corner = xyz_to_zyx(item.write_box.start)
    return all(storage.existing_segmentation_path(out, corner) is not None
               for out in self.output_dirs)

  def _runners(self, report: TaskReport) -> list:
    """One runner per request, sharing the model among requests that name the same one."""
    runners: list = []
    models: dict[tuple[str, str, str], Any] = {}
    for i, text in enumerate(self.requests):
      request = parse_request(text, f"inference request {i + 1}")
      request.segmentation_output_dir = self.output_dirs[i]
      key = (request.model_checkpoint_path, request.model_name, request.model_args)
      if key in models:
        first = models[key]
        runner = _ReportingRunner(request, compute_dtype=self.compute_dtype, predict=first.predict,
                                  fov_size_xyz=first.fov_size_zyx[::-1],
                                  deltas_xyz=first.deltas_zyx[::-1])
      else:
        runner = _ReportingRunner(request, compute_dtype=self.compute_dtype,
                                  jit_compile=self.jit_compile)
        runner.load_model()
        models[key] = runner
      runner.report = report
      runner.seconds = self._seconds
      runners.append(runner)
    return runners

  def run(self, items: Sequence[WorkItem], report: TaskReport) -> None:
    from ffn.inference.canvas import InferenceInterrupted
    from ffn.inference.executor import segment_boxes
    self._seconds: dict[str, float] = {}
    self._runners_now = []
    todo = [item for item in items if not self.is_done(item)]
    if not todo:
      return
    start = time.monotonic()
    self._runners_now = self._runners(report)
    _log.info("model and %d request(s) ready in %.1f s", len(self._runners_now),
              time.monotonic() - start)
    for i, runner in enumerate(self._runners_now):
      if self._stopping:
        raise TaskInterrupted("stopped before request %d" % (i + 1))
      try:
        segment_boxes(runner, [item.write_box for item in todo], self.batch_size,
                      self.concurrent_requests)
      except InferenceInterrupted as e:
        raise TaskInterrupted(str(e)) from e

  def stop(self) -> None:
    super().stop()
    for runner in getattr(self, "_runners_now", []):
      runner.request_stop()


class _ReportingRunner(Runner):
  """A Runner that tells the task's status file when a chunk starts and ends (one request's
  pass); ``seconds`` (shared by the requests' runners) sums a chunk's time over the requests."""
  report: TaskReport
  seconds: dict

  def run(self, box: BoundingBox | None = None, predict=None) -> str:
    if box is None or self.is_done(box):
      return super().run(box, predict)
    item = plan([box])[0]
    self.report.started(item)
    began = time.monotonic()
    try:
      return super().run(box, predict)
    finally:
      key = item.id
      self.seconds[key] = self.seconds.get(key, 0.0) + time.monotonic() - began
      self.report.finished(item, seconds=self.seconds[key])


# -------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  parser.add_argument("--inference_request", action="append", default=[],
                      help="InferenceRequest text proto (a .pbtxt path or the text); repeatable: "
                           "the requests run in this order on every chunk")
  parser.add_argument("--inference_requests", default=None,
                      help="several request files separated by spaces (the SLURM fork's flag)")
  parser.add_argument("--bounding_box", default=None,
                      help="box as 'start { x: y: z: } size { x: y: z: }' (default: whole image)")
  parser.add_argument("--subvolume_size", default=None,
                      help="chunk size 'x,y,z' (one number: all axes; default: the whole box)")
  parser.add_argument("--overlap", "--subvolume_overlap", dest="overlap", default="0,0,0",
                      help="overlap 'x,y,z' between neighbouring chunks (default: 0)")
  parser.add_argument("--chunks_per_task", type=int, default=1,
                      help="chunks per array task (default: %(default)s)")
  parser.add_argument("--num_tasks", "--nslurmworkers", dest="num_tasks", type=int, default=None,
                      help="at most this many array tasks (default: chunks / chunks_per_task)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="network inputs per call (default: the request's batch_size, 1)")
  parser.add_argument("--concurrent_requests", type=int, default=None,
                      help="chunks segmented at once in a task (default: the request's, 1)")
  parser.add_argument("--compute_dtype", default="float32", choices=COMPUTE_DTYPES,
                      help="network arithmetic (see run_inference; bfloat16 ~2x faster on AMX CPUs)")
  parser.add_argument("--jit_compile", action="store_true", help="compile with XLA (GPUs)")
  parser.add_argument("--wait", action="store_true",
                      help="wait for the array, showing progress (chunks, voxels/s, ETA)")
  parser.add_argument("--retry_failed", action="store_true",
                      help="submit the chunks of failed tasks again (resuming their checkpoints)")
  parser.add_argument("--advise", action="store_true",
                      help="print the chunks and tasks this run would submit; submit nothing")
  add_slurm_arguments(parser)


def _positive(value: int, name: str) -> int:
  if value < 1:
    raise FFNError(f"--{name} must be >= 1, got {value}")
  return value


def _request_args(args: argparse.Namespace) -> list[str]:
  values = list(args.inference_request)
  if args.inference_requests:
    values += args.inference_requests.split()
  if not values:
    raise FFNError("--inference_request is required (repeat it for requests run in order)")
  return values


def prepare(args: argparse.Namespace) -> tuple[Path, InferenceWorker, list[WorkItem], dict]:
  """Parses and checks everything; returns (run dir, worker, chunks, manifest). Writes nothing."""
  from ffn.io.volumes import check_box_inside
  requests = [load_request(value) for value in _request_args(args)]
  output_dirs = [os.path.abspath(r.segmentation_output_dir) for r in requests]
  if len(set(output_dirs)) != len(output_dirs):
    raise FFNError("--inference_request: every request needs its own segmentation_output_dir, "
                   f"got {[r.segmentation_output_dir for r in requests]}")
  batch_size = _positive(max(requests[0].batch_size, 1) if args.batch_size is None
                         else args.batch_size, "batch_size")
  concurrent = _positive(max(requests[0].concurrent_requests, 1) if args.concurrent_requests
                         is None else args.concurrent_requests, "concurrent_requests")
  _positive(args.chunks_per_task, "chunks_per_task")
  if args.num_tasks is not None:
    _positive(args.num_tasks, "num_tasks")
  runners = [Runner(r) for r in requests]  # checks every request and opens its image (no model)
  box = parse_bounding_box(args.bounding_box) if args.bounding_box else runners[0].full_box()
  for runner in runners:
    check_box_inside(box, runner.volume_shape, runner.image_spec)
  size = parse_xyz(args.subvolume_size, "--subvolume_size") if args.subvolume_size else tuple(
      int(v) for v in box.size)
  overlap = parse_xyz(args.overlap, "--overlap")
  boxes = split_box(box, size, overlap)
  items = plan(boxes)
  texts = [text_format.MessageToString(r) for r in requests]
  manifest = {
      "stage": "batch_inference", "ffn_version": ffn.__version__, "requests": texts,
      "output_dirs": output_dirs, "bounding_box": format_bounding_box(box),
      "subvolume_size": list(size), "overlap": list(overlap),
      "model_checkpoint_path": [r.model_checkpoint_path for r in requests],
      "compute_dtype": args.compute_dtype, "jit_compile": bool(args.jit_compile),
  }
  worker = InferenceWorker(texts, output_dirs, args.compute_dtype, args.jit_compile, batch_size,
                           concurrent)
  return Path(output_dirs[0]) / RUN_SUBDIR, worker, items, manifest


def write_manifests(worker: InferenceWorker, items: list[WorkItem], manifest: dict) -> None:
  """Checks the manifest of every request's output directory (refusing a mismatch, or results
  there from another run), then writes the missing ones."""
  run_dirs = [Path(out) / RUN_SUBDIR for out in worker.output_dirs]
  existing = [d for d in run_dirs if (d / "manifest.json").exists()]
  for run_dir in existing:
    check_manifest(run_dir, manifest, items)
  for out, run_dir in zip(worker.output_dirs, run_dirs):
    if run_dir not in existing and storage.existing_corners(out):
      raise FFNError(f"{out}: holds results of another run (no {RUN_SUBDIR}/manifest.json); "
                     "use an empty segmentation_output_dir")
  for run_dir in run_dirs:
    if run_dir not in existing:
      check_manifest(run_dir, manifest, items)


def run(args: argparse.Namespace) -> int:
  from slurm.executor import SlurmOptions
  options = SlurmOptions.from_args(args)
  run_dir, worker, items, manifest = prepare(args)
  if args.advise:
    n = task_count(len(items), args.chunks_per_task, args.num_tasks)
    print(f"{len(items)} chunks of {manifest['subvolume_size']} (x,y,z) with overlap "
          f"{manifest['overlap']} in {manifest['bounding_box']}: {n} tasks; run state in {run_dir}")
    return 0
  write_manifests(worker, items, manifest)
  status = run_array(run_dir, worker, items, options, chunks_per_task=args.chunks_per_task,
                     max_tasks=args.num_tasks, retry_failed=args.retry_failed, wait=args.wait)
  for line in status_lines(status, noun="chunks"):
    print(line)
  if not args.wait and status.active:
    print(f"follow with: ffn batch_status {run_dir}")
  return 1 if status.count("failed") else 0


# ------------------------------------------------------------------------------ batch_status

def find_run(target: str) -> Path:
  """The run directory of ``target``: a run directory, its manifest.json, or a request of it."""
  path = Path(target)
  if path.is_dir():
    return path / RUN_SUBDIR if (path / RUN_SUBDIR / "manifest.json").exists() else path
  if path.name == "manifest.json":
    return path.parent
  if path.suffix == ".pbtxt" or not path.exists():
    request = load_request(target)
    return Path(os.path.abspath(request.segmentation_output_dir)) / RUN_SUBDIR
  raise FFNError(f"{target}: expected a batch run directory, its manifest.json or an inference "
                 "request")


def run_status(target: str) -> RunStatus:
  run_dir = find_run(target)
  manifest, items = load_manifest(run_dir)
  if manifest.get("stage") != "batch_inference":
    raise FFNError(f"{run_dir}/manifest.json: not a batch_inference run "
                   f"(stage {manifest.get('stage')!r})")
  worker = InferenceWorker(manifest["requests"], manifest["output_dirs"], manifest["compute_dtype"],
                           manifest["jit_compile"], 1, 1)
  return compute_status(run_dir, items, worker.is_done)
