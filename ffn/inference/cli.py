"""``ffn run_inference``: segment a subvolume with google/ffn's flags.

  ffn run_inference --inference_request=configs/inference_training_sample2.pbtxt \\
      --bounding_box 'start { x:0 y:0 z:0 } size { x:250 y:250 z:250 }'

With ``--subvolume_size`` the box is split into overlapping subvolumes, each saved as its own
``seg-<x>_<y>_<z>.npz``; ``concurrent_requests`` of them are segmented at once and their network
calls batched (``batch_size``), as google/ffn's executor does (see :mod:`ffn.inference.executor`).

Exit status: 0 when the result exists (also when it already existed), 2 on bad input, 143 when
stopped by SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import signal

from ffn.axes import parse_xyz, split_box
from ffn.errors import FFNError
from ffn.inference.canvas import InferenceInterrupted
from ffn.inference.request import load_request, parse_bounding_box
from ffn.models import COMPUTE_DTYPES

_log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--inference_request", required=True,
                      help="InferenceRequest text proto: a .pbtxt path or the text itself")
  parser.add_argument("--bounding_box", default=None,
                      help="subvolume as 'start { x: y: z: } size { x: y: z: }' (default: whole image)")
  parser.add_argument("--subvolume_size", default=None,
                      help="split the box into subvolumes of this size 'x,y,z' (default: one box)")
  parser.add_argument("--overlap", default="0,0,0",
                      help="overlap 'x,y,z' between neighbouring subvolumes (with --subvolume_size)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="network inputs per call (default: the request's batch_size, 1)")
  parser.add_argument("--concurrent_requests", type=int, default=None,
                      help="subvolumes segmented at once (default: the request's "
                           "concurrent_requests, 1)")
  parser.add_argument("--compute_dtype", default="float32", choices=COMPUTE_DTYPES,
                      help="network arithmetic: bfloat16 is ~2x faster on CPUs with AMX (not without); "
                           "float16 is meant for GPUs (slower than float32 on CPU); both change "
                           "results slightly")
  parser.add_argument("--jit_compile", action="store_true",
                      help="compile the network with XLA (for GPUs; ~8x slower on CPU, never the "
                           "default)")


def _positive(value: int, name: str) -> int:
  if value < 1:
    raise FFNError(f"--{name} must be >= 1, got {value}")
  return value


def run(args: argparse.Namespace) -> int:
  from ffn.inference.executor import segment_boxes
  from ffn.inference.runner import Runner
  from ffn.io.volumes import check_box_inside
  request = load_request(args.inference_request)
  batch_size = _positive(max(request.batch_size, 1) if args.batch_size is None
                         else args.batch_size, "batch_size")
  concurrent = _positive(max(request.concurrent_requests, 1) if args.concurrent_requests is None
                         else args.concurrent_requests, "concurrent_requests")
  box = parse_bounding_box(args.bounding_box) if args.bounding_box else None
  runner = Runner(request, compute_dtype=args.compute_dtype, jit_compile=args.jit_compile)
  box = box or runner.full_box()
  check_box_inside(box, runner.volume_shape, runner.image_spec)
  boxes = [box]
  if args.subvolume_size:
    boxes = split_box(box, parse_xyz(args.subvolume_size, "--subvolume_size"),
                      parse_xyz(args.overlap, "--overlap"))
  if all(runner.is_done(b) for b in boxes):
    _log.info("already done: %s", ", ".join(runner.paths(b)[0] for b in boxes))
    return 0
  runner.load_model()

  def on_signal(signum, frame):  # noqa: ARG001
    _log.warning("signal %d: saving a checkpoint and stopping", signum)
    runner.request_stop()

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    paths = segment_boxes(runner, boxes, batch_size, concurrent)
  except InferenceInterrupted:
    _log.warning("stopped; checkpoints saved in %s; rerun to resume",
                 request.segmentation_output_dir)
    return 143
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for path in paths:
    _log.info("result: %s", path)
  return 0
