"""Per-call time and accuracy of the fib25 FFN (depth 12, 33^3 FOV) through ``ffn.models.load``.

Times, in one run, every ``compute_dtype`` (float32 = baseline, bfloat16, float16) at batch 1 and 4,
the same dtypes compiled with XLA (``jit_compile=True``) at batch 1, and a bare stack of the same
25 ``tf.nn.conv3d`` + bias + ReLU ops (no model code, float32) as the floor of what TensorFlow does
on this CPU. Calls are interleaved: each round calls every configuration once, and each reported
time is the median over ``--repeats`` rounds after two warm-up calls (the first call's time, which
includes tracing and for XLA the compilation, is reported separately), so load drifting during the
run hits every configuration alike.

Accuracy: logits of every non-float32 configuration against float32 (no XLA) on ``--patches`` real
33^3 image patches of the shipped ``training_sample2_crop.h5`` (raw, normalised (raw - 128) / 33),
with an inference seed channel (logit(0.05) everywhere, logit(0.95) at the centre voxel): max,
median and mean (signed) difference, and the fraction of voxels on the same side of 0.5 and of
the flood fill's move threshold 0.9 as float32.

``--dtypes`` entries are ``compute_dtype`` values, plus two variants of bfloat16 to measure what its
choices cost and buy: ``bfloat16-allconvs`` runs the first and last convolution in bfloat16 too
(the model's ``float32_convs`` emptied), ``bfloat16-oneterm`` uses the weights rounded to bfloat16
instead of two-term weights (``split_weight_dtypes`` emptied). Run under
``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` to use oneDNN's AVX512-BF16 kernels instead of AMX
(float16 then fails on a CPU with AVX512-FP16: TensorFlow still routes it to oneDNN).

  .venv/bin/python benchmarks/bench_model.py [--repeats 15] [--patches 8]
      [--dtypes float32,bfloat16,float16] [--batches 1,4] [--xla_dtypes float32,bfloat16,float16]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "sample_data/fib25/model/model.ckpt-27465036"
IMAGE = REPO / "sample_data/fib25/training_sample2_crop.h5"
ARGS = {"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}
FOV = 33
# bfloat16 variants accepted in --dtypes: the model attribute each one empties.
VARIANTS = {"bfloat16-allconvs": "float32_convs", "bfloat16-oneterm": "split_weight_dtypes"}


def cpu_model() -> str:
  """The 'model name' line of /proc/cpuinfo (or the platform's machine name)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.machine()


def bare_conv_stack(depth: int = 12) -> Callable:
  """The fib25 layer sequence as raw TF ops with random weights, float32, batch 1."""
  import tensorflow as tf
  rng = np.random.default_rng(1)
  shapes = [(3, 3, 3, 2, 32)] + [(3, 3, 3, 32, 32)] * (2 * depth - 1) + [(1, 1, 1, 32, 1)]
  weights = [tf.constant(rng.normal(0, 0.05, s).astype(np.float32)) for s in shapes]

  @tf.function(input_signature=[tf.TensorSpec([1, FOV, FOV, FOV, 2], tf.float32)])
  def run(x):
    for w in weights[:-1]:
      x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv3d(x, w, [1] * 5, "SAME"), tf.zeros(32)))
    return tf.nn.conv3d(x, weights[-1], [1] * 5, "SAME")
  return lambda v: run(v).numpy()


