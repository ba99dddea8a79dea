"""Distributed training: the ceilings of sync and async, and the async one lifted (issue 16).

``--part mirrored``: the training step under ``tf.distribute.MirroredStrategy`` (one CPU device)
against the plain single-process step, depth-4 model, FOV 17^3 (median of ``--repeats`` steps).

``--part pipeline``: examples/s per thread of the example pipeline on the real 250^3 FIB-25 volume
(``../shared/data/fib25/training_sample2.h5``, gzip HDF5), an uncompressed HDF5 copy and a
TensorStore Zarr copy made in a temp dir; 49^3 examples (fib25 model, fixed policy), volumes read
patch by patch (lazy) and, for reference, from memory (what ``ExampleSource`` does for volumes
under 1 GiB); and the worker-side in-graph example build of ``--async_input worker``.

``--part dispatch``: the async coordinator's ceiling, on the local Slurm (tasks oversubscribing
the cores). One job per worker count (``--workers 1,2,4``): coordinator + 1 parameter server + N
workers; the coordinator runs the old path (``--async_input coordinator``, ``--steps``) and then
the new one (``--async_input worker``, ``--worker_steps``, with ``--batches_per_call`` 1 and 4) on
the same cluster, each after ``--warmup`` steps (tracing). The
network is a stand-in with one scalar variable (logits = constant + mean(variable): the step is
nearly free, the gradient and the parameter-server update are real), fed fib25-sized inputs
(FOV 33^3, deltas 8, batch 4, from training_sample2). ``--moves all`` makes the fixed policy visit
all 27 FOVs of each example (prediction above threshold), ``--moves centre`` only the centre (a
new example per slot every step, the most data work). Reported: wall steps/s; coordinator CPU
(process time of the coordinator process, all its threads) per step, whose inverse is the
ceiling one coordinator core can feed; payload bytes sent per step (tensor bytes of the arguments
and results) and the loopback bytes per step (``/proc/net/dev`` ``lo``, every process's traffic). Each job is a one-CPU allocation whose
job step starts all its tasks (``srun --ntasks --overcommit``).

``--part sync``: the sync path's per-step overhead with 1 vs 2 tasks (MirroredStrategy vs
MultiWorkerMirroredStrategy over 2 Slurm tasks): the same stand-in network with a variable the size
of the fib25 model (638,433 floats, so the all-reduce moves fib25's 2.55 MB of gradient), fixed
policy, batch 4, FOV 33^3.

``--part loss``: the loss with ``--async_input worker`` (coordinator + ps + 2 workers, Slurm) and
with ``ffn train`` (one process) on the shipped 150^3 crop (``sample_data/fib25``), tiny model.

  .venv/bin/python benchmarks/bench_distributed.py --part dispatch [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FFN_SHARED_DATA", REPO.parent / "shared" / "data"))
FIB25 = SHARED / "fib25" / "training_sample2.h5"
CROP = REPO / "sample_data" / "fib25" / "training_sample2_crop.h5"
FIB25_ARGS = {"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}
FIB25_PARAMS = 638_433  # floats in the depth-12, 32-feature convstack (conv0_a .. conv_lom)

from ffn.training.distributed import AsyncTrainer, DistributedTraining  # noqa: E402


def _machine() -> str:
  load = os.getloadavg()
  return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)")


def _coords(path: Path, shape_zyx, size: int, n: int, seed: int = 0) -> None:
  """``n`` random coordinates whose ``size``^3 example lies inside a volume of ``shape_zyx``."""
  from ffn.data.coordinates import write_coordinates
  lo, hi = size // 2, min(shape_zyx) - size // 2 - 1
  centers = np.random.default_rng(seed).integers(lo, hi, size=(n, 3))
  write_coordinates(str(path), np.zeros(n, np.int64), centers, ["v"])


def _config(tmp: Path, volume: str, train_dir: Path, **extra):
  from ffn.training.trainer import TrainConfig
  args = dict(train_coords=str(tmp / "coords.tfr"), data_volumes=f"v:{volume}:raw",
              label_volumes=f"v:{volume}:stack", model_name="convstack_3d", model_args=FIB25_ARGS,
              train_dir=str(train_dir), image_mean=128.0, image_stddev=33.0, batch_size=4,
              optimizer="sgd", learning_rate=0.0, log_every=10**9, summary_rate_secs=10**9,
              checkpoint_interval_s=10**9)
  args.update(extra)
  return TrainConfig(**args)


# -- pipeline ------------------------------------------------------------------------------------

def part_pipeline(args) -> None:
  import h5py
  import tensorflow as tf
  import tensorstore as ts
  from ffn.training import data as data_mod
  from ffn.training import worker_input as wi
  from ffn.training.trainer import Trainer
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  print(_machine())
  with tempfile.TemporaryDirectory() as tmp_s:
    tmp = Path(tmp_s)
    with h5py.File(FIB25, "r") as f:
      raw, stack = f["raw"][:], f["stack"][:]
    with h5py.File(tmp / "plain.h5", "w") as f:
      f["raw"], f["stack"] = raw, stack
    for name, array in (("raw", raw), ("stack", stack)):
      store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp / f"{name}.zarr")},
                       "metadata": {"shape": list(array.shape), "chunks": [64, 64, 64],
                                    "dtype": array.dtype.str}}, create=True).result()
      store.write(array).result()
      compressor = json.loads((tmp / f"{name}.zarr" / ".zarray").read_text())["compressor"]
    _coords(tmp / "coords.tfr", raw.shape, 49, 5000)
    n = args.examples
    rows = []
    specs = {"gzip HDF5 (shared fib25)": (f"v:{FIB25}:raw", f"v:{FIB25}:stack"),
             "uncompressed HDF5 copy": (f"v:{tmp / 'plain.h5'}:raw", f"v:{tmp / 'plain.h5'}:stack"),
             f"TensorStore Zarr copy (64^3 chunks, {compressor['id'] if compressor else 'raw'})": (f"v:zarr://{tmp / 'raw.zarr'}",
                                                          f"v:zarr://{tmp / 'stack.zarr'}")}
    for lazy in (True, False):
      for name, (image, labels) in specs.items():
        data_mod.IN_MEMORY_BYTES = 0 if lazy else 1 << 30
        cfg = _config(tmp, "", tmp / "td", data_volumes=image, label_volumes=labels)
        trainer = Trainer(cfg)
        source = trainer.make_source()
        source.example(0)
        t0 = time.perf_counter()
        for i in range(1, n + 1):
          source.example(i)
        dt = time.perf_counter() - t0
        rows.append((name, "patch by patch" if lazy else "in memory", n / dt))
    # The worker-side build of --async_input worker: slices of the in-memory volumes.
    cfg = _config(tmp, str(tmp / "plain.h5"), tmp / "td")
    trainer = Trainer(cfg)
    source = trainer.make_source()
    vols = wi.WorkerVolumes(source, str(tmp / "cache"))
    planner = wi.Planner(source, vols, 4, trainer.model.deltas, True)
    fov = wi.InGraphFov(trainer, tuple(int(v) for v in source.size_xyz[::-1]))
    volumes_3d = next(iter(vols.dataset()))
    build = tf.function(lambda *a: fov.examples(*volumes_3d, *a))
    plans = [[tf.constant(v) for v in list(planner.plan(4 * i).values())[:5]] for i in range(n // 4 + 1)]
    build(*plans[0])
    t0 = time.perf_counter()
    for p in plans[1:]:
      build(*p)
    dt = time.perf_counter() - t0
    rows.append(("worker input: in-graph slices (any source)", "in memory (worker)",
                 4 * (len(plans) - 1) / dt))
  print(f"\n49^3 examples (fib25 model, fixed policy), one thread, {n} examples each:")
  print("| volume | read | examples/s |\n|---|---|---|")
  for name, how, rate in rows:
    print(f"| {name} | {how} | {rate:.0f} |")


# -- stand-in network (dispatch, sync) ----------------------------------------------------------

def install_stand_in(trainer, params: int, logit: float) -> None:
  """Replaces the trainer's network by logits = ``logit`` + mean(v), v: ``params`` floats (zero),
  created under the trainer's strategy (on the parameter servers for async)."""
  import tensorflow as tf
  from ffn.training.optimizer import Optimizer
  real = trainer.model

  class StandIn(tf.Module):
    def __init__(self):
      super().__init__(name="stand_in")
      self.fov_size, self.deltas = real.fov_size, real.deltas
      self.v = tf.Variable(tf.zeros([params]), name="v")

    def __call__(self, x, compute_dtype=None):
      del compute_dtype
      return tf.zeros_like(x[..., 1:2]) + logit + tf.reduce_mean(self.v)

  cfg = trainer.cfg
  with trainer.strategy.scope():
    trainer.model = StandIn()
    trainer.variables = [trainer.model.v]
    trainer.optimizer = Optimizer(cfg.optimizer, trainer.variables, cfg.learning_rate)


