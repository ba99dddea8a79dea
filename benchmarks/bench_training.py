"""Training steps per second with the fib25 architecture (depth 12, FOV 33^3, deltas 8^3, batch 4),
and the cost and effect of the EM augmentations (ffn/training/augment.py).

``--part step`` (default): the step itself on a fixed random batch (forward, backward, clipping,
update); in-run baselines: eager vs ``tf.function``, float32 vs bfloat16 convolutions. Median of
``--repeats`` steps after warm-up.

``--part pipeline``: on the shipped FIB-25 crop, examples/s of the example pipeline (49^3 patches
of the fib25 model) without and with every augmentation, next to the steps/s of the real training
loop (fixed FOV policy, batch 4) fed by each, for float32 and bfloat16: the fraction of steps/s the
augmentations cost (issue 13: at most 10% in float32 on CPU).

``--part loss``: a short run of the tiny test model (depth 2, FOV 9^3, deltas 2^3, Adam, batch 4)
without and with every augmentation; loss on a fixed un-augmented evaluation batch before/after.

  .venv/bin/python benchmarks/bench_training.py [--part step|pipeline|loss] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CROP = REPO / "sample_data" / "fib25" / "training_sample2_crop.h5"
FIB25_ARGS = {"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}
TINY_ARGS = {"depth": 2, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}
# Every augmentation at a typical strength (flags of `ffn train`).
ALL_AUGMENTATIONS = dict(rotation_max_deg=180, elastic_alpha=4, elastic_sigma=6, misalign_prob=0.3,
                         misalign_max_shift=6, missing_section_prob=0.02, blur_section_prob=0.02,
                         blur_max_sigma=2, brightness=0.2, contrast=0.2, gamma=0.3,
                         noise_stddev=0.1)


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


def part_step(args) -> None:
  import tensorflow as tf
  from ffn.training.trainer import Trainer, TrainConfig
  rng = np.random.default_rng(0)
  b = args.batch_size
  x = tf.constant(rng.normal(size=(b, 33, 33, 33, 2)).astype(np.float32))
  y = tf.constant(rng.uniform(0.05, 0.95, size=(b, 33, 33, 33, 1)).astype(np.float32))
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in ("float32", "bfloat16"):
      cfg = TrainConfig(train_coords="", data_volumes="", label_volumes="",
                        model_name="convstack_3d.ConvStack3DFFNModel", model_args=FIB25_ARGS,
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


def _coords(path: str, n: int, lo: int, hi: int) -> None:
  from ffn.data.coordinates import write_coordinates
  centers = np.random.default_rng(0).integers(lo, hi, size=(n, 3))
  write_coordinates(path, np.zeros(n, np.int64), centers, ["s2"])


def _config(tmp: str, model_args: dict, augment: dict, **kw):
  from ffn.training.trainer import TrainConfig
  return TrainConfig(train_coords=f"{tmp}/coords.tfr.gz", data_volumes=f"s2:{CROP}:raw",
                     label_volumes=f"s2:{CROP}:stack", model_name="convstack_3d",
                     model_args=model_args, train_dir=f"{tmp}/run{time.monotonic_ns()}",
                     image_mean=128, image_stddev=33, log_every=10 ** 9,
                     checkpoint_interval_s=1e9, summary_rate_secs=1e9, **augment, **kw)


def _examples_per_s(source, n: int) -> float:
  source.example(0)
  t0 = time.perf_counter()
  for i in range(1, n + 1):
    source.example(i)
  return n / (time.perf_counter() - t0)


def _loop_rates(trainers: dict, steps: int, rounds: int) -> dict[str, tuple[float, float]]:
  """{label: (median steps/s of the training loop, examples taken per step)}: the trainers take
  turns, ``steps`` steps each per round, so a change of machine load hits all of them alike."""
  rates: dict[str, list[float]] = {label: [] for label in trainers}
  taken: dict[str, list[int]] = {label: [] for label in trainers}
  for trainer in trainers.values():  # warm-up: tracing, first examples
    trainer.cfg.max_steps = 3
    trainer.run()
  for _ in range(rounds):
    for label, trainer in trainers.items():
      before = int(trainer.examples_taken.numpy())
      trainer.cfg.max_steps = int(trainer.step.numpy()) + steps
      t0 = time.perf_counter()
      trainer.run()
      rates[label].append(steps / (time.perf_counter() - t0))
      taken[label].append(int(trainer.examples_taken.numpy()) - before)
  return {label: (float(np.median(rates[label])), sum(taken[label]) / (steps * rounds))
          for label in trainers}


def part_pipeline(args) -> None:
  from ffn.training.trainer import Trainer
  with tempfile.TemporaryDirectory() as tmp:
    _coords(f"{tmp}/coords.tfr.gz", 2000, 25, 125)  # 49^3 patches inside the 150^3 crop
    print("pipeline (49^3 examples of the fib25 model, shipped crop), wall and CPU time:")
    ms_cpu = {}
    for label, augment in (("plain", {}), ("all augmentations", ALL_AUGMENTATIONS)):
      source = Trainer(_config(tmp, FIB25_ARGS, augment, batch_size=args.batch_size)).make_source()
      cpu0 = time.process_time()
      rate = _examples_per_s(source, args.examples)
      ms_cpu[label] = (time.process_time() - cpu0) / args.examples * 1000
      print(f"  {label:18s} {rate:7.1f} examples/s  {1000 / rate:6.1f} ms/example wall  "
            f"{ms_cpu[label]:6.1f} ms/example CPU")
    for dtype in ("float32", "bfloat16"):
      trainers = {label: Trainer(_config(tmp, FIB25_ARGS, augment, batch_size=args.batch_size,
                                         compute_dtype=dtype, optimizer="momentum"))
                  for label, augment in (("plain", {}), ("all augmentations", ALL_AUGMENTATIONS))}
      for trainer in trainers.values():
        trainer.attach_data(trainer.make_source())
      results = _loop_rates(trainers, args.steps, args.rounds)
      plain_rate = results["plain"][0]
      for label, (rate, per_step) in results.items():
        print(f"  {dtype:9s} {label:18s} loop {rate:6.3f} steps/s (median of {args.rounds})  "
              f"{per_step:4.2f} examples/step = {per_step * ms_cpu[label]:5.1f} ms CPU/step making "
              f"examples (at most {args.batch_size * ms_cpu[label]:5.1f})  "
              f"{rate / plain_rate:5.3f}x plain")


def part_loss(args) -> None:
  from ffn.training import examples
  from ffn.training.trainer import Trainer
  with tempfile.TemporaryDirectory() as tmp:
    _coords(f"{tmp}/coords.tfr.gz", 2000, 8, 142)
    for label, augment in (("plain", {}), ("all augmentations", ALL_AUGMENTATIONS)):
      cfg = _config(tmp, TINY_ARGS, augment, batch_size=4, optimizer="adam",
                    max_steps=args.loss_steps)
      trainer = Trainer(cfg)
      # Fixed evaluation batch: un-augmented examples the runs never take, FOV at the centre.
      plain_source = Trainer(_config(tmp, TINY_ARGS, {}, batch_size=4)).make_source()
      xs, ys = [], []
      for i in range(10 ** 6, 10 ** 6 + 32):
        image, labels = plain_source.example(i)
        seed = examples.initial_seed(labels.shape)
        xs.append(np.stack([examples.crop(image, (0, 0, 0), (9, 9, 9)),
                            examples.crop(seed, (0, 0, 0), (9, 9, 9))], -1))
        ys.append(examples.crop(labels, (0, 0, 0), (9, 9, 9))[..., None])
      x, y = np.stack(xs), np.stack(ys)
      before = trainer.loss_on(x, y)
      trainer.attach_data(trainer.make_source())
      t0 = time.perf_counter()
      trainer.run()
      print(f"loss {label:18s} {args.loss_steps} steps: eval loss {before:.4f} -> "
            f"{trainer.loss_on(x, y):.4f}  ({time.perf_counter() - t0:.1f} s)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--part", choices=["step", "pipeline", "loss"], default="step")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--examples", type=int, default=100, help="pipeline: examples timed")
  parser.add_argument("--steps", type=int, default=5, help="pipeline: loop steps per round")
  parser.add_argument("--rounds", type=int, default=5, help="pipeline: rounds (plain, augmented)")
  parser.add_argument("--loss_steps", type=int, default=300, help="loss: training steps")
  args = parser.parse_args()
  import tensorflow as tf
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"TF {tf.__version__}, load {os.getloadavg()[0]:.1f}")
  {"step": part_step, "pipeline": part_pipeline, "loss": part_loss}[args.part](args)


if __name__ == "__main__":
  main()
