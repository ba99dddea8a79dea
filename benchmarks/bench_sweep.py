"""A checkpoint sweep on google's 100^3 benchmark box: ranking against ``ffn evaluate``, cost.

  .venv/bin/python benchmarks/bench_sweep.py [--box 25,25,25,100,100,100] [--noise 0.25:0,0.5:1]
      [--dtype bfloat16] [--cluster slurm] [--output_dir DIR] [--output_json f]

Checkpoints: google's fib25 model (``sample_data/fib25``) and copies of it with Gaussian noise of
``sigma * std(w)`` on every weight (``sigma:seed`` pairs, tests/checkpoint_copies.py). One
``ffn sweep --wait`` (one task per checkpoint, ground truth of the shipped sample) segments the
box (x,y,z start then size, in the crop's coordinates) with each; then ``ffn evaluate`` scores
each sweep segmentation on its own, and the ranking of the sweep is compared with the ranking
by those scores. Reported: each checkpoint's scores, evaluation seconds and network
evaluations; the sweep's wall time (submit to report) against the sum and the maximum of its
evaluations' seconds (tasks run side by side on the cluster's CPUs); and the wall time of a
re-run of the finished sweep (nothing submitted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from checkpoint_copies import perturbed_copy  # noqa: E402
from ffn.axes import BoundingBox  # noqa: E402
from ffn.demo import write_sample_request  # noqa: E402
from ffn.inference.request import format_bounding_box  # noqa: E402

GOOGLE = REPO / "sample_data" / "fib25" / "model" / "model.ckpt-27465036"
GROUNDTRUTH = f"{REPO}/sample_data/fib25/training_sample2_crop.h5:stack"


def _ffn(args: list[str]) -> tuple[int, float]:
  start = time.monotonic()
  status = subprocess.run([sys.executable, "-m", "ffn.cli", *args], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
  return status, time.monotonic() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--box", default="25,25,25,100,100,100")
  parser.add_argument("--noise", default="0.25:0,0.5:1", help="sigma:seed pairs")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--cluster", default="slurm")
  parser.add_argument("--mem_gb", default="3")
  parser.add_argument("--output_dir", default=None, help="default: a new folder under /tmp")
  parser.add_argument("--output_json", default=None)
  args = parser.parse_args()
  values = [int(v) for v in args.box.split(",")]
  box = BoundingBox(values[:3], values[3:])
  root = Path(args.output_dir or f"/tmp/bench_sweep_{uuid.uuid4().hex[:8]}")
  root.mkdir(parents=True, exist_ok=True)
  checkpoints = [str(GOOGLE)]
  for pair in args.noise.split(","):
    sigma, seed = pair.split(":")
    checkpoints.append(perturbed_copy(GOOGLE, root / f"noise{sigma}_{seed}" / GOOGLE.name,
                                      float(sigma), int(seed)))
  request = write_sample_request(root / "request.pbtxt", root / "unused")
  out = root / "sweep"
  command = ["sweep", "--checkpoints", ",".join(checkpoints), "--inference_request", str(request),
             "--bounding_box", format_bounding_box(box), "--groundtruth", GROUNDTRUTH,
             "--output_dir", str(out), "--compute_dtype", args.dtype, "--cluster", args.cluster,
             "--slurm_mem_gb", args.mem_gb, "--slurm_time_min", "120",
             "--slurm_job_name", f"bench-sweep-{uuid.uuid4().hex[:6]}", "--wait"]
  status, wall = _ffn(command)
  if status != 0:
    print(f"ffn sweep exited with {status}; see {out}", file=sys.stderr)
    return 1
  rerun_status, rerun_wall = _ffn(command)
  document = json.loads((out / "results.json").read_text())
  rows = {r["checkpoint"]: r for r in document["rows"]}
  evaluated = {}
  for path in checkpoints:
    target = root / f"evaluate_{Path(path).parent.name}.json"
    _ffn(["evaluate", "--segmentation", rows[path]["segmentation"], "--groundtruth", GROUNDTRUTH,
          "--output_json", str(target)])
    evaluated[path] = json.loads(target.read_text())
  by_evaluate = sorted(checkpoints, key=lambda p: evaluated[p]["adapted_rand_error"])
  sweep_order = [r["checkpoint"] for r in document["ranking"]]
  seconds = [rows[p]["seconds"] for p in checkpoints]
  result = {
      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
      "load_before": os.getloadavg()[0], "box": args.box, "dtype": args.dtype,
      "cluster": args.cluster, "output_dir": str(root),
      "checkpoints": [{"checkpoint": p, **{k: rows[p][k] for k in (
          "adapted_rand_error", "adjusted_rand_error", "vi_split", "vi_merge", "objects",
          "unsegmented_fraction", "evaluations", "seconds")},
                       "evaluate_adapted_rand_error": evaluated[p]["adapted_rand_error"]}
                      for p in checkpoints],
      "ranking_equals_evaluate": sweep_order == by_evaluate,
      "best_is_google": document["best"] == str(GOOGLE),
      "sweep_wall_s": round(wall, 1), "sum_evaluation_s": round(sum(seconds), 1),
      "max_evaluation_s": round(max(seconds), 1),
      "rerun_wall_s": round(rerun_wall, 1), "rerun_status": rerun_status,
      "rerun_submissions": len(list((out / "sweep" / "submissions").glob("*.json"))),
  }
  text = json.dumps(result, indent=1)
  print(text)
  if args.output_json:
    Path(args.output_json).write_text(text + "\n")
  return 0 if result["ranking_equals_evaluate"] and result["best_is_google"] else 1


if __name__ == "__main__":
  sys.exit(main())
