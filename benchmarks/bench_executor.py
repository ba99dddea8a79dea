"""Batched inference over several subvolumes: one canvas at a time vs canvases batched together.

  .venv/bin/python benchmarks/bench_executor.py [--data ../shared/data/fib25] [--dtype float32]
      [--box 50,50,50,128,128,64] [--subvolume 64,64,64] [--configs 1x1,4x1,4x4] [--output_json f]

A box of training_sample2 (x,y,z start then size) is split into subvolumes; each configuration
``CxB`` segments all of them with C canvases at once and network batches of up to B inputs
(``ffn.inference.executor.segment_boxes``), with google/ffn's fib25 request. The baseline in the
same run is ``1x1`` (one canvas at a time, one input per call). Reported: wall time, network
inputs, calls, mean batch, wall ms per input, the speed ratio vs the baseline, and whether every
subvolume's segmentation is identical to the baseline's; each configuration runs ``--repeats``
times, interleaved, and the run with the median wall time is shown. ``--network instant`` swaps
the network for a fixed answer, so the time is the host side alone (seeds, flood-fill bookkeeping,
executor and thread overhead): an upper bound on steps/s however fast the accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from bench_inference import REQUEST


def instant_network(x: np.ndarray) -> np.ndarray:
  """``--network instant``: no network, a fixed ball of logit +3 (radius 12) around the FoV
  centre, -3 elsewhere; measures only the host side (flood fill, executor, threads, GIL)."""
  shape = x.shape[1:4]
  zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
  c = [n // 2 for n in shape]
  ball = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= 12 ** 2
  logits = np.where(ball, 3.0, -3.0).astype(np.float32)[None, ..., None]
  return np.repeat(logits, x.shape[0], axis=0)


def run_config(data: str, dtype: str, boxes, concurrent: int, batch: int, out: str,
               network: str = "model") -> dict:
  from ffn.inference.executor import segment_boxes
  from ffn.inference.request import parse_request
  from ffn.inference.runner import Runner
  from ffn.inference.storage import load_segmentation_file
  runner = Runner(parse_request(REQUEST.format(data=data, out=out)), compute_dtype=dtype)
  runner.load_model()
  if network == "instant":
    runner.predict = instant_network
  x = np.zeros((batch, 33, 33, 33, 2), np.float32)
  for _ in range(2):  # trace and warm up every batch size that can occur
    for b in range(1, batch + 1):
      runner.predict(x[:b])
  t0 = time.perf_counter()
  paths = segment_boxes(runner, boxes, batch_size=batch, concurrent_requests=concurrent)
  wall = time.perf_counter() - t0
  segs = [load_segmentation_file(p)[0] for p in paths]
  inputs = runner.counters["inference-calls"]
  calls = runner.counters["executor-batches"] or inputs
  return {"config": f"{concurrent}x{batch}", "wall_s": round(wall, 2), "inputs": inputs,
          "calls": calls, "mean_batch": round(inputs / max(calls, 1), 2),
          "ms_per_input": round(1000 * wall / max(inputs, 1), 1), "segs": segs}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default=os.path.join("..", "shared", "data", "fib25"))
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--box", default="50,50,50,128,128,64")
  parser.add_argument("--subvolume", default="64,64,64")
  parser.add_argument("--configs", default="1x1,4x1,4x4")
  parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median)")
  parser.add_argument("--network", choices=("model", "instant"), default="model",
                      help="instant: replace the network by a fixed answer to time the host side only")
  parser.add_argument("--output_json", default=None)
  args = parser.parse_args()
  from ffn.axes import BoundingBox, parse_xyz, split_box
  values = [int(v) for v in args.box.split(",")]
  boxes = split_box(BoundingBox(values[:3], values[3:]), parse_xyz(args.subvolume))
  configs = args.configs.split(",")
  runs: dict[str, list[dict]] = {c: [] for c in configs}
  for _ in range(args.repeats):  # interleaved, so drifting machine load hits every config alike
    for config in configs:
      concurrent, batch = (int(v) for v in config.split("x"))
      with tempfile.TemporaryDirectory() as out:
        runs[config].append(run_config(args.data, args.dtype, boxes, concurrent, batch, out,
                                       args.network))
  results = [sorted(runs[c], key=lambda r: r["wall_s"])[len(runs[c]) // 2] for c in configs]
  base = results[0]
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}; {len(boxes)} subvolumes {args.subvolume}, {args.dtype}, "
        f"median of {args.repeats} runs, network: {args.network}")
  print("| canvases x batch | wall s | inputs | calls | mean batch | ms/input | speed vs 1x1 | same result |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    same = all(np.array_equal(a, b) for a, b in zip(base["segs"], r["segs"]))
    r["same_as_baseline"] = same
    r["speed_vs_baseline"] = round(base["wall_s"] / r["wall_s"], 3)
    print(f"| {r['config']} | {r['wall_s']} | {r['inputs']} | {r['calls']} | {r['mean_batch']} | "
          f"{r['ms_per_input']} | {r['speed_vs_baseline']}x | {same} |")
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump([{k: v for k, v in r.items() if k != "segs"} for r in results], f, indent=1)


if __name__ == "__main__":
  main()
