"""Resegmentation benchmarks: pairs on a large label volume, points per second, radius cost,
kill-and-resume identity.

  .venv/bin/python benchmarks/bench_reseg.py [--labels ../shared/data/fib25/training_sample2.h5:stack]
      [--segmentation work_dirs/reseg/forward/25/25/seg-25_25_25.npz] [--points 6]
      [--radii 16,24,32] [--dtypes float32,bfloat16] [--out work_dirs/reseg/bench]

1. ``pairs``: :func:`ffn.reseg.pairs.find_pairs` on the whole label volume (default: the 250^3
   FIB-25 body ground truth), 26-connected; wall and CPU seconds (on a shared machine the CPU
   time is the comparable number) and peak traced memory (tracemalloc: numpy's allocations),
   next to the volume's own size.
2. points per second with Google's FIB-25 model on the forward segmentation of the shipped 100^3
   box (``--segmentation``; its pairs, largest contact first): for each dtype, ``--points`` points
   one at a time, and the same points 4 at a time in batches of 4.
3. the cost of one point against the radius (float32... the first dtype), same points.
4. kill-and-resume: the batched run of the first dtype stopped after a quarter of its network
   calls, then resumed in a fresh processor; every pair file's probability maps, deletes,
   histories and start points must equal the uninterrupted batched run's, and so must the
   analysed affinities.
Prints one JSON document (also written to ``<out>/bench_reseg.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffn.demo import write_sample_request  # noqa: E402
from ffn.inference import inference_pb2  # noqa: E402
from ffn.inference.canvas import InferenceInterrupted  # noqa: E402
from ffn.inference.request import load_request  # noqa: E402
from ffn.io.volumes import read_volume, write_h5  # noqa: E402
from ffn.reseg import analyze, pairs  # noqa: E402
from ffn.reseg.run import make_processor, process_points, target_path  # noqa: E402


def bench_pairs(spec: str) -> dict:
  labels = read_volume(spec, dtype_kinds="ui")
  tracemalloc.start()
  start, cpu = time.perf_counter(), time.process_time()
  table = pairs.find_pairs(labels)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  return {"labels": spec, "shape_zyx": list(labels.shape), "pairs": len(table),
          "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_traced_mb": round(peak / 2 ** 20, 1),
          "volume_mb": round(labels.nbytes / 2 ** 20, 1)}


def make_request(out: Path, seg_npz: str, radius: int, n_points: int) -> inference_pb2.ResegmentationRequest:
  from ffn.inference.storage import corner_from_path, load_segmentation_file
  request_path = write_sample_request(out / "inference.pbtxt", out / "unused")
  inference = load_request(str(request_path))
  seg, _ = load_segmentation_file(seg_npz)
  corner = np.array(corner_from_path(seg_npz))
  base_path = out / "base.h5"
  if not base_path.exists():
    full = np.zeros((150, 150, 150), np.uint64)
    full[tuple(slice(int(c), int(c) + n) for c, n in zip(corner, seg.shape))] = seg
    write_h5(str(base_path), "seg", full)
  inference.init_segmentation.hdf5 = f"{base_path}:seg"
  table = pairs.find_pairs(seg, corner_zyx=corner)
  inside = np.all((table.point_zyx >= radius) & (table.point_zyx < 150 - radius), axis=1)
  order = [i for i in np.argsort(-table.area, kind="stable") if inside[i]][:n_points]
  request = inference_pb2.ResegmentationRequest(inference=inference, output_directory=str(out))
  request.radius.x = request.radius.y = request.radius.z = radius
  for i in order:
    p = request.points.add(id_a=int(table.id_a[i]), id_b=int(table.id_b[i]))
    z, y, x = (int(v) for v in table.point_zyx[i])
    p.point.x, p.point.y, p.point.z = x, y, z
  return request


def timed_run(request, dtype: str, batch: int, concurrent: int) -> float:
  processor = make_processor(request, dtype)
  processor.runner.load_model()
  start = time.perf_counter()
  process_points(processor, range(len(request.points)), batch, concurrent)
  return time.perf_counter() - start


def file_contents(request) -> list:
  out = []
  for i in range(len(request.points)):
    with np.load(target_path(request, i), allow_pickle=True) as data:
      out.append((data["probs"].tobytes(), [d.tolist() for d in data["deletes"]],
                  [h.tolist() for h in data["histories"]],
                  [s.tolist() for s in data["start_points"]]))
  return out


def affinities(request) -> list:
  base = read_volume(request.inference.init_segmentation.hdf5)
  return analyze.analyze_request(request, lambda box: base[box.to_slices()])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--labels", default=str(REPO.parent / "shared/data/fib25/training_sample2.h5")
                      + ":stack")
  parser.add_argument("--segmentation", default=str(REPO / "work_dirs/reseg/forward/25/25/"
                                                    "seg-25_25_25.npz"))
  parser.add_argument("--points", type=int, default=6)
  parser.add_argument("--radii", default="16,24,32")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--out", default=str(REPO / "work_dirs/reseg/bench"))
  parser.add_argument("--skip", default="", help="comma list of sections to skip: pairs,points,radius,resume")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result: dict = {"cpu": os.cpu_count(), "load_1min_start": round(os.getloadavg()[0], 1)}
  if "pairs" not in skip:
    result["pairs"] = bench_pairs(args.labels)
    print(json.dumps(result["pairs"]), flush=True)
  dtypes = args.dtypes.split(",")
  radii = [int(r) for r in args.radii.split(",")]
  if "points" not in skip:
    result["points_per_s"] = {}
    for dtype in dtypes:
      for batch, concurrent in ((1, 1), (4, 4)):
        work = out / f"points-{dtype}-b{batch}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        request = make_request(work, args.segmentation, 24, args.points)
        seconds = timed_run(request, dtype, batch, concurrent)
        key = f"{dtype} radius 24 batch {batch} x {concurrent} canvases"
        result["points_per_s"][key] = round(len(request.points) / seconds, 3)
        print(key, result["points_per_s"][key], "points/s", flush=True)
  if "radius" not in skip:
    result["seconds_per_point_by_radius"] = {}
    for radius in radii:
      work = out / f"radius-{radius}"
      shutil.rmtree(work, ignore_errors=True)
      work.mkdir(parents=True)
      request = make_request(work, args.segmentation, radius, args.points)
      seconds = timed_run(request, dtypes[0], 1, 1)
      result["seconds_per_point_by_radius"][f"{dtypes[0]} r={radius} ({len(request.points)} points)"] = \
          round(seconds / max(len(request.points), 1), 2)
      print(radius, seconds / max(len(request.points), 1), "s/point", flush=True)
  if "resume" not in skip:
    ref_dir, kill_dir = out / "resume-ref", out / "resume-killed"
    for d in (ref_dir, kill_dir):
      shutil.rmtree(d, ignore_errors=True)
      d.mkdir(parents=True)
    ref = make_request(ref_dir, args.segmentation, 24, args.points)
    calls = {"n": 0}
    processor = make_processor(ref, dtypes[0])
    processor.runner.load_model()
    model = processor.runner.predict

    def counting(x):
      calls["n"] += 1
      return model(x)

    processor.runner.predict = counting
    process_points(processor, range(len(ref.points)), 4, 4)
    killed = make_request(kill_dir, args.segmentation, 24, args.points)
    first = make_processor(killed, dtypes[0])
    first.runner.load_model()
    limit, seen = max(calls["n"] // 4, 1), {"n": 0}
    model2 = first.runner.predict

    def stopping(x):
      seen["n"] += 1
      if seen["n"] == limit:
        threading.Thread(target=first.request_stop).start()
      return model2(x)

    first.runner.predict = stopping
    try:
      process_points(first, range(len(killed.points)), 4, 4)
      stopped = False
    except InferenceInterrupted:
      stopped = True
    files_after_stop = sum(os.path.exists(target_path(killed, i)) for i in range(len(killed.points)))
    process_points(make_processor(killed, dtypes[0]), range(len(killed.points)), 4, 4)
    same_files = file_contents(ref) == file_contents(killed)
    a, b = affinities(ref), affinities(killed)
    keys = [k for k in analyze.COLUMNS if k not in ("reason",)]
    same_affinities = [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    result["kill_and_resume"] = {"dtype": dtypes[0], "points": len(ref.points),
                                 "network_calls": calls["n"], "stopped_after_calls": limit,
                                 "stopped": stopped, "files_after_stop": files_after_stop,
                                 "identical_files": same_files,
                                 "identical_affinities": same_affinities}
    print(json.dumps(result["kill_and_resume"]), flush=True)
  result["load_1min_end"] = round(os.getloadavg()[0], 1)
  text = json.dumps(result, indent=1)
  (out / "bench_reseg.json").write_text(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
