"""``ffn slurm_train`` / ``slurm_train.py``: FFN training as one Slurm job of several tasks.

Takes every ``ffn train`` flag plus the cluster flags of :mod:`slurm.executor` (with the short
aliases ``--nodes --tasks_per_node --gpus_per_node --cpus_per_task --mem_gb --time --partition
--account --qos --constraint --strict``), submits one job through submitit and prints its id, its
logs and how to follow it. A request that no node of the cluster can ever run (too many CPUs,
memory or GPUs per node, an unknown partition... per ``sinfo``, :func:`slurm.executor.check_fits`)
is warned about, or refused with ``--strict`` or ``--wait``. Every task of the job runs
:class:`DistributedTraining`:

* ``--strategy sync`` (default): one task -> ``tf.distribute.MirroredStrategy`` over the task's
  devices (all GPUs of the node, or the CPU); several tasks (per node or across nodes) ->
  ``MultiWorkerMirroredStrategy`` over the cluster of ``SlurmClusterResolver(jobs={"worker": n})``.
  Gradients are averaged over all replicas every step. Only task 0 (the chief) writes checkpoints
  and summaries to ``--train_dir``; the others save into a scratch directory that they delete.
* ``--strategy async``: ``ParameterServerStrategy`` over the cluster of
  ``SlurmClusterResolver(jobs={"chief": 1, "ps": num_ps, "worker": n - 1 - num_ps})``. The
  resolver numbers the jobs in sorted order (chief < ps < worker), so task 0 is the coordinator
  (chief), tasks 1..``--num_ps`` are parameter servers and the remaining tasks workers (at least
  one); the parameter servers and workers are ``tf.distribute.Server``s. The example stream
  (Python, h5py) runs on the coordinator, which keeps one set of batch slots per worker and
  schedules their steps with a ``ClusterCoordinator``: each worker applies its own updates to the
  variables on the parameter servers without waiting for the others. With ``--async_input
  worker`` (:mod:`ffn.training.worker_input`) the workers hold the volumes and run the FOV moves
  of their examples in-graph; the coordinator only hands out stream positions and step budgets.

Batch size: ``--batch_size`` is per replica; the global batch is ``batch_size x replicas``
(replicas: all devices of all tasks for sync, the workers for async). ``--scale_lr_with_replicas``
multiplies ``--learning_rate`` by the number of replicas (the linear scaling rule).

Cluster: tasks find each other through ``tf.distribute.cluster_resolver.SlurmClusterResolver``
(:func:`slurm_resolver`), which reads the job *step* that submitit's ``srun`` starts
(``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST``,
``SLURM_STEP_TASKS_PER_NODE``); several tasks therefore need ``--cluster slurm`` (the local
cluster runs one task). Where the resolver does not fit, we say so or adapt explicitly:

* Rank order. The resolver gives rank ``SLURM_PROCID`` the ``rank``-th address of its list, which
  it builds from the nodes *sorted by name*, ``tasks on the node`` consecutive ports each; Slurm
  places ranks in the order of the step's node list (block distribution). The two agree on one
  node and on nodes whose names sort in Slurm's order (``node[01-16]``), not on e.g.
  ``node[9-10]`` (Python sorts ``node10`` first) or with a cyclic/plane/arbitrary distribution.
  Renumbering the tasks would make the chief another task than ``SLURM_PROCID`` 0, the one
  submitit checkpoints and requeues from, so every task checks instead that the resolver's address
  for it is its own node and ``port_base + SLURM_LOCALID``, and fails with :class:`FFNError`
  saying why when it is not.
* GPUs. The resolver hands GPUs out as ``0..gpus_per_node-1`` (``auto_set_gpu``), which is wrong
  where Slurm lists the node's physical ids (``CUDA_VISIBLE_DEVICES=2,3`` without device
  cgroups), and cannot lay out CPU-only tasks (``gpus_per_task=0`` fails, and without
  ``CUDA_VISIBLE_DEVICES`` it runs ``nvidia-smi``). One mechanism sets the devices: before the
  resolver is built, :func:`_share_gpus` gives each task of a node its share of the GPUs Slurm made
  visible; the resolver runs with ``auto_set_gpu=False`` and one layout slot per task
  (``gpus_per_task=1``, ``gpus_per_node`` = tasks of the step), and reports the GPUs TF sees in
  this task as its ``num_accelerators()`` (what ``MultiWorkerMirroredStrategy`` replicates over).

Ports: task ``i`` on a node listens on ``--port_base + i`` (the resolver's ``port_base``); by
default the port base is derived from the job id (``20000 + job_id % 1250 * 16``), so that jobs
sharing a node differ.

Preemption: submitit asks Slurm for ``USR2`` 90 s before the time limit (and ``scancel --signal
USR2`` simulates a preemption); task 0 then calls :meth:`DistributedTraining.checkpoint`, which
saves a checkpoint and resubmits the same callable, and Slurm requeues the job: the new run
resumes from the latest checkpoint in ``--train_dir`` (with ``--async_input worker`` its
``examples_taken`` is the next stream position the coordinator would have handed out).
``SIGTERM`` saves and stops (status 3); ``SIGUSR1`` to all tasks (``scancel --signal USR1
<job>``) saves and continues.
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
from typing import TYPE_CHECKING, Any

import submitit

from ffn import quiet_tf
from ffn.errors import FFNError
from ffn.training import cli as train_cli

if TYPE_CHECKING:
  from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import SlurmClusterResolver

_log = logging.getLogger("ffn.training")

STRATEGIES = ("sync", "async")
ASYNC_INPUTS = ("coordinator", "worker")
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
  group.add_argument("--async_input", choices=ASYNC_INPUTS, default="coordinator",
                     help="--strategy async: where examples are built: coordinator (Python, "
                          "shipped per step) or worker (volumes on each worker, FOV moves "
                          "in-graph, no EM augmentations; default: %(default)s)")
  group.add_argument("--batches_per_call", type=int, default=1,
                     help="--async_input worker: examples per scheduled call, in batches (more: "
                          "less coordinator work per step; above 1 with several workers the loss "
                          "plateaued higher in our runs, see benchmarks/README.md; default: "
                          "%(default)s)")
  group.add_argument("--scale_lr_with_replicas", action="store_true",
                     help="multiply --learning_rate by the number of replicas")
  group.add_argument("--port_base", type=int, default=None,
                     help="first gRPC port of the tasks on a node (default: from the job id)")
  group.add_argument("--strict", dest="slurm_strict", action="store_true", default=argparse.SUPPRESS,
                     help="same as --slurm_strict: refuse a request that no node of the cluster "
                          "can ever run (default: warn, and submit a job that stays pending)")
  group.add_argument("--wait", action="store_true",
                     help="wait for the job to end and exit with its status (implies --strict: a "
                          "job that can never start would be waited for for ever)")


def run(args: argparse.Namespace) -> int:
  from slurm.executor import JobFailedError, SlurmOptions, make_executor
  options = SlurmOptions.from_args(args)
  tasks = options.nodes * options.tasks_per_node
  if args.strategy == "async" and (args.num_ps < 1 or tasks < args.num_ps + 2):
    raise FFNError(f"--strategy async needs --num_ps >= 1 and at least num_ps + 2 tasks (coordinator, "
                   f"parameter servers, >= 1 worker); got --num_ps {args.num_ps} and {tasks} tasks")
  if args.port_base is not None and not 1024 <= args.port_base <= 65535 - options.tasks_per_node:
    raise FFNError(f"--port_base must be in 1024..{65535 - options.tasks_per_node}, got {args.port_base}")
  if args.async_input == "worker":
    from ffn.training.worker_input import check_config
    if args.strategy != "async":
      raise FFNError("--async_input worker needs --strategy async")
    if args.batches_per_call < 1:
      raise FFNError(f"--batches_per_call must be >= 1, got {args.batches_per_call}")
    check_config(args)  # the flags have the config's names
  options.strict = options.strict or args.wait
  # First the request against `sinfo` (before the config, which imports TensorFlow).
  executor = make_executor(options, os.path.abspath(args.train_dir))
  if executor.cluster != "slurm" and tasks > 1:
    raise FFNError(f"{tasks} tasks need --cluster slurm: they find each other through "
                   f"tf.distribute's SlurmClusterResolver, which reads the Slurm job step; the "
                   f"{executor.cluster} cluster runs one task (--tasks_per_node 1)")
  cfg = train_cli.config_from_args(args)
  cfg.train_dir = os.path.abspath(cfg.train_dir)
  os.makedirs(cfg.train_dir, exist_ok=True)
  if executor.cluster == "slurm":
    # Slurm's own SIGTERM at the time limit comes after submitit's USR2; make the gap explicit.
    executor.update_parameters(slurm_signal_delay_s=90)
  training = DistributedTraining(dataclasses.asdict(cfg), args.strategy, args.num_ps,
                                 args.scale_lr_with_replicas, args.port_base, args.async_input,
                                 args.batches_per_call)
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


def slurm_resolver(jobs: dict[str, int], port_base: int, task_gpus: int) -> SlurmClusterResolver:
  """TF's ``SlurmClusterResolver`` for this task of the current Slurm job step.

  ``jobs``: TF job name -> number of tasks (the resolver numbers them in sorted name order).
  ``port_base``: port of the first task on each node. ``task_gpus``: the GPUs this task uses
  (after :func:`_share_gpus`), reported as the resolver's ``num_accelerators()``. GPU placement
  and the rank order are handled as the module docstring describes; the returned resolver has
  resolved its cluster (``task_type``/``task_id`` set) and was checked against Slurm's placement.
  """
  import tensorflow as tf
  from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import expand_hostlist

  class TaskSlurmClusterResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """``SlurmClusterResolver`` that reports the task's own GPUs instead of its layout slots."""

    def num_accelerators(self, task_type: str | None = None, task_id: int | None = None,
                         config_proto: Any = None) -> dict[str, int]:
      del task_type, task_id, config_proto
      return {"GPU": task_gpus}

  try:
    resolver = TaskSlurmClusterResolver(jobs=dict(jobs), port_base=port_base,
                                        gpus_per_node=sum(jobs.values()), gpus_per_task=1,
                                        auto_set_gpu=False, rpc_layer="grpc")
    spec = resolver.cluster_spec()
    nodes = expand_hostlist(os.environ["SLURM_STEP_NODELIST"])
  except (RuntimeError, ValueError) as e:
    raise FFNError(f"SlurmClusterResolver: {e}") from e
  if len(nodes) > 1 and nodes != sorted(nodes):
    raise FFNError(f"SlurmClusterResolver orders the nodes of this job step by name "
                   f"({','.join(sorted(nodes))}), Slurm numbers their tasks in the order "
                   f"{','.join(nodes)}: task addresses would not match; run on one node or on nodes "
                   "whose names sort in Slurm's order (e.g. zero-padded)")
  distribution = os.environ.get("SLURM_DISTRIBUTION", "block")
  if len(nodes) > 1 and not distribution.startswith("block"):
    raise FFNError(f"SlurmClusterResolver expects Slurm's block task distribution across nodes, "
                   f"this job step uses SLURM_DISTRIBUTION={distribution}")
  own = (f"{os.environ.get('SLURMD_NODENAME', '?')}:"
         f"{port_base + int(os.environ.get('SLURM_LOCALID', '0'))}")
  address = spec.task_address(resolver.task_type, resolver.task_id)
  if address != own:
    raise FFNError(f"SlurmClusterResolver places task {os.environ.get('SLURM_PROCID')} "
                   f"({resolver.task_type} {resolver.task_id}) at {address}, but Slurm started it "
                   f"at {own} (SLURMD_NODENAME:port_base+SLURM_LOCALID)")
  return resolver


