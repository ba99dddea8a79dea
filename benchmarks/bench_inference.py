"""FFN inference on the FIB-25 100^3 test box: time, network evaluations and scores, fp32 vs bfloat16.

  .venv/bin/python benchmarks/bench_inference.py [--data sample_data/fib25] [--size 100]
      [--dtypes float32,bfloat16] [--output_json out.json]

Box: google/ffn's 100^3 benchmark box, x,y,z (75,75,75) of training_sample2 = (25,25,25) of the
shipped crop ``training_sample2_crop.h5`` (the demo's box; with ``--data ../shared/data/fib25`` the
full volume at (75,75,75)), with google/ffn's fib25 request (PolicyPeaks,
init 0.95, pad 0.05, move 0.9, segment 0.6, min size 1000, mean 128, stddev 33).
``--dtypes`` entries are ``compute_dtype`` values, plus two variants of bfloat16 to measure what its
choices cost and buy: ``bfloat16-allconvs`` runs the first and last convolution in bfloat16 too (the
model's ``float32_convs`` emptied), ``bfloat16-oneterm`` uses the weights rounded to bfloat16
instead of two-term weights (``split_weight_dtypes`` emptied). Run it under
``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` to use oneDNN's AVX512-BF16 kernels instead of AMX on a CPU
that has both (what an AMD EPYC without AMX runs). Baseline measured in the same run: the median
time of one bare network call (1x33^3, same dtype), so ``overhead = total / (evaluations * call)``
shows what the flood fill adds around the network; ``non_network_s`` (wall time minus time inside
network calls) is the flood fill's own cost.
google/ffn's code on this box (measured here earlier): VI split 0.597, VI merge 0.711,
Rand error 0.198 (the *adapted* Rand error, 1 - Rand F-score), 24 labels (23 objects + unsegmented),
23.7% unsegmented, 726 evaluations, ~75 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_model import VARIANTS

REPO = Path(__file__).resolve().parents[1]
REQUEST = """
image {{ hdf5: "{data}/{volume}:raw" }}
image_mean: 128
image_stddev: 33
seed_policy: "PolicyPeaks"
model_checkpoint_path: "{data}/model/model.ckpt-27465036"
model_name: "convstack_3d.ConvStack3DFFNModel"
model_args: "{{\\"depth\\": 12, \\"fov_size\\": [33, 33, 33], \\"deltas\\": [8, 8, 8]}}"
segmentation_output_dir: "{out}"
inference_options {{
  init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9
  min_boundary_dist {{ x: 1 y: 1 z: 1 }} segment_threshold: 0.6 min_segment_size: 1000
}}
"""


def volume_and_start(data: str) -> tuple[str, tuple[int, int, int]]:
  """The image file in ``data`` and the benchmark box's start (x, y, z) in its coordinates."""
  if os.path.exists(os.path.join(data, "training_sample2.h5")):
    return "training_sample2.h5", (75, 75, 75)
  return "training_sample2_crop.h5", (25, 25, 25)


def bench(data: str, size: int, dtype: str, start: tuple[int, int, int] | None = None) -> dict:
  from ffn.axes import BoundingBox
  from ffn.inference.request import parse_request
  from ffn.inference.runner import Runner
  from ffn.inference.storage import load_segmentation_file
  from ffn.io.volumes import read_volume
  from ffn.metrics import evaluate
  volume, default_start = volume_and_start(data)
  box = BoundingBox(start or default_start, (size, size, size))
  compute_dtype = dtype.split("-")[0]
  with tempfile.TemporaryDirectory() as out:
    request = parse_request(REQUEST.format(data=data, volume=volume, out=out))
    runner = Runner(request, compute_dtype=compute_dtype)
    t0 = time.perf_counter()
    runner.load_model()
    t_load = time.perf_counter() - t0
    if dtype in VARIANTS:
      setattr(runner.predict.model, VARIANTS[dtype], ())
    elif dtype != compute_dtype:
      raise SystemExit(f"unknown --dtypes entry {dtype!r}")
    x = np.random.default_rng(0).normal(size=(1, 33, 33, 33, 2)).astype(np.float32)
    for _ in range(3):
      runner.predict(x)
    calls = []
    for _ in range(15):
      t = time.perf_counter()
      runner.predict(x)
      calls.append(time.perf_counter() - t)
    call = statistics.median(calls)
    t0 = time.perf_counter()
    path = runner.run(box)
    total = time.perf_counter() - t0
    seg, _ = load_segmentation_file(path)
  gt = read_volume(f"{data}/{volume}:stack", box)
  evals = runner.counters["inference-calls"]
  scores = evaluate(seg, gt)
  return {"dtype": dtype, "box_size": size, "seconds": total, "model_load_s": t_load,
          "evaluations": evals, "network_call_ms_median": 1000 * call,
          "network_s_in_run": runner.counters["inference-time-ms"] / 1000,
          "non_network_s": total - runner.counters["inference-time-ms"] / 1000,
          "overhead_ratio": total / max(evals * call, 1e-9), **scores}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default=str(REPO / "sample_data" / "fib25"),
                      help="folder with training_sample2.h5 or training_sample2_crop.h5 and model/")
  parser.add_argument("--size", type=int, default=100)
  parser.add_argument("--start", default=None,
                      help="box start x,y,z in the image's coordinates (default: benchmark box)")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--output_json", default=None)
  args = parser.parse_args()
  start = tuple(int(v) for v in args.start.split(",")) if args.start else None
  results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
             "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(default)"),
             "runs": [bench(args.data, args.size, d, start) for d in args.dtypes.split(",")]}
  if len(results["runs"]) > 1:
    a, b = results["runs"][0], results["runs"][1]
    results["speedup"] = a["seconds"] / b["seconds"]
    results["adjusted_rand_error_difference"] = abs(a["adjusted_rand_error"] - b["adjusted_rand_error"])
    results["adapted_rand_error_difference"] = abs(a["adapted_rand_error"] - b["adapted_rand_error"])
  for r in results["runs"]:
    print(f"{r['dtype']:>8}: {r['seconds']:.1f} s, {r['evaluations']} evaluations, "
          f"call {r['network_call_ms_median']:.0f} ms, non-network {r['non_network_s']:.1f} s | "
          f"VI split {r['vi_split']:.3f} merge {r['vi_merge']:.3f} 1-ARI {r['adjusted_rand_error']:.3f} "
          f"adapted RE {r['adapted_rand_error']:.3f} "
          f"objects {r['segments']} unsegmented {100 * r['fraction_unsegmented']:.1f}%")
  text = json.dumps(results, indent=2)
  print(text)
  if args.output_json:
    with open(args.output_json, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