def image_patches(path: Path, n: int, seed: int = 0) -> np.ndarray:
  """[n, 33, 33, 33, 2] float32: random real image patches (z, y, x) plus an inference seed."""
  import h5py
  with h5py.File(path, "r") as f:
    raw = f["raw"][...]
  rng = np.random.default_rng(seed)
  out = np.empty((n, FOV, FOV, FOV, 2), np.float32)
  for i in range(n):
    z, y, x = (int(rng.integers(0, s - FOV + 1)) for s in raw.shape)
    out[i, ..., 0] = (raw[z:z + FOV, y:y + FOV, x:x + FOV].astype(np.float32) - 128.0) / 33.0
  out[..., 1] = np.log(0.05 / 0.95)
  out[:, FOV // 2, FOV // 2, FOV // 2, 1] = np.log(0.95 / 0.05)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", default=str(CKPT))
  parser.add_argument("--image", default=str(IMAGE), help="HDF5 with dataset 'raw' (uint8, z,y,x)")
  parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
  parser.add_argument("--patches", type=int, default=8, help="real image patches for accuracy")
  parser.add_argument("--dtypes", default="float32,bfloat16,float16")
  parser.add_argument("--batches", default="1,4")
  parser.add_argument("--xla_dtypes", default="float32,bfloat16,float16",
                      help="dtypes also timed with jit_compile=True at batch 1 ('' for none)")
  args = parser.parse_args()
  import ffn.models
  dtypes = [d for d in args.dtypes.split(",") if d]
  xla_dtypes = [d for d in args.xla_dtypes.split(",") if d]
  batches = [int(b) for b in args.batches.split(",") if b]
  if "float32" not in dtypes or 1 not in batches:
    parser.error("the baseline float32 at batch 1 must be in --dtypes and --batches")
  print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load average at start "
        f"{os.getloadavg()[0]:.2f}; ONEDNN_MAX_CPU_ISA="
        f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(default)')}")

  models = {}
  for dtype in dtypes:
    models[(dtype, False)] = ffn.models.load(args.checkpoint, "convstack_3d", ARGS,
                                             dtype.split("-")[0])
    if dtype in VARIANTS:
      setattr(models[(dtype, False)].model, VARIANTS[dtype], ())
    elif "-" in dtype:
      parser.error(f"unknown --dtypes entry {dtype!r}")
  for dtype in xla_dtypes:
    models[(dtype, True)] = ffn.models.load(args.checkpoint, "convstack_3d", ARGS, dtype,
                                            jit_compile=True)
  rng = np.random.default_rng(0)
  inputs = {b: rng.normal(size=(b, FOV, FOV, FOV, 2)).astype(np.float32) for b in batches}
  # (label, batch) -> (callable, input)
  configs: dict[tuple[str, int], tuple[Callable, np.ndarray]] = {}
  for dtype in dtypes:
    for b in batches:
      configs[(dtype, b)] = (models[(dtype, False)], inputs[b])
  for dtype in xla_dtypes:
    configs[(f"{dtype} XLA", 1)] = (models[(dtype, True)], inputs[1])
  configs[("bare TF ops, float32", 1)] = (bare_conv_stack(), inputs[1])

  first: dict[tuple[str, int], float] = {}
  for key, (fn, x) in configs.items():
    t0 = time.perf_counter()
    fn(x)
    first[key] = time.perf_counter() - t0
    fn(x)
  times: dict[tuple[str, int], list[float]] = {key: [] for key in configs}
  loads = [os.getloadavg()[0]]
  for _ in range(args.repeats):
    loads.append(os.getloadavg()[0])
    for key, (fn, x) in configs.items():
      t0 = time.perf_counter()
      fn(x)
      times[key].append(time.perf_counter() - t0)
  loads.append(os.getloadavg()[0])
  print(f"load average at end {loads[-1]:.2f} (max {max(loads):.2f} during the rounds; this run "
        f"adds ~2); median of {args.repeats} interleaved rounds")
  med = {key: float(np.median(t)) for key, t in times.items()}
  base = med[("float32", 1)]
  for (label, b), sec in med.items():
    print(f"{label:20s} batch {b}: {1000 * sec:7.1f} ms/call, {1000 * sec / b:6.1f} ms/FOV, "
          f"{base * b / sec:5.2f}x FOV throughput vs float32 batch 1 "
          f"(first call {first[(label, b)]:.2f} s)")

  patches = image_patches(Path(args.image), args.patches)
  ref_model = models[("float32", False)]
  ref = np.concatenate([ref_model(p[None]) for p in patches])
  print(f"accuracy vs float32 on {args.patches} real 33^3 patches of {Path(args.image).name} "
        f"(|logit| max {np.abs(ref).max():.1f}):")
  for (dtype, xla), model in models.items():
    if (dtype, xla) == ("float32", False):
      continue
    got = np.concatenate([model(p[None]) for p in patches])
    diff = np.abs(got - ref)
    label = f"{dtype} XLA" if xla else dtype
    move = np.log(0.9 / 0.1)
    print(f"{label:20s} max |diff| {diff.max():.2g}, median {np.median(diff):.2g}, "
          f"mean {np.mean(got - ref):+.2g}, sign agreement {np.mean((got > 0) == (ref > 0)):.5f}, "
          f"same side of 0.9 {np.mean((got > move) == (ref > move)):.5f}")


if __name__ == "__main__":
  main()
