"""Benchmark: compute_partitions and build_coordinates, ours vs google's algorithm.

Data: the full 250^3 FIB-25 training_sample2 body labels, with google/ffn's README parameters
(thresholds 0.025..0.9, lom_radius 24,24,24, min_size 10000; margin 35,35,35 z,y,x).
Every measurement runs in a fresh subprocess, which reports its wall time, CPU time and peak
resident memory (ru_maxrss) plus a SHA-256 of its output; the parent prints medians and ratios and
checks that the outputs are identical. The reference is :mod:`google_reference` (google's
per-label / per-record algorithms, seeded). CPU time (all threads of the process) is printed
beside wall time because on a shared machine the wall time mostly measures the other jobs.

  .venv/bin/python benchmarks/bench_data_prep.py [--runs 3] [--ref_runs 1] [--skip_ref_coordinates]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "fib25" / "training_sample2.h5"
THRESHOLDS = [0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
LOM_RADIUS = (24, 24, 24)
MIN_SIZE = 10000
MARGIN_ZYX = (35, 35, 35)
SEED = 0


def _child(task: str, workdir: str) -> dict:
  """Runs one task in this (fresh) process and returns its measurements."""
  import h5py
  import numpy as np
  sys.path.insert(0, str(HERE))
  import google_reference
  from ffn.data import coordinates, partitions

  start, cpu0 = time.perf_counter(), time.process_time()
  if task in ("partitions_ours", "partitions_ref"):
    with h5py.File(DATA, "r") as f:
      labels = f["stack"][...]
    start, cpu0 = time.perf_counter(), time.process_time()
    if task == "partitions_ours":
      out = partitions.compute_partitions(labels, THRESHOLDS, LOM_RADIUS, MIN_SIZE)
    else:
      out = google_reference.compute_partitions_reference(labels, THRESHOLDS, LOM_RADIUS, MIN_SIZE)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    np.save(os.path.join(workdir, "partitions.npy"), out)
    digest = hashlib.sha256(out.tobytes()).hexdigest()
  else:
    part = np.load(os.path.join(workdir, "partitions.npy"))
    path = os.path.join(workdir, f"{task}.tfr")
    start, cpu0 = time.perf_counter(), time.process_time()
    if task == "coordinates_ours":
      keys, shapes = coordinates.sample_keys([part], MARGIN_ZYX, SEED)
      volume, centers = coordinates.decode_keys(keys, shapes, MARGIN_ZYX)
      coordinates.write_coordinates(path, volume, centers, ["training_sample2"])
    else:
      records = google_reference.sample_coordinates_reference([part], MARGIN_ZYX, SEED)
      google_reference.write_coordinates_reference(path, records, ["training_sample2"])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    sha = hashlib.sha256()  # of the uncompressed record stream, read in pieces (adds no memory)
    with gzip.open(path) as f:
      for piece in iter(lambda: f.read(1 << 24), b""):
        sha.update(piece)
    digest = sha.hexdigest()
    os.remove(path)
  return {"task": task, "wall_s": elapsed, "cpu_s": cpu, "digest": digest,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run(task: str, workdir: str) -> dict:
  proc = subprocess.run([sys.executable, __file__, "--child", task, "--workdir", workdir],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{task} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(results: list[dict]) -> dict:
  return {"wall_s": statistics.median(r["wall_s"] for r in results),
          "cpu_s": statistics.median(r["cpu_s"] for r in results),
          "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "runs": len(results)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=3, help="runs of our implementation")
  parser.add_argument("--ref_runs", type=int, default=1, help="runs of google's (slow) algorithm")
  parser.add_argument("--skip_ref_coordinates", action="store_true",
                      help="skip google's build_coordinates (several minutes)")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_child(args.child, args.workdir)))
    return
  if not DATA.exists():
    sys.exit(f"data not found: {DATA}")
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; data: {DATA.name} stack 250^3")
  with tempfile.TemporaryDirectory() as workdir:
    table = {}
    for stage in ("partitions", "coordinates"):
      ref_runs = 0 if (stage == "coordinates" and args.skip_ref_coordinates) else args.ref_runs
      runs = {"ref": [_run(f"{stage}_ref", workdir) for _ in range(ref_runs)],
              "ours": [_run(f"{stage}_ours", workdir) for _ in range(args.runs)]}
      digests = {r["digest"] for rs in runs.values() for r in rs}
      if len(digests) != 1:
        raise SystemExit(f"{stage}: outputs differ between runs/implementations: {digests}")
      row = {name: _summary(rs) for name, rs in runs.items() if rs}
      table[stage] = row
      for name, s in row.items():
        print(f"{stage:12s} {name:4s}: median wall {s['wall_s']:7.2f} s, cpu {s['cpu_s']:7.2f} s, "
              f"peak RSS {s['peak_rss_mb']:7.0f} MB ({s['runs']} runs)")
      if "ref" in row:
        print(f"{stage:12s} speedup: wall {row['ref']['wall_s'] / row['ours']['wall_s']:.1f}x, "
              f"cpu {row['ref']['cpu_s'] / row['ours']['cpu_s']:.1f}x, "
              f"memory ratio ours/ref {row['ours']['peak_rss_mb'] / row['ref']['peak_rss_mb']:.2f}; "
              "outputs identical (SHA-256 of the partition array / uncompressed record stream)")
    print(json.dumps(table))


if __name__ == "__main__":
  main()