def _lo_bytes() -> int:
  """Bytes received on the loopback interface so far (every process of the machine)."""
  for line in Path("/proc/net/dev").read_text().splitlines():
    if line.strip().startswith("lo:"):
      return int(line.split(":", 1)[1].split()[0])
  return 0


@dataclasses.dataclass
class Phase:
  """Timing of one measured run of a loop."""
  steps: int
  wall_s: float
  cpu_s: float
  lo_bytes: int
  examples: int


def _timed(trainer, run, taken, steps: int) -> Phase:
  """Runs ``run()`` (a training loop) for ``steps`` more steps; ``taken()``: examples so far."""
  trainer.cfg.max_steps = int(trainer.step.numpy()) + steps
  step0, taken0 = int(trainer.step.numpy()), taken()
  t0, c0, b0 = time.monotonic(), time.process_time(), _lo_bytes()
  run()
  t1, c1, b1 = time.monotonic(), time.process_time(), _lo_bytes()
  return Phase(int(trainer.step.numpy()) - step0, t1 - t0, c1 - c0, b1 - b0, taken() - taken0)


class DispatchBench(DistributedTraining):
  """A ``slurm_train`` job whose coordinator times both async input paths (``--part dispatch``)."""

  def __init__(self, config, params: int, logit: float, warmup: int, steps: int, out: str,
               strategy: str = "async", worker_steps: int = 0):
    super().__init__(config, strategy, num_ps=1)
    self.params, self.logit, self.warmup, self.steps, self.out = params, logit, warmup, steps, out
    self.worker_steps = worker_steps or steps

  def _make_trainer(self, cfg, strategy, worker=0, num_workers=1):
    trainer = super()._make_trainer(cfg, strategy, worker, num_workers)
    install_stand_in(trainer, self.params, self.logit)
    if self.strategy == "sync":
      run = trainer.run

      def timed_run() -> int:
        results = {}
        for name, steps in (("warm-up", self.warmup), ("measured", self.steps)):
          results[name] = dataclasses.asdict(
              _timed(trainer, run, lambda: int(trainer.examples_taken.numpy()), steps))
        if trainer.is_chief:
          Path(self.out).write_text(json.dumps(results))
        return 0
      trainer.run = timed_run
    return trainer

  def _coordinate(self, trainer, coordinator, num_workers: int) -> int:
    from ffn.training.worker_input import WorkerInputTrainer
    results = {}
    for name, batches in (("coordinator", 0), ("worker", 1), ("worker", 4)):
      if batches:
        loop = WorkerInputTrainer(trainer, coordinator, num_workers, batches)
        taken, steps = (lambda: loop.next_index), self.worker_steps
      else:
        loop = AsyncTrainer(trainer, coordinator, num_workers)
        taken, steps = (lambda: int(trainer.examples_taken.numpy())), self.steps
      _timed(trainer, loop.run, taken, self.warmup)
      results[f"{name} {batches}"] = dataclasses.asdict(_timed(trainer, loop.run, taken, steps))
    Path(self.out).write_text(json.dumps(results))
    return 0


