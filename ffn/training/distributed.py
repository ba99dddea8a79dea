"""``ffn slurm_train`` / ``slurm_train.py``: FFN training as one Slurm job of several tasks.

Takes every ``ffn train`` flag plus the cluster flags of :mod:`slurm.executor` (with the short
aliases ``--nodes --tasks_per_node --gpus_per_node --cpus_per_task --mem_gb --time --partition
--account --qos --constraint``), submits one job through submitit and prints its id, its logs and
how to follow it. Every task of the job runs :class:`DistributedTraining`:

* ``--strategy sync`` (default): one task -> ``tf.distribute.MirroredStrategy`` over the task's
  devices (all GPUs of the node, or the CPU); several tasks (per node or across nodes) ->
  ``MultiWorkerMirroredStrategy`` with the task list of the allocation. Gradients are averaged
  over all replicas every step. Only task 0 (the chief) writes checkpoints and summaries to
  ``--train_dir``; the others save into a scratch directory that they delete.
* ``--strategy async``: ``ParameterServerStrategy``. Task 0 is the coordinator (chief), tasks
  1..``--num_ps`` are parameter servers, the remaining tasks workers (at least one); the
  parameter servers and workers are ``tf.distribute.Server``s. The example stream (Python, h5py)
  runs on the coordinator, which keeps one set of batch slots per worker and schedules their
  steps with a ``ClusterCoordinator``: each worker applies its own updates to the variables on
  the parameter servers without waiting for the others.

Batch size: ``--batch_size`` is per replica; the global batch is ``batch_size x replicas``
(replicas: all devices of all tasks for sync, the workers for async). ``--scale_lr_with_replicas``
multiplies ``--learning_rate`` by the number of replicas (the linear scaling rule).

Ports: task ``i`` on a node listens on ``--port_base + i``; by default the port base is derived
from the job id (``20000 + job_id % 20000``, stepping by 16), so that jobs sharing a node differ.

Preemption: submitit asks Slurm for ``USR2`` 90 s before the time limit (and ``scancel --signal
USR2`` simulates a preemption); task 0 then calls :meth:`DistributedTraining.checkpoint`, which
saves a checkpoint and resubmits the same callable, and Slurm requeues the job: the new run
resumes from the latest checkpoint in ``--train_dir``. ``SIGTERM`` saves and stops (status 3);
``SIGUSR1`` to all tasks (``scancel --signal USR1 <job>``) saves and continues.
``--train_dir`` must be on a file system every node sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from ffn.errors import FFNError
from ffn.training import cli as train_cli

_log = logging.getLogger("ffn.training")

STRATEGIES = ("sync", "async")
# Short flag -> the slurm.executor flag it stands for.
ALIASES = {"nodes": "slurm_nodes", "tasks_per_node": "slurm_tasks_per_node",
           "gpus_per_node": "slurm_gpus_per_node", "cpus_per_task": "slurm_cpus_per_task",
           "mem_gb": "slurm_mem_gb", "time": "slurm_time_min", "partition": "slurm_partition",
           "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint"}
_ALIAS_TYPES = {"nodes": int, "tasks_per_node": int, "gpus_per_node": int, "cpus_per_task": int,
                "mem_gb": float, "time": int}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  train_cli.add_arguments(parser)
  add_slurm_arguments(parser)
  group = parser.add_argument_group("distributed training")
  for alias, dest in ALIASES.items():
    group.add_argument(f"--{alias}", dest=dest, type=_ALIAS_TYPES.get(alias, str),
                       default=argparse.SUPPRESS, help=f"same as --{dest}" +
                       (" (minutes)" if alias == "time" else ""))
  group.add_argument("--strategy", choices=STRATEGIES, default="sync",
                     help="sync: (Multi-Worker)MirroredStrategy; async: ParameterServerStrategy "
                          "(default: %(default)s)")
  group.add_argument("--num_ps", type=int, default=1,
                     help="parameter-server tasks for --strategy async (default: %(default)s)")
  group.add_argument("--scale_lr_with_replicas", action="store_true",
                     help="multiply --learning_rate by the number of replicas")
  group.add_argument("--port_base", type=int, default=None,
                     help="first gRPC port of the tasks on a node (default: from the job id)")
  group.add_argument("--wait", action="store_true",
                     help="wait for the job to end and exit with its status")


def run(args: argparse.Namespace) -> int:
  from slurm.executor import JobFailedError, SlurmOptions, make_executor
  options = SlurmOptions.from_args(args)
  tasks = options.nodes * options.tasks_per_node
  if args.strategy == "async" and (args.num_ps < 1 or tasks < args.num_ps + 2):
    raise FFNError(f"--strategy async needs --num_ps >= 1 and at least num_ps + 2 tasks (coordinator, "
                   f"parameter servers, >= 1 worker); got --num_ps {args.num_ps} and {tasks} tasks")
  if args.port_base is not None and not 1024 <= args.port_base <= 65535 - options.tasks_per_node:
    raise FFNError(f"--port_base must be in 1024..{65535 - options.tasks_per_node}, got {args.port_base}")
  cfg = train_cli.config_from_args(args)
  cfg.train_dir = os.path.abspath(cfg.train_dir)
  os.makedirs(cfg.train_dir, exist_ok=True)
  executor = make_executor(options, cfg.train_dir)
  if executor.cluster == "slurm":
    # Slurm's own SIGTERM at the time limit comes after submitit's USR2; make the gap explicit.
    executor.update_parameters(slurm_signal_delay_s=90)
  training = DistributedTraining(dataclasses.asdict(cfg), args.strategy, args.num_ps,
                                 args.scale_lr_with_replicas, args.port_base)
  try:
    job = executor.submit(training)
  except submitit.core.utils.FailedJobError as e:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    raise FFNError(f"the cluster refused the job: {lines[-1] if lines else e}") from e
  print(f"submitted {executor.cluster} job {job.job_id}: {tasks} task(s), --strategy {args.strategy}")
  print(f"  log of task 0:     {job.paths.stderr} (stdout: {job.paths.stdout})")
  print(f"  logs of all tasks: {str(job.paths.stderr).replace('_0_log.err', '_*_log.err')}")
  print(f"  checkpoints:       {cfg.train_dir}")
  print(f"  follow progress:   tail -f {job.paths.stderr}")
  print(f"                     tensorboard --logdir {cfg.train_dir}")
  sys.stdout.flush()
  if not args.wait:
    return 0
  while not job.done():
    time.sleep(2)
  error = job.exception()
  if error is not None:
    raise JobFailedError(job, str(error).strip().splitlines()[-1] if str(error).strip() else "failed")
  return int(job.results()[0] or 0)  # task 0 (the chief or coordinator) holds the status


def port_base_for(job_id: str) -> int:
  """A port base in 20000..39984 derived from the (numeric part of the) Slurm job id."""
  digits = "".join(c for c in str(job_id).split("_")[0] if c.isdigit()) or "0"
  return 20000 + (int(digits) % 1250) * 16


def task_addresses(env: submitit.JobEnvironment, port_base: int) -> list[str]:
  """``host:port`` of every task of the job, by global rank (Slurm's block distribution)."""
  hosts = list(env.hostnames)
  per_node = env.num_tasks // max(env.num_nodes, 1)
  if per_node * env.num_nodes != env.num_tasks or len(hosts) < env.num_nodes:
    raise FFNError(f"job {env.job_id}: {env.num_tasks} tasks on {env.num_nodes} nodes ({hosts}) is "
                   "not the same number of tasks on every node")
  return [f"{hosts[r // per_node]}:{port_base + r % per_node}" for r in range(env.num_tasks)]


def async_cluster(addresses: list[str], num_ps: int) -> dict[str, list[str]]:
  """Task 0: chief (coordinator); the next ``num_ps``: parameter servers; the rest: workers."""
  return {"chief": addresses[:1], "ps": addresses[1:1 + num_ps], "worker": addresses[1 + num_ps:]}


def _role(rank: int, num_ps: int) -> tuple[str, int]:
  if rank == 0:
    return "chief", 0
  if rank <= num_ps:
    return "ps", rank - 1
  return "worker", rank - 1 - num_ps


class DistributedTraining(submitit.helpers.Checkpointable):
  """What every task of a ``slurm_train`` job runs; requeued (same arguments) on preemption."""

  def __init__(self, config: dict[str, Any], strategy: str = "sync", num_ps: int = 1,
               scale_lr_with_replicas: bool = False, port_base: int | None = None):
    if strategy not in STRATEGIES:
      raise FFNError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    self.config, self.strategy, self.num_ps = dict(config), strategy, num_ps
    self.scale_lr_with_replicas, self.port_base = scale_lr_with_replicas, port_base
    self._trainer = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_trainer"] = None  # the live trainer stays in this process
    return state

  def __call__(self) -> int:
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    env = submitit.JobEnvironment()
    port_base = self.port_base if self.port_base is not None else port_base_for(env.job_id)
    addresses = task_addresses(env, port_base)
    _log.info("job %s task %d/%d on %s; tasks: %s", env.job_id, env.global_rank, env.num_tasks,
              env.hostname, ",".join(addresses))
    _share_gpus(env)
    if self.strategy == "sync":
      return self._run_sync(env, addresses)
    return self._run_async(env, addresses)

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """Called by submitit on task 0 at preemption/time-out: saves, then resubmits ``self``."""
    trainer = self._trainer
    if trainer is not None and trainer.is_chief:
      trainer.save()
    return super().checkpoint(*args, **kwargs)

  # -- engines --------------------------------------------------------------------------------

  def _config(self, replicas: int):
    from ffn.training.trainer import TrainConfig
    cfg = TrainConfig(**self.config)
    if self.scale_lr_with_replicas:
      cfg.learning_rate *= replicas
    _log.info("%d replicas: batch %d per replica, global batch %d, learning rate %g", replicas,
              cfg.batch_size, cfg.batch_size * replicas, cfg.learning_rate)
    return cfg

  def _source(self, trainer):
    from ffn.training.data import ExampleSource
    cfg = trainer.cfg
    return ExampleSource(cfg.train_coords, cfg.data_volumes, cfg.label_volumes, trainer.model.fov_size,
                         trainer.model.deltas, cfg.image_mean, cfg.image_stddev, cfg.permutable_axes,
                         cfg.reflectable_axes, cfg.seed)

  def _run_sync(self, env: submitit.JobEnvironment, addresses: list[str]) -> int:
    import tensorflow as tf
    from ffn.training.trainer import Trainer
    if env.num_tasks == 1:
      strategy = tf.distribute.MirroredStrategy()
    else:
      resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
          tf.train.ClusterSpec({"worker": addresses}), task_type="worker", task_id=env.global_rank,
          rpc_layer="grpc")
      strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    cfg = self._config(strategy.num_replicas_in_sync)
    trainer = self._trainer = Trainer(cfg, strategy, worker=env.global_rank, num_workers=env.num_tasks)
    try:
      trainer.restore_or_init()
      if trainer.is_chief:
        trainer.write_flags()
      trainer.attach_data(self._source(trainer))
      status = trainer.run()
      _log.info("worker %d/%d done at step %d: %d examples taken by this worker", env.global_rank,
                env.num_tasks, int(trainer.step.numpy()), int(trainer.examples_taken.numpy()))
      return status
    finally:
      trainer.close()

  def _run_async(self, env: submitit.JobEnvironment, addresses: list[str]) -> int:
    import tensorflow as tf
    cluster = async_cluster(addresses, self.num_ps)
    spec = tf.train.ClusterSpec(cluster)
    role, index = _role(env.global_rank, self.num_ps)
    done_file = Path(self.config["train_dir"]) / f".async-done-{env.job_id}"
    if role != "chief":
      server = tf.distribute.Server(spec, job_name=role, task_index=index, protocol="grpc", start=True)
      _log.info("%s %d serving at %s until the coordinator is done", role, index, server.target)
      while not done_file.exists():  # server.join() would never return; the job must end
        time.sleep(1.0)
      return 0
    try:
      resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
          spec, task_type="chief", task_id=0, rpc_layer="grpc")
      strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
      return AsyncTrainer(self, strategy, len(cluster["worker"])).run()
    finally:
      done_file.write_text("done\n")


