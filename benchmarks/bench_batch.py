"""Per-chunk overhead of a batch inference task vs one ``run_inference`` call per chunk.

  .venv/bin/python benchmarks/bench_batch.py [--box 27,27,27,96,96,96] [--chunk 64,64,64]
      [--overlap 32,32,32] [--dtype bfloat16] [--cluster local] [--output_json f]

The box (x,y,z start then size) of the shipped sample (``sample_data/fib25``, google's fib25
model and request) is tiled like ``run_inference --subvolume_size`` does. Two ways of segmenting
every chunk, each in fresh output directories, in the same run:

* ``run_inference``: one ``ffn run_inference --bounding_box <chunk>`` process per chunk (what a
  user without batch inference runs per chunk): wall time ``W_i`` of each process;
* ``batch``: ``ffn batch_inference --num_tasks 1 --wait`` on ``--cluster`` (one task does every
  chunk): the task's status file gives each chunk's time ``t_i`` (``Runner.run``: image read, seeds,
  flood fill, save) and the task's span (start to end, model load included).

Reported per chunk (medians over chunks): the chunk time ``t_i``; run_inference's overhead
``W_i - t_i`` (process start, TensorFlow import, model load); the batch task's overhead per chunk
``(span - sum t_i) / K`` (model load amortised over the K chunks, plus status files and done
checks) and its marginal part ``(span after the first chunk started - sum t_i) / K`` (bookkeeping
between chunks only); each as a fraction of the median chunk time. Also the submit-to-done wall
time of the batch command (queueing, process start, ``--wait`` polling every 5 s). Results of both
ways are compared chunk by chunk (identical on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffn.axes import BoundingBox, parse_xyz, split_box  # noqa: E402
from ffn.demo import write_sample_request  # noqa: E402
from ffn.inference import storage  # noqa: E402
from ffn.inference.request import format_bounding_box  # noqa: E402


def _request(path: Path, out: Path) -> str:
  return str(write_sample_request(path, out))


def _ffn(*args: str) -> float:
  """Runs ``python -m ffn.cli ARGS`` from the repository root; returns its wall time (s)."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "ffn.cli", *args], cwd=REPO, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  return time.perf_counter() - start


def _labels(out: Path, box: BoundingBox) -> np.ndarray:
  return storage.load_segmentation_file(storage.segmentation_path(str(out), box.start[::-1]))[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--box", default="27,27,27,96,96,96", help="x,y,z start then x,y,z size")
  parser.add_argument("--chunk", default="64,64,64")
  parser.add_argument("--overlap", default="32,32,32")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--cluster", default="local", help="cluster of the batch run (local|slurm)")
  parser.add_argument("--output_json", default=None)
  args = parser.parse_args()
  values = [int(v) for v in args.box.split(",")]
  box = BoundingBox(values[:3], values[3:])
  chunk, overlap = parse_xyz(args.chunk, "--chunk"), parse_xyz(args.overlap, "--overlap")
  chunks = split_box(box, chunk, overlap)
  tiling = ["--subvolume_size", args.chunk, "--overlap", args.overlap]
  with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
    tmp_path = Path(tmp)
    batch_out = tmp_path / "batch"
    request = _request(tmp_path / "batch.pbtxt", batch_out)
    load = os.getloadavg()[0]
    batch_wall = _ffn("batch_inference", "--inference_request", request, "--bounding_box",
                      format_bounding_box(box), *tiling, "--compute_dtype", args.dtype,
                      "--num_tasks", "1", "--wait", "--cluster", args.cluster,
                      "--slurm_mem_gb", "3", "--slurm_time_min", "60")
    task = json.loads((batch_out / "batch" / "tasks" / "0001_0.json").read_text())
    ids = ["_".join(str(int(v)) for v in c.start) for c in chunks]
    t = {i: task["seconds"][i] for i in ids}
    first_start = min(task["finished"][i] - t[i] for i in ids)
    span = task["ended"] - task["started"]
    ri_wall = {}
    for c, i in zip(chunks, ids):
      out = tmp_path / f"ri_{i}"
      ri_wall[i] = _ffn("run_inference", "--inference_request", _request(
          tmp_path / f"ri_{i}.pbtxt", out), "--bounding_box", format_bounding_box(c),
          "--compute_dtype", args.dtype)
    identical = all(np.array_equal(_labels(batch_out, c), _labels(tmp_path / f"ri_{i}", c))
                    for c, i in zip(chunks, ids))
  k = len(chunks)
  chunk_s = statistics.median(t.values())
  ri_over = statistics.median(ri_wall[i] - t[i] for i in ids)
  batch_over = (span - sum(t.values())) / k
  marginal = (task["ended"] - first_start - sum(t.values())) / k
  result = {
      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
      "load_at_start": load, "box": args.box, "chunk": args.chunk, "overlap": args.overlap,
      "chunks": k, "dtype": args.dtype, "cluster": args.cluster,
      "chunk_s_median": chunk_s, "run_inference_overhead_s_median": ri_over,
      "batch_overhead_s_per_chunk": batch_over, "batch_marginal_overhead_s_per_chunk": marginal,
      "batch_task_startup_s": first_start - task["started"], "batch_command_wall_s": batch_wall,
      "run_inference_wall_s_total": sum(ri_wall.values()), "identical": identical,
  }
  print(f"{k} chunks of {args.chunk} (overlap {args.overlap}), {args.dtype}; load {load:.2f}")
  print(f"chunk time (median)                       {chunk_s:7.2f} s")
  print(f"run_inference overhead per chunk (median) {ri_over:7.2f} s  "
        f"({100 * ri_over / chunk_s:.1f}% of a chunk)")
  print(f"batch task overhead per chunk             {batch_over:7.2f} s  "
        f"({100 * batch_over / chunk_s:.1f}%; model load amortised over {k})")
  print(f"batch marginal overhead per chunk         {marginal:7.3f} s  "
        f"({100 * marginal / chunk_s:.2f}%)")
  print(f"batch task start to first chunk           {first_start - task['started']:7.2f} s")
  print(f"wall: batch command {batch_wall:.1f} s, run_inference calls {sum(ri_wall.values()):.1f} s;"
        f" results identical: {identical}")
  if args.output_json:
    Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
