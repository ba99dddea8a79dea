"""``ffn batch_status RUN``: where a batch inference run stands (see :mod:`ffn.inference.batch`).

``RUN`` is the run directory (``<segmentation_output_dir>/batch``), its ``manifest.json``, the
output directory holding it, or one of the run's inference requests. Prints chunks done /
running / failed / pending, voxels per second, ETA, the slowest chunks and, for each failed
task, its reason, log path and chunks. Everything is read from the result files and the
tasks' status files, never from logs. Exit status 1 when any chunk failed, 2 on bad input.
"""

from __future__ import annotations

import argparse

from ffn.blockwise import status_lines
from ffn.inference.batch import run_status


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", help="batch run directory, its manifest.json, its output directory, "
                                  "or one of its inference requests")


def run(args: argparse.Namespace) -> int:
  status = run_status(args.run)
  for line in status_lines(status, noun="chunks"):
    print(line)
  return 1 if status.count("failed") else 0