class AsyncTrainer:
  """The coordinator's loop for ``--strategy async`` (see the module docstring)."""

  def __init__(self, owner: DistributedTraining, strategy, num_workers: int):
    import tensorflow as tf
    from ffn.training.trainer import Trainer
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    self.num_workers = num_workers
    self.trainer = owner._trainer = Trainer(owner._config(num_workers), strategy)
    self.trainer.restore_or_init()
    self.trainer.write_flags()
    self.trainer.attach_data(owner._source(self.trainer))

  def run(self) -> int:
    """Trains to ``max_steps`` with one batch in flight per worker; 0, or 3 after SIGTERM."""
    import signal
    import numpy as np
    import tensorflow as tf
    from ffn.training.trainer import EXIT_PREEMPTED, _scalar
    trainer, cfg = self.trainer, self.trainer.cfg
    handlers = {s: signal.signal(s, trainer._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    writer = tf.summary.create_file_writer(cfg.train_dir)
    groups = [[None] * cfg.batch_size for _ in range(self.num_workers)]
    in_flight: list[tuple[Any, list] | None] = [None] * self.num_workers
    step0 = int(trainer.step.numpy())
    scheduled, finished, losses = step0, step0, []
    t_start = t_log = t_ckpt = time.monotonic()
    status = 0
    try:
      while finished < cfg.max_steps:
        for g in range(self.num_workers):
          if in_flight[g] is not None:
            remote, views = in_flight[g]
            logits, loss = remote.fetch()
            for i, view in enumerate(views):
              view[...] = logits[i, ..., 0]
            losses.append(float(loss))
            finished += 1
            in_flight[g] = None
          if scheduled < cfg.max_steps and not trainer._stop:
            x, labels, views = trainer.next_batch(groups[g])
            remote = self.coordinator.schedule(trainer.train_step,
                                               args=(tf.constant(x), tf.constant(labels)))
            in_flight[g] = (remote, views)
            scheduled += 1
        now = time.monotonic()
        if losses and (now - t_log >= cfg.summary_rate_secs or len(losses) >= cfg.log_every):
          rate = len(losses) / max(now - t_log, 1e-9)
          _log.info("step %d/%d loss %.4f  %.2f steps/s (%d workers)", finished, cfg.max_steps,
                    float(np.mean(losses)), rate, self.num_workers)
          with writer.as_default(step=finished):
            _scalar("pixel_loss", float(np.mean(losses)))
            _scalar("steps_per_second", rate)
          writer.flush()
          losses, t_log = [], now
        if trainer._stop and all(f is None for f in in_flight):
          trainer.save()
          status = EXIT_PREEMPTED
          break
        if trainer._save_now or now - t_ckpt >= cfg.checkpoint_interval_s:
          trainer.save()
          trainer._save_now, t_ckpt = False, now
      else:
        self.coordinator.join()
        trainer.save()
      _log.info("coordinator done: step %d, %d examples taken, %.2f steps/s overall",
                int(trainer.step.numpy()), int(trainer.examples_taken.numpy()),
                (finished - step0) / max(time.monotonic() - t_start, 1e-9))
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      writer.close()
    return status


def _share_gpus(env: submitit.JobEnvironment) -> None:
  """With several tasks per node and the node's GPUs visible to all, gives each task its share."""
  visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  per_node = env.num_tasks // max(env.num_nodes, 1)
  if per_node > 1 and len(visible) >= per_node and len(visible) % per_node == 0:
    share = len(visible) // per_node
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[env.local_rank * share:(env.local_rank + 1) * share])