def _submit(job: DistributedTraining, tasks: int, folder: Path) -> None:
  """Runs ``job`` as ``tasks`` Slurm tasks on one node, however many CPUs it has: a one-CPU
  allocation whose job step starts ``tasks`` tasks (``srun --ntasks --overcommit``); the local
  cluster does not pin tasks to CPUs (TaskPlugin task/none), so all share the machine's cores."""
  from slurm.executor import SlurmOptions, make_executor
  options = SlurmOptions(cluster="slurm", tasks_per_node=1, cpus_per_task=1, mem_gb=12,
                         time_min=20, extra={"overcommit": True})
  executor = make_executor(options, str(folder))
  executor.update_parameters(slurm_srun_args=[f"--ntasks={tasks}", "--overcommit"])
  j = executor.submit(job)
  while not j.done():
    time.sleep(2)
  error = j.exception()
  if error is not None:
    raise RuntimeError(f"job {j.job_id} failed: {str(error)[-2000:]}")


def _payload_old(b: int, fov: int) -> int:
  """Tensor bytes per step of the coordinator path: x [b,f,f,f,2] + labels [b,f,f,f,1] float32
  to the worker, logits [b,f,f,f,1] + loss back."""
  voxels = b * fov ** 3
  return voxels * 2 * 4 + voxels * 4 + voxels * 4 + 4