class DistributedTraining(submitit.helpers.Checkpointable):
  """What every task of a ``slurm_train`` job runs; requeued (same arguments) on preemption."""

  def __init__(self, config: dict[str, Any], strategy: str = "sync", num_ps: int = 1,
               scale_lr_with_replicas: bool = False, port_base: int | None = None,
               async_input: str = "coordinator", batches_per_call: int = 1):
    if strategy not in STRATEGIES:
      raise FFNError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if async_input not in ASYNC_INPUTS:
      raise FFNError(f"--async_input {async_input!r}: expected one of {', '.join(ASYNC_INPUTS)}")
    self.config, self.strategy, self.num_ps = dict(config), strategy, num_ps
    self.scale_lr_with_replicas, self.port_base = scale_lr_with_replicas, port_base
    self.async_input, self.batches_per_call = async_input, batches_per_call
    self._trainer = None
    self._loop = None  # the WorkerInputTrainer of a worker-input coordinator

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_trainer"] = state["_loop"] = None  # the live trainer stays in this process
    return state

  def __call__(self) -> int:
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Job logs without TensorFlow's import-time noise and grappler's remapper E-line, as on the
    # command line, but with tf.distribute's INFO lines (strategy, cluster spec) kept.
    quiet_tf.install()
    logging.getLogger("tensorflow").setLevel(logging.INFO)
    env = submitit.JobEnvironment()
    _log.info("job %s task %d/%d on %s", env.job_id, env.global_rank, env.num_tasks, env.hostname)
    _share_gpus(env)
    if self.strategy == "sync" and env.num_tasks == 1:
      return self._run_sync(env, None)
    import tensorflow as tf
    port_base = self.port_base if self.port_base is not None else port_base_for(env.job_id)
    if self.strategy == "sync":
      jobs = {"worker": env.num_tasks}
    else:
      jobs = {"chief": 1, "ps": self.num_ps, "worker": env.num_tasks - 1 - self.num_ps}
    resolver = slurm_resolver(jobs, port_base, len(tf.config.list_physical_devices("GPU")))
    _log.info("SlurmClusterResolver: this task is %s %d of %s", resolver.task_type, resolver.task_id,
              resolver.cluster_spec().as_dict())
    if self.strategy == "sync":
      return self._run_sync(env, resolver)
    return self._run_async(env, resolver)

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """Called by submitit on task 0 at preemption/time-out: saves, then resubmits ``self``."""
    trainer = self._trainer
    if self._loop is not None:
      self._loop.save()  # with the stream position the coordinator holds
    elif trainer is not None and trainer.is_chief:
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

  def _make_trainer(self, cfg, strategy, worker: int = 0, num_workers: int = 1):
    """The :class:`~ffn.training.trainer.Trainer` of a task (benchmarks override it)."""
    from ffn.training.trainer import Trainer
    return Trainer(cfg, strategy, worker=worker, num_workers=num_workers)

  def _run_sync(self, env: submitit.JobEnvironment, resolver: SlurmClusterResolver | None) -> int:
    """``resolver``: a :func:`slurm_resolver` with one ``worker`` job, or None for one task."""
    import tensorflow as tf
    if resolver is None:
      strategy, worker = tf.distribute.MirroredStrategy(), 0
    else:
      strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
      worker = resolver.task_id
    cfg = self._config(strategy.num_replicas_in_sync)
    trainer = self._trainer = self._make_trainer(cfg, strategy, worker, env.num_tasks)
    try:
      trainer.restore_or_init()
      if trainer.is_chief:
        trainer.write_flags()
      trainer.attach_data(trainer.make_source())
      status = trainer.run()
      _log.info("worker %d/%d done at step %d: %d examples taken by this worker", worker,
                env.num_tasks, int(trainer.step.numpy()), int(trainer.examples_taken.numpy()))
      return status
    finally:
      trainer.close()

  def _run_async(self, env: submitit.JobEnvironment, resolver: SlurmClusterResolver) -> int:
    """``resolver``: a :func:`slurm_resolver` with the jobs ``chief``, ``ps`` and ``worker``."""
    import tensorflow as tf
    role, index = resolver.task_type, resolver.task_id
    done_file = Path(self.config["train_dir"]) / f".async-done-{env.job_id}"
    if role != "chief":
      server = tf.distribute.Server(resolver.cluster_spec(), job_name=role, task_index=index,
                                    protocol=resolver.rpc_layer, start=True)
      _log.info("%s %d serving at %s until the coordinator is done", role, index, server.target)
      while not done_file.exists():  # server.join() would never return; the job must end
        time.sleep(1.0)
      return 0
    try:
      strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
      coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
      num_workers = len(resolver.cluster_spec().job_tasks("worker"))
      trainer = self._trainer = self._make_trainer(self._config(num_workers), strategy)
      trainer.restore_or_init()
      trainer.write_flags()
      trainer.attach_data(trainer.make_source())
      return self._coordinate(trainer, coordinator, num_workers)
    finally:
      done_file.write_text("done\n")

  def _coordinate(self, trainer, coordinator, num_workers: int) -> int:
    """The coordinator's training loop (benchmarks override it); 0, or 3 after SIGTERM."""
    if self.async_input == "worker":
      from ffn.training.worker_input import WorkerInputTrainer
      self._loop = WorkerInputTrainer(trainer, coordinator, num_workers, self.batches_per_call)
      return self._loop.run()
    return AsyncTrainer(trainer, coordinator, num_workers).run()


class AsyncTrainer:
  """The coordinator's loop for ``--strategy async --async_input coordinator`` (module docstring)."""

  def __init__(self, trainer, coordinator, num_workers: int):
    """``trainer``: a restored Trainer under the ParameterServerStrategy of ``coordinator`` (a
    ``ClusterCoordinator``), its example source attached."""
    self.trainer, self.coordinator, self.num_workers = trainer, coordinator, num_workers

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
  """With several tasks per node and the node's GPUs visible to all, gives each task its share.

  The only place where GPUs are assigned (``SlurmClusterResolver`` runs with
  ``auto_set_gpu=False``): task ``SLURM_LOCALID`` keeps its slice of the ids Slurm listed, so
  physical ids (no device cgroups) and cgroup-relative ones both stay right.
  """
  visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  per_node = env.num_tasks // max(env.num_nodes, 1)
  if per_node > 1 and len(visible) >= per_node and len(visible) % per_node == 0:
    share = len(visible) // per_node
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[env.local_rank * share:(env.local_rank + 1) * share])

