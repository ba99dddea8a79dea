"""``ffn run_inference``: segment a subvolume with google/ffn's flags.

  ffn run_inference --inference_request=configs/inference_training_sample2.pbtxt \\
      --bounding_box 'start { x:0 y:0 z:0 } size { x:250 y:250 z:250 }'

Exit status: 0 when the result exists (also when it already existed), 2 on bad input, 143 when
stopped by SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import signal

from ffn.inference.canvas import InferenceInterrupted
from ffn.inference.request import load_request, parse_bounding_box

_log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--inference_request", required=True,
                      help="InferenceRequest text proto: a .pbtxt path or the text itself")
  parser.add_argument("--bounding_box", default=None,
                      help="subvolume as 'start { x: y: z: } size { x: y: z: }' (default: whole image)")
  parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="network arithmetic; bfloat16 is faster on CPUs with AVX512-BF16/AMX")


def run(args: argparse.Namespace) -> int:
  from ffn.inference.runner import Runner
  request = load_request(args.inference_request)
  box = parse_bounding_box(args.bounding_box) if args.bounding_box else None
  runner = Runner(request, compute_dtype=args.compute_dtype)
  if box is not None:
    from ffn.io.volumes import check_box_inside
    check_box_inside(box, runner.volume_shape, runner.image_spec)
  if not runner.is_done(box or runner.full_box()):
    runner.load_model()
  if runner.is_done(box or runner.full_box()):
    _log.info("already done: %s", runner.paths(box or runner.full_box())[0])
    return 0

  def on_signal(signum, frame):  # noqa: ARG001
    _log.warning("signal %d: saving a checkpoint and stopping", signum)
    runner.request_stop()

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    path = runner.run(box)
  except InferenceInterrupted:
    _log.warning("stopped; checkpoint saved at %s; rerun to resume",
                 runner.paths(box or runner.full_box())[2])
    return 143
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  _log.info("result: %s", path)
  return 0