def part_dispatch(args) -> None:
  from ffn.training import worker_input as wi
  from ffn.training.trainer import Trainer
  print(_machine())
  logit = 3.0 if args.moves == "all" else -3.0
  rows = []
  with tempfile.TemporaryDirectory() as tmp_s:
    tmp = Path(tmp_s)
    _coords(tmp / "coords.tfr", (250, 250, 250), 49, 5000)
    for n in args.workers:
      out = tmp / f"dispatch-{n}.json"
      cfg = _config(tmp, str(FIB25), tmp / f"train-{n}")
      job = DispatchBench(dataclasses.asdict(cfg), 1, logit, args.warmup, args.steps, str(out),
                          worker_steps=args.worker_steps)
      t0 = time.monotonic()
      _submit(job, 2 + n, tmp / f"train-{n}")
      res = json.loads(out.read_text())
      rows.append((n, res, time.monotonic() - t0))
      print(f"{n} workers: {res}", flush=True)
    trainer = Trainer(_config(tmp, str(FIB25), tmp / "plan"))
    source = trainer.make_source()
    planner = wi.Planner(source, wi.WorkerVolumes(source, str(tmp / "cache")), 4, trainer.model.deltas, True)
    call_bytes = sum(np.asarray(v).nbytes for v in planner.plan(0).values()) + 8 + 8 + 4 + 4 * 4
  old_bytes = _payload_old(4, 33)
  print(f"\nasync dispatch, stand-in network (1 scalar variable), batch 4, FOV 33^3, --moves {args.moves}, "
        f"{args.steps} (coordinator input) / {args.worker_steps} (worker input) measured steps after {args.warmup}:")
  print("| workers | input | steps/s (wall) | coordinator CPU ms/step | ceiling steps/s per coordinator "
        "core | coordinator CPU ms/call | payload bytes/step | loopback bytes/step | examples/step |\n"
        "|---|---|---|---|---|---|---|---|---|")
  for n, res, _ in rows:
    for key, r in res.items():
      name, batches = key.split()
      calls = r["steps"] if name == "coordinator" else r["examples"] / (4 * int(batches))
      per_step = (old_bytes if name == "coordinator"
                  else call_bytes * r["examples"] / 4 / max(r["steps"], 1))
      label = "coordinator" if name == "coordinator" else f"worker, {batches} batch(es)/call"
      print(f"| {n} | {label} | {r['steps'] / r['wall_s']:.1f} | {1000 * r['cpu_s'] / r['steps']:.3f} | "
            f"{r['steps'] / max(r['cpu_s'], 1e-9):.0f} | {1000 * r['cpu_s'] / max(calls, 1):.1f} | "
            f"{per_step:,.0f} | {r['lo_bytes'] / r['steps']:,.0f} | {r['examples'] / r['steps']:.3f} |")
  for n, res, _ in rows:
    old = res["coordinator 0"]
    for key in ("worker 1", "worker 4"):
      new = res[key]
      print(f"{n} workers, {key.split()[1]} batch(es)/call: worker input / coordinator input: wall "
            f"x{(new['steps'] / new['wall_s']) / (old['steps'] / old['wall_s']):.1f}, coordinator CPU "
            f"per step x{(old['cpu_s'] / old['steps']) / (new['cpu_s'] / new['steps']):.1f} less")


