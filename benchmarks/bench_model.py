"""Per-call time of the fib25 FFN (depth 12, 33^3 FOV) through ``ffn.models.load``.

Compares float32 (baseline) and bfloat16 compute at batch 1 and 4, in one run, with the real
google/ffn fib25 weights, and a bare stack of the same 25 ``tf.nn.conv3d`` + bias + ReLU ops
(no model code) as the floor of what TensorFlow does on this CPU. Prints the median of
``--repeats`` calls after a warm-up.

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


def bare_conv_stack(depth: int = 12) -> "tf.types.experimental.ConcreteFunction":
  """The fib25 layer sequence as raw TF ops with random weights, float32, batch 1."""
  import tensorflow as tf
  rng = np.random.default_rng(1)
  shapes = [(3, 3, 3, 2, 32)] + [(3, 3, 3, 32, 32)] * (2 * depth - 1) + [(1, 1, 1, 32, 1)]
  weights = [tf.constant(rng.normal(0, 0.05, s).astype(np.float32)) for s in shapes]

  @tf.function(input_signature=[tf.TensorSpec([1, 33, 33, 33, 2], tf.float32)])
  def run(x):
    for w in weights[:-1]:
      x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv3d(x, w, [1] * 5, "SAME"), tf.zeros(32)))
    return tf.nn.conv3d(x, weights[-1], [1] * 5, "SAME")
  return run


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
  x = rng.normal(size=(1, 33, 33, 33, 2)).astype(np.float32)
  bare = bare_conv_stack()
  results[("bare TF ops, float32", 1)] = median_call_s(lambda v: bare(v).numpy(), x, args.repeats)
  base = results[("float32", 1)]
  for (dtype, batch), sec in results.items():
    print(f"{dtype:20s} batch {batch}: {1000 * sec:7.1f} ms/call, {1000 * sec / batch:6.1f} ms/FOV, "
          f"{base * batch / sec:5.2f}x FOV throughput vs float32 batch 1")


if __name__ == "__main__":
  main()
