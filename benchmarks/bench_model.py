"""Per-call time of the fib25 FFN (depth 12, 33^3 FOV) through ``ffn.models.load``.

Compares float32 (baseline) and bfloat16 compute at batch 1 and 4, in one run, with the real
google/ffn fib25 weights. Prints the median of ``--repeats`` calls after a warm-up.

  .venv/bin/python benchmarks/bench_model.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

CKPT = Path(__file__).resolve().parents[2] / "shared/data/fib25/model/model.ckpt-27465036"
ARGS = {"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}


def median_call_s(model, x: np.ndarray, repeats: int) -> float:
  model(x)  # trace + warm-up
  model(x)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    model(x)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", default=str(CKPT))
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  import ffn.models
  rng = np.random.default_rng(0)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
  results = {}
  for dtype in ("float32", "bfloat16"):
    model = ffn.models.load(args.checkpoint, "convstack_3d", ARGS, compute_dtype=dtype)
    for batch in (1, 4):
      x = rng.normal(size=(batch, 33, 33, 33, 2)).astype(np.float32)
      results[(dtype, batch)] = median_call_s(model, x, args.repeats)
  base = results[("float32", 1)]
  for (dtype, batch), sec in results.items():
    print(f"{dtype:9s} batch {batch}: {1000 * sec:7.1f} ms/call, {1000 * sec / batch:6.1f} ms/FOV, "
          f"{base * batch / sec:5.2f}x FOV throughput vs float32 batch 1")


if __name__ == "__main__":
  main()