def part_sync(args) -> None:
  print(_machine())
  rows = []
  with tempfile.TemporaryDirectory() as tmp_s:
    tmp = Path(tmp_s)
    _coords(tmp / "coords.tfr", (250, 250, 250), 49, 5000)
    for tasks in (1, 2):
      out = tmp / f"sync-{tasks}.json"
      cfg = _config(tmp, str(FIB25), tmp / f"train-{tasks}")
      job = DispatchBench(dataclasses.asdict(cfg), FIB25_PARAMS, 3.0, args.warmup, args.steps,
                          str(out), strategy="sync")
      _submit(job, tasks, tmp / f"train-{tasks}")
      rows.append((tasks, json.loads(out.read_text())["measured"]))
      print(tasks, rows[-1][1], flush=True)
  print(f"\nsync, stand-in network with fib25's {FIB25_PARAMS:,} parameters (all-reduced each step), batch 4 "
        f"per task, FOV 33^3, fixed policy (all 27 moves), {args.steps} measured steps:")
  print("| tasks | strategy | ms/step (wall) | steps/s | task-0 CPU ms/step |\n|---|---|---|---|---|")
  for tasks, r in rows:
    name = "MirroredStrategy" if tasks == 1 else "MultiWorkerMirroredStrategy"
    print(f"| {tasks} | {name} | {1000 * r['wall_s'] / r['steps']:.1f} | {r['steps'] / r['wall_s']:.1f} | "
          f"{1000 * r['cpu_s'] / r['steps']:.1f} |")
  (_, a), (_, b) = rows
  print(f"overhead of the second task: {1000 * (b['wall_s'] / b['steps'] - a['wall_s'] / a['steps']):.1f} ms/step")


def part_loss(args) -> None:
  """Worker-input async (2 workers) vs `ffn train`: pixel loss over the run, shipped crop."""
  import h5py
  print(_machine())
  with tempfile.TemporaryDirectory() as tmp_s:
    tmp = Path(tmp_s)
    with h5py.File(CROP, "r") as f:
      shape = f["raw"].shape
    _coords(tmp / "coords.tfr", shape, 21, 2000)
    common = ["--train_coords", str(tmp / "coords.tfr"), "--data_volumes", f"v:{CROP}:raw",
              "--label_volumes", f"v:{CROP}:stack", "--model_name", "convstack_3d", "--model_args",
              '{"depth": 2, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}', "--image_mean", "128",
              "--image_stddev", "33", "--batch_size", "4", "--max_steps", str(args.steps),
              "--optimizer", "adam", "--learning_rate", "0.003", "--log_every", str(args.steps // 10),
              "--checkpoint_interval_s", "100000"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    runs = {}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(REPO / "train.py"), *common, "--train_dir", str(tmp / "single")],
                       capture_output=True, text=True, env=env, cwd=REPO)
    runs["ffn train (1 process)"] = (re.findall(r"step (\d+)/\d+ loss ([\d.]+)", p.stderr), time.monotonic() - t0)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(REPO / "slurm_train.py"), *common, "--train_dir", str(tmp / "async"),
                        "--cluster", "slurm", "--tasks_per_node", "4", "--cpus_per_task", "1", "--mem_gb", "3",
                        "--time", "20", "--strategy", "async", "--async_input", "worker", "--wait"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    log = next((tmp / "async" / "logs").glob("*/*_0_log.err")).read_text()
    runs["slurm_train async, worker input (2 workers)"] = (
        re.findall(r"step (\d+)/\d+ loss ([\d.]+)", log), time.monotonic() - t0)
  print("\npixel loss, depth-2 FOV 9^3 model, Adam 0.003, batch 4 (per worker), shipped 150^3 crop:")
  for name, (points, wall) in runs.items():
    print(f"{name} ({wall:.0f} s): " + ", ".join(f"{s}: {float(l):.3f}" for s, l in points))


def part_mirrored(args) -> None:
  import tensorflow as tf
  from ffn.training.trainer import TrainConfig, Trainer
  print(_machine())
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--part", choices=("mirrored", "pipeline", "dispatch", "sync", "loss"), default="dispatch")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--examples", type=int, default=200, help="--part pipeline: examples per row")
  parser.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
  parser.add_argument("--moves", choices=("all", "centre"), default="all")
  parser.add_argument("--warmup", type=int, default=60)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--worker_steps", type=int, default=1500,
                      help="--part dispatch: measured steps of the worker-input path")
  args = parser.parse_args()
  {"mirrored": part_mirrored, "pipeline": part_pipeline, "dispatch": part_dispatch, "sync": part_sync,
   "loss": part_loss}[args.part](args)


if __name__ == "__main__":
  main()
