"""The pipeline report's blockwise scores: time and peak memory against ffn evaluate's whole arrays.

  .venv/bin/python benchmarks/bench_pipeline_report.py                 # blocks 64, 128, 256
  .venv/bin/python benchmarks/bench_pipeline_report.py --blocks 96,256

Input: ``../shared/data/fib25/training_sample2.h5`` (250^3; path overridable by
``FFN_SHARED_DATA``): ``raw`` as the image, ``stack`` as the ground truth, and as the one stage's
segmentation ``stack`` with the largest object split at its middle z and the next two merged
(an HDF5 volume of the whole box). A run directory with that plan is written to a temporary
folder and ``ffn.pipeline.report.write_report`` runs on it in a fresh process per block size
(started from a parent that never held a volume), so each peak RSS (``ru_maxrss``) is that run's
own; the baseline is the same process doing
``ffn.metrics.scores.evaluate`` on the two whole arrays read at once. The report's scores must
equal the baseline's exactly. One JSON line per run: wall seconds (report: scores, statistics
and previews, all outputs written), peak RSS in MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("FFN_SHARED_DATA") or ROOT.parent / "shared" / "data")
SOURCE = SHARED / "fib25" / "training_sample2.h5"


def make_run(folder: Path) -> None:
  with h5py.File(SOURCE) as f:
    truth = f["stack"][:]
    shape = truth.shape
  ids, counts = np.unique(truth[truth != 0], return_counts=True)
  big = ids[np.argsort(-counts)[:3]]
  seg = truth.astype(np.uint64)
  top = seg[: shape[0] // 2]
  top[top == big[0]] = 1 << 40
  seg[seg == big[1]] = big[2]
  with h5py.File(folder / "seg.h5", "w") as f:
    f.create_dataset("seg", data=seg, chunks=(64, 64, 64), compression="gzip")
  size = list(shape[::-1])
  plan = {"format": 1, "toolkit_version": "bench", "created": time.time(),
          "image": f"{SOURCE}:raw", "groundtruth": f"{SOURCE}:stack",
          "region": {"start": [0, 0, 0], "size": size},
          "stages": [{"name": "stitch", "depends_on": [], "fingerprint": "", "phases": [],
                      "outputs": {"segmentation": f"{folder}/seg.h5:seg"}}]}
  (folder / "plan.json").write_text(json.dumps(plan))
  (folder / "stages" / "stitch").mkdir(parents=True)
  (folder / "stages" / "stitch" / "stage.json").write_text(json.dumps(
      {"name": "stitch", "state": "done", "job_ids": [], "tasks": {}, "counters": {}, "outputs": {}}))


def child(mode: str, folder: str, block: int) -> None:
  """One measured run in this process: prints its JSON line."""
  start = time.perf_counter()
  if mode == "report":
    from ffn.pipeline.report import write_report
    scores = write_report(folder, (block,) * 3)["scores"]["stitch"]
  else:
    from ffn.metrics.scores import evaluate
    with h5py.File(f"{folder}/seg.h5") as f:
      seg = f["seg"][:]
    with h5py.File(SOURCE) as f:
      gt = f["stack"][:]
    scores = evaluate(seg, gt)
  wall = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  keys = ("vi_split", "vi_merge", "adapted_rand_error", "adjusted_rand_error", "segments",
          "fraction_unsegmented", "voxels_scored")
  print(json.dumps({"mode": mode, "block": block if mode == "report" else None,
                    "wall_s": round(wall, 2), "peak_rss_mib": round(peak),
                    "scores": {k: scores[k] for k in keys}}))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", default="64,128,256", help="block edge lengths (voxels) to run")
  parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child and args.child[0] == "make":
    make_run(Path(args.child[1]))
    return 0
  if args.child:
    child(args.child[0], args.child[1], int(args.child[2]))
    return 0
  if not SOURCE.exists():
    print(f"needs {SOURCE} (set FFN_SHARED_DATA)", file=sys.stderr)
    return 2
  with tempfile.TemporaryDirectory() as tmp:
    # in a process of its own: Linux carries the peak RSS of a parent over exec into its children
    subprocess.run([sys.executable, __file__, "--child", "make", tmp, "0"], check=True, cwd=ROOT)
    results = []
    for mode, block in [("evaluate", 0)] + [("report", int(b)) for b in args.blocks.split(",")]:
      out = subprocess.run([sys.executable, __file__, "--child", mode, tmp, str(block)],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout
      line = json.loads(out.strip().splitlines()[-1])
      results.append(line)
      print(json.dumps(line), flush=True)
    baseline = results[0]["scores"]
    assert all(r["scores"] == baseline for r in results), "blockwise scores differ from evaluate"
  return 0


if __name__ == "__main__":
  sys.exit(main())
