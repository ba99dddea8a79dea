"""Training steps per second with the fib25 architecture (depth 12, FOV 33^3, deltas 8^3, batch 4).

In-run baselines: the same step run eagerly vs as a ``tf.function``, and float32 vs bfloat16
convolutions. The batch is a fixed random input, so this measures the step itself (forward,
backward, clipping, update), not data loading. Median of ``--repeats`` steps after warm-up.

  .venv/bin/python benchmarks/bench_training.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np


def median_step_s(step_fn, x, y, repeats: int) -> float:
  step_fn(x, y)
  step_fn(x, y)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _, loss = step_fn(x, y)
    float(loss)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=4)
  args = parser.parse_args()
  import tensorflow as tf
  from ffn.training.trainer import Trainer, TrainConfig
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"TF {tf.__version__}")
  rng = np.random.default_rng(0)
  b = args.batch_size
  x = tf.constant(rng.normal(size=(b, 33, 33, 33, 2)).astype(np.float32))
  y = tf.constant(rng.uniform(0.05, 0.95, size=(b, 33, 33, 33, 1)).astype(np.float32))
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in ("float32", "bfloat16"):
      cfg = TrainConfig(train_coords="", data_volumes="", label_volumes="",
                        model_name="convstack_3d.ConvStack3DFFNModel",
                        model_args={"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]},
                        train_dir=tmp, image_mean=128, image_stddev=33, batch_size=b,
                        optimizer="momentum", compute_dtype=dtype)
      trainer = Trainer(cfg)
      results[(dtype, "tf.function")] = median_step_s(trainer.train_step, x, y, args.repeats)
      if dtype == "float32":
        results[(dtype, "eager")] = median_step_s(trainer._train_step, x, y, args.repeats)
  base = results[("float32", "eager")]
  for (dtype, mode), sec in results.items():
    print(f"{dtype:9s} {mode:12s} batch {b}: {sec:6.3f} s/step  {1 / sec:5.2f} steps/s  "
          f"{base / sec:5.2f}x vs float32 eager")


if __name__ == "__main__":
  main()
