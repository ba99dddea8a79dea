"""Overhead of running the training step under ``tf.distribute.MirroredStrategy`` (one CPU device)
against the plain single-process step, fib25-like model with a small FOV (depth 4, FOV 17^3).

Median of ``--repeats`` steps after warm-up, fixed random batch (no data loading). Multi-worker
scaling (1 vs 2 Slurm tasks) is not measured here: see benchmarks/README.md.

  .venv/bin/python benchmarks/bench_distributed.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=4)
  args = parser.parse_args()
  import tensorflow as tf
  from ffn.training.trainer import Trainer, TrainConfig
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}")
  model_args = {"depth": 4, "fov_size": [17, 17, 17], "deltas": [4, 4, 4]}
  rng = np.random.default_rng(0)
  b = args.batch_size
  x = rng.normal(size=(b, 17, 17, 17, 2)).astype(np.float32)
  y = rng.uniform(0.05, 0.95, size=(b, 17, 17, 17, 1)).astype(np.float32)
  results = {}
  for name, strategy in (("plain", None), ("MirroredStrategy(1 CPU)", tf.distribute.MirroredStrategy(["/cpu:0"]))):
    with tempfile.TemporaryDirectory() as tmp:
      cfg = TrainConfig(train_coords="", data_volumes="", label_volumes="", model_name="convstack_3d",
                        model_args=model_args, train_dir=tmp, image_mean=128, image_stddev=33,
                        batch_size=b, optimizer="adam")
      trainer = Trainer(cfg, strategy)
      for _ in range(3):
        trainer._run_step(x, y)
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        trainer._run_step(x, y)
        times.append(time.perf_counter() - t0)
      results[name] = float(np.median(times))
  base = results["plain"]
  for name, t in results.items():
    print(f"{name:26s} {t * 1000:8.1f} ms/step  {b / t:8.1f} examples/s  x{t / base:.3f} of plain")


if __name__ == "__main__":
  main()
