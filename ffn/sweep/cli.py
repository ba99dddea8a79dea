"""``ffn sweep``: segment evaluation boxes with every checkpoint of a training run, score them,
choose the best -- one Slurm job array.

  ffn sweep --train_dir run1 --inference_request configs/inference_training_sample2.pbtxt \\
      --bounding_box 'start { x:25 y:25 z:25 } size { x:100 y:100 z:100 }' \\
      --groundtruth sample_data/fib25/training_sample2_crop.h5:stack \\
      --output_dir sweeps/run1 --compute_dtype bfloat16 --wait

Checkpoints: ``--train_dir`` (its ``model.ckpt-<step>``, ours or google's; ``--every_steps``,
``--last``, ``--min_step``, ``--max_step``) or ``--checkpoints a,b,...``
(:mod:`ffn.sweep.checkpoints`). Every (checkpoint, box) is one evaluation
(:mod:`ffn.sweep.worker`); ``--evaluations_per_task`` of them go to each task of one job array
(:mod:`ffn.blockwise`, run state in ``<output_dir>/sweep/``). Outputs: :mod:`ffn.sweep.report`.

Resume: finished evaluations (their score file) are never redone; a re-run submits only the
evaluations that are not done and not running in a live task, including those of tasks that
died, were cancelled or were interrupted (from their inference checkpoints). Checkpoints that
failed to load stay failed rows unless ``--retry_failed``. A re-run with another request, boxes,
ground truth, reverse/consensus settings or compute dtype into the same ``--output_dir`` is
refused in one line (the manifest); new checkpoints are welcome.

``--watch``: keeps polling the checkpoint source every ``--poll_s`` seconds, submitting new
checkpoints as they appear (training may run at the same time), until a checkpoint of step
``--max_step`` or later exists and everything up to it is evaluated, or ``--watch_minutes``
have passed (then it waits for the evaluations already running).

Exit status: 0 when every evaluation scored (without ``--wait``: once submitted), 1 when some
row failed, 2 on bad input (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import ffn
from ffn.axes import BoundingBox
from ffn.blockwise import RunStatus, WorkItem
from ffn.errors import FFNError
from ffn.sweep.checkpoints import Checkpoint
from ffn.sweep.worker import SweepWorker

_log = logging.getLogger(__name__)

RUN_SUBDIR = "sweep"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from ffn.models import COMPUTE_DTYPES
  from ffn.sweep.report import SELECTABLE
  from slurm.executor import add_slurm_arguments
  src = parser.add_argument_group("checkpoints (one of)")
  src.add_argument("--train_dir", "--ckpt_dir", dest="train_dir", default=None,
                   help="every complete model.ckpt-<step> in this directory")
  src.add_argument("--checkpoints", "--ckpts", dest="checkpoints", default=None,
                   help="checkpoint prefixes separated by commas or spaces")
  parser.add_argument("--every_steps", type=int, default=None,
                      help="keep checkpoints at least this many steps apart (lowest first)")
  parser.add_argument("--last", type=int, default=None, help="only the last K checkpoints")
  parser.add_argument("--min_step", type=int, default=None, help="only checkpoints from this step")
  parser.add_argument("--max_step", type=int, default=None,
                      help="only checkpoints up to this step; --watch stops once it is reached")
  parser.add_argument("--inference_request", "--infreqs", dest="inference_request", default=None,
                      help="InferenceRequest template (a .pbtxt path or the text); its model path and "
                           "output directory are replaced per checkpoint, its model_name/model_args "
                           "apply where a checkpoint has no train_flags.json")
  parser.add_argument("--bounding_box", action="append", default=[],
                      help="evaluation box 'start { x: y: z: } size { x: y: z: }' or a file holding "
                           "it; repeatable")
  parser.add_argument("--bboxes", default=None,
                      help="box files separated by spaces (the SLURM fork's flag)")
  parser.add_argument("--groundtruth", default=None,
                      help="ground-truth labels (volume spec, e.g. labels.h5:stack) in the image's "
                           "coordinates; without it only label-free proxies are computed")
  parser.add_argument("--reverse", action="store_true",
                      help="also run a reverse pass (PolicyInvertOrigins) per box and score the "
                           "split consensus of both")
  parser.add_argument("--split_min_size", type=int, default=None,
                      help="consensus split_min_size (default: the request's min_segment_size)")
  parser.add_argument("--output_dir", "--out_dir", dest="output_dir", default=None,
                      help="results, summaries and the run state (required)")
  parser.add_argument("--select_by", default=None, choices=SELECTABLE,
                      help="the column whose mean over boxes picks the best (lower is better; "
                           "default: adapted_rand_error, without ground truth fwd_rev_vi with "
                           "--reverse else unsegmented_fraction, both proxies)")
  parser.add_argument("--summary_dir", default=None,
                      help="TensorBoard scalars folder (default: <train_dir>/eval; none for "
                           "--checkpoints)")
  parser.add_argument("--evaluations_per_task", type=int, default=1,
                      help="(checkpoint, box) evaluations per array task (default: 1)")
  parser.add_argument("--num_tasks", type=int, default=None, help="at most this many array tasks")
  parser.add_argument("--compute_dtype", default="float32", choices=COMPUTE_DTYPES,
                      help="network arithmetic (bfloat16 ~2x faster on AMX CPUs)")
  parser.add_argument("--wait", action="store_true", help="wait for the array, then report")
  parser.add_argument("--retry_failed", action="store_true",
                      help="evaluate again the checkpoints that failed to load")
  parser.add_argument("--watch", action="store_true",
                      help="keep evaluating new checkpoints as they appear (see --max_step, "
                           "--watch_minutes)")
  parser.add_argument("--poll_s", type=float, default=60.0,
                      help="--watch: seconds between looks at the checkpoints (default: 60)")
  parser.add_argument("--watch_minutes", type=float, default=None,
                      help="--watch: stop looking for new checkpoints after this many minutes")
  parser.add_argument("--where", choices=("local", "cluster"), default=None,
                      help="the SLURM fork's flag: cluster = --cluster slurm")
  parser.add_argument("--t", dest="fork_time", default=None,
                      help="the SLURM fork's Slurm time limit (minutes, or [D-]H:M:S)")
  add_slurm_arguments(parser)


def _minutes(text: str) -> int:
  """Slurm's time formats (``M``, ``M:S``, ``H:M:S``, ``D-H[:M[:S]]``) -> whole minutes (>= 1)."""
  try:
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
      seconds = parts[0] * 60
    elif len(parts) == 2:
      seconds = (parts[0] * 3600 + parts[1] * 60) if days else parts[0] * 60 + parts[1]
    elif len(parts) == 3:
      seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    else:
      raise ValueError(text)
    seconds += int(days or 0) * 86400
  except ValueError:
    raise FFNError(f"--t: expected minutes or [D-]H:M:S, got {text!r}") from None
  return max(1, -(-seconds // 60))


def _boxes(args: argparse.Namespace) -> list[BoundingBox]:
  from ffn.inference.request import parse_bounding_box
  values = list(args.bounding_box) + (args.bboxes.split() if args.bboxes else [])
  if not values:
    raise FFNError("--bounding_box is required (repeat it for several evaluation boxes)")
  boxes = []
  for value in values:
    if os.path.isfile(value):
      with open(value) as f:
        value = f.read()
    boxes.append(parse_bounding_box(value))
  starts = [tuple(int(v) for v in b.start) for b in boxes]
  if len(set(starts)) != len(starts):
    raise FFNError("--bounding_box: two evaluation boxes start at the same corner")
  return boxes


class Sweep:
  """Everything a sweep needs, checked; :meth:`checkpoints` looks at the source again."""

  def __init__(self, args: argparse.Namespace):
    from ffn.inference.request import load_request
    from ffn.inference.runner import Runner
    from ffn.io.volumes import Volume, check_box_inside, check_dtype
    from ffn.sweep.worker import template_text
    if (args.train_dir is None) == (args.checkpoints is None):
      raise FFNError("give exactly one of --train_dir and --checkpoints")
    if not args.output_dir:
      raise FFNError("--output_dir is required")
    if not args.inference_request:
      raise FFNError("--inference_request is required (the template of every evaluation)")
    for name in ("evaluations_per_task", "num_tasks"):
      value = getattr(args, name)
      if value is not None and value < 1:
        raise FFNError(f"--{name} must be >= 1, got {value}")
    if args.poll_s <= 0:
      raise FFNError(f"--poll_s must be positive, got {args.poll_s}")
    if args.checkpoints is not None and (args.every_steps is not None or args.last is not None):
      raise FFNError("--every_steps and --last choose among a --train_dir's checkpoints; with "
                     "--checkpoints list the ones to evaluate")
    if args.watch and args.checkpoints is not None:
      raise FFNError("--watch needs --train_dir (a directory that training writes into)")
    self.args = args
    request = load_request(args.inference_request)
    request.segmentation_output_dir = request.segmentation_output_dir or "<per checkpoint>"
    request.model_checkpoint_path = request.model_checkpoint_path or "<per checkpoint>"
    runner = Runner(request)  # checks the request and opens the image (no model)
    self.boxes = _boxes(args)
    for box in self.boxes:
      check_box_inside(box, runner.volume_shape, runner.image_spec)
    self.groundtruth = args.groundtruth
    if self.groundtruth:
      with Volume(self.groundtruth) as vol:
        check_dtype(str(vol.spec), vol.dtype, "uib")
        if tuple(vol.shape) != tuple(runner.volume_shape):
          raise FFNError(f"--groundtruth {self.groundtruth}: shape {list(vol.shape[::-1])} (x,y,z) "
                         f"differs from the image's {list(runner.volume_shape[::-1])}")
    self.select_by = args.select_by or ("adapted_rand_error" if self.groundtruth else
                                        "fwd_rev_vi" if args.reverse else "unsegmented_fraction")
    if self.select_by.startswith("fwd_rev") and not args.reverse:
      raise FFNError(f"--select_by {self.select_by} needs --reverse")
    if self.select_by in ("adapted_rand_error", "adjusted_rand_error", "vi", "vi_split",
                          "vi_merge") and not self.groundtruth:
      raise FFNError(f"--select_by {self.select_by} needs --groundtruth")
    self.split_min_size = (request.inference_options.min_segment_size
                           if args.split_min_size is None else args.split_min_size)
    if self.split_min_size < 0:
      raise FFNError(f"--split_min_size must be >= 0, got {self.split_min_size}")
    self.template = template_text(request)
    self.output_dir = os.path.abspath(args.output_dir)
    self.run_dir = Path(self.output_dir) / RUN_SUBDIR
    self.summary_dir = args.summary_dir or (os.path.join(args.train_dir, "eval")
                                            if args.train_dir else None)
    from ffn.inference.request import format_bounding_box
    self.manifest = {
        "stage": "sweep", "ffn_version": ffn.__version__, "request": self.template,
        "bounding_boxes": [format_bounding_box(b) for b in self.boxes],
        "groundtruth": self.groundtruth, "reverse": bool(args.reverse),
        "split_min_size": self.split_min_size if args.reverse else None,
        "compute_dtype": args.compute_dtype}

  def checkpoints(self) -> list[Checkpoint]:
    """The checkpoints to evaluate now (the train dir is looked at again on every call)."""
    from ffn.sweep import checkpoints
    a = self.args
    if a.train_dir is not None:
      found = checkpoints.discover(a.train_dir, a.every_steps, a.last, a.min_step, a.max_step)
    else:
      paths = [p for p in a.checkpoints.replace(",", " ").split() if p]
      if not paths:
        raise FFNError("--checkpoints: no checkpoint given")
      found = [c for c in checkpoints.from_list(paths)
               if (a.min_step is None or (c.step is not None and c.step >= a.min_step))
               and (a.max_step is None or (c.step is not None and c.step <= a.max_step))]
    return found

  def reached_max_step(self) -> bool:
    """Whether the train dir holds a checkpoint of step --max_step or later."""
    from ffn.sweep import checkpoints
    if self.args.max_step is None:
      return False
    return any(c.step is not None and c.step >= self.args.max_step
               for c in checkpoints.discover(self.args.train_dir))

  def items(self, found: Sequence[Checkpoint]) -> list[WorkItem]:
    """One item per (checkpoint, box): write and read box = the box, cost = its voxels."""
    from ffn.sweep.worker import item_id
    return [WorkItem(item_id(c.key, box), box, box, int(box.size.prod())) for c in found
            for box in self.boxes]

  def worker(self, found: Sequence[Checkpoint], retry_failed: bool) -> SweepWorker:
    return SweepWorker(self.output_dir, self.template, {c.key: c.to_json() for c in found},
                       bool(self.args.reverse), self.split_min_size, self.groundtruth,
                       self.args.compute_dtype, retry_failed)

  def report(self, found: Sequence[Checkpoint], items: Sequence[WorkItem], status: RunStatus | None
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows and ranking; writes the output files when they changed."""
    from ffn.sweep import report
    table = report.rows(self.output_dir, found, self.boxes, items, status)
    ranked, _ = report.write_outputs(self.output_dir, table, self.select_by, self.groundtruth,
                                     self.summary_dir)
    return table, ranked


def _print(sweep: Sweep, table: Sequence[dict[str, Any]], ranked: Sequence[dict[str, Any]]) -> None:
  counts: dict[str, int] = {}
  for row in table:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  print(f"{sweep.output_dir}: {len(table)} evaluations: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
  for row in table:
    if row["status"] == "failed":
      print(f"failed: {row['key']} box {row['box']}: {row.get('reason')}"
            + (f"; log: {row['log']}" if row.get("log") else ""))
  if ranked:
    best = ranked[0]
    print(f"best by {sweep.select_by}: {best['checkpoint']} ({best['value']:.4f}); "
          f"{sweep.output_dir}/summary.md")


def run(args: argparse.Namespace) -> int:
  from ffn.blockwise import check_manifest, compute_status, run_array, wait_for
  from slurm.executor import SlurmOptions
  if args.where is not None:
    args.cluster = "slurm" if args.where == "cluster" else "local"
  if args.fork_time is not None:
    args.slurm_time_min = _minutes(args.fork_time)
  options = SlurmOptions.from_args(args)
  sweep = Sweep(args)
  found = sweep.checkpoints()
  if not found and not args.watch:
    raise FFNError(f"{args.train_dir or args.checkpoints}: no checkpoint to evaluate")
  check_manifest(sweep.run_dir, sweep.manifest, [])
  deadline = None if args.watch_minutes is None else time.monotonic() + 60 * args.watch_minutes
  submitted: set[str] | None = None  # the checkpoints this invocation last submitted
  while True:
    items = sweep.items(found)
    worker = sweep.worker(found, args.retry_failed)
    keys = {c.key for c in found}
    status = None
    if items and keys != submitted:
      # The first round also resubmits what died or was cancelled in an earlier invocation.
      status = run_array(sweep.run_dir, worker, items, options,
                         chunks_per_task=args.evaluations_per_task, max_tasks=args.num_tasks,
                         retry_failed=submitted is None, wait=args.wait and not args.watch)
      submitted = keys
    elif items:
      status = compute_status(sweep.run_dir, items, worker.is_done)
    table, ranked = sweep.report(found, items, status)
    if not args.watch:
      break
    finished = status is None or not status.active
    if finished and sweep.reached_max_step() and keys == {c.key for c in sweep.checkpoints()}:
      break
    if deadline is not None and time.monotonic() > deadline:
      if status is not None and status.active:
        status = wait_for(sweep.run_dir, items, worker.is_done)
        table, ranked = sweep.report(found, items, status)
      break
    time.sleep(args.poll_s)
    found = sweep.checkpoints()
  _print(sweep, table, ranked)
  if any(row["status"] == "failed" for row in table):
    return 1
  return 0

