"""Running pipeline steps as cluster jobs through submitit: Slurm when there is one, else locally.

Every command that can fan work out offers the same flags (:func:`add_slurm_arguments`)::

  --cluster auto|slurm|local|debug   auto (default): Slurm when a controller answers, else local
  --slurm_partition NAME             --slurm_account NAME   --slurm_qos NAME
  --slurm_constraint EXPR            --slurm_time_min MIN   --slurm_nodes N
  --slurm_tasks_per_node N           --slurm_cpus_per_task N
  --slurm_gpus_per_node N            --slurm_mem_gb GB
  --slurm_array_parallelism N        --slurm_job_name NAME  --slurm_log_dir DIR
  --slurm_param KEY[=VALUE]          (repeatable) any other sbatch option, e.g. gres=gpu:a100:1
  --slurm_setup LINE                 (repeatable) shell line run before the task (module load ...)

Nothing has a site-specific default: without ``--slurm_partition``/``--slurm_account`` the
cluster's defaults apply. The ``local`` cluster runs each task as a subprocess of this machine
(submitit's LocalExecutor), honouring the time limit, GPUs (CUDA_VISIBLE_DEVICES), setup lines and
array parallelism; ``debug`` runs tasks in this process, for a debugger.

Job files live under ``<log root>/<job id>/`` where the log root is ``--slurm_log_dir`` or
``<work folder>/logs``; an array task's job id is ``<array id>_<index>``. Each holds
``<job id>_0_log.out`` and ``<job id>_0_log.err`` (task 0; multi-task jobs add ``_1``, ...), the
sbatch script (``<array id>_submission.sh``, Slurm only) and submitit's pickles.

Typical use::

  executor = make_executor(SlurmOptions.from_args(args), work_dir)
  jobs = submit_array(executor, process_subvolume, [(box,) for box in boxes])
  results = wait_all(jobs)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from ffn.errors import FFNError
from ffn.progress import Progress

_log = logging.getLogger(__name__)

CLUSTERS = ("auto", "slurm", "local", "debug")


@dataclasses.dataclass
class SlurmOptions:
  """Resources and placement of the jobs of one command.

  ``None`` means "not requested": the cluster's default applies (no ``#SBATCH`` line is written).
  ``array_parallelism`` is the most tasks of one array running at once (Slurm's ``--array=...%N``);
  on the local cluster it defaults to the number of CPUs divided by ``cpus_per_task``.
  ``extra`` holds further sbatch options (name without dashes -> value, ``True`` for a bare flag).
  """
  cluster: str = "auto"
  partition: str | None = None
  time_min: int = 60
  nodes: int = 1
  tasks_per_node: int = 1
  gpus_per_node: int = 0
  cpus_per_task: int = 1
  mem_gb: float | None = None
  account: str | None = None
  qos: str | None = None
  constraint: str | None = None
  array_parallelism: int | None = None
  job_name: str = "ffn"
  log_dir: str | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  setup: list[str] = dataclasses.field(default_factory=list)

  def __post_init__(self) -> None:
    if self.cluster not in CLUSTERS:
      raise FFNError(f"--cluster {self.cluster!r}: expected one of {', '.join(CLUSTERS)}")
    for name in ("time_min", "nodes", "tasks_per_node", "cpus_per_task"):
      if getattr(self, name) < 1:
        raise FFNError(f"--slurm_{name} must be at least 1, got {getattr(self, name)}")
    if self.gpus_per_node < 0:
      raise FFNError(f"--slurm_gpus_per_node must be >= 0, got {self.gpus_per_node}")
    if self.mem_gb is not None and self.mem_gb <= 0:
      raise FFNError(f"--slurm_mem_gb must be positive, got {self.mem_gb}")
    if self.array_parallelism is not None and self.array_parallelism < 1:
      raise FFNError(f"--slurm_array_parallelism must be at least 1, got {self.array_parallelism}")

  @classmethod
  def from_args(cls, args: argparse.Namespace) -> "SlurmOptions":
    """Builds the options from flags added by :func:`add_slurm_arguments`."""
    return cls(
        cluster=args.cluster, partition=args.slurm_partition, time_min=args.slurm_time_min,
        nodes=args.slurm_nodes, tasks_per_node=args.slurm_tasks_per_node,
        gpus_per_node=args.slurm_gpus_per_node, cpus_per_task=args.slurm_cpus_per_task,
        mem_gb=args.slurm_mem_gb, account=args.slurm_account, qos=args.slurm_qos,
        constraint=args.slurm_constraint, array_parallelism=args.slurm_array_parallelism,
        job_name=args.slurm_job_name, log_dir=args.slurm_log_dir,
        extra=parse_sbatch_params(args.slurm_param), setup=list(args.slurm_setup))


def parse_sbatch_params(items: Sequence[str]) -> dict[str, Any]:
  """Parses ``KEY=VALUE`` / bare ``KEY`` items (``--slurm_param``) into sbatch options.

  Leading dashes are dropped (``--gres=gpu:1`` and ``gres=gpu:1`` are the same); a bare key is a
  flag without value (``exclusive``).
  """
  params: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip().lstrip("-")
    if not key or (sep and not value):
      raise FFNError(f"--slurm_param {item!r}: expected KEY=VALUE or KEY (e.g. gres=gpu:1)")
    params[key] = value if sep else True
  return params


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the cluster flags (see the module docstring) as one argument group."""
  group = parser.add_argument_group(
      "cluster", "where and with which resources jobs run (Slurm through submitit, or locally)")
  group.add_argument("--cluster", choices=CLUSTERS, default="auto",
                     help="auto: Slurm if a controller answers, else local subprocesses; "
                          "debug: run in this process (default: %(default)s)")
  group.add_argument("--slurm_partition", default=None, help="partition (default: the cluster's)")
  group.add_argument("--slurm_account", default=None, help="account to charge")
  group.add_argument("--slurm_qos", default=None, help="quality of service")
  group.add_argument("--slurm_constraint", default=None, help="node feature constraint")
  group.add_argument("--slurm_time_min", type=int, default=60,
                     help="wall time limit per job in minutes (default: %(default)s)")
  group.add_argument("--slurm_nodes", type=int, default=1, help="nodes per job (default: 1)")
  group.add_argument("--slurm_tasks_per_node", type=int, default=1,
                     help="tasks per node (default: 1)")
  group.add_argument("--slurm_cpus_per_task", type=int, default=1,
                     help="CPUs per task (default: 1)")
  group.add_argument("--slurm_gpus_per_node", type=int, default=0,
                     help="GPUs per node (default: 0, none requested)")
  group.add_argument("--slurm_mem_gb", type=float, default=None,
                     help="memory per node in GB (default: the cluster's)")
  group.add_argument("--slurm_array_parallelism", type=int, default=None,
                     help="most array tasks running at once (default: Slurm: no limit beyond "
                          "submitit's 256; local: CPUs / cpus_per_task)")
  group.add_argument("--slurm_job_name", default="ffn", help="job name (default: %(default)s)")
  group.add_argument("--slurm_log_dir", default=None,
                     help="root of the per-job log folders (default: <work folder>/logs)")
  group.add_argument("--slurm_param", action="append", default=[], metavar="KEY[=VALUE]",
                     help="any other sbatch option, repeatable (e.g. gres=gpu:1, exclusive)")
  group.add_argument("--slurm_setup", action="append", default=[], metavar="LINE",
                     help="shell line run before each job, repeatable (e.g. 'module load cuda')")


def slurm_available(timeout_s: float = 15.0) -> bool:
  """True when sbatch/srun are on PATH and a Slurm controller answers ``sinfo``."""
  if shutil.which("sbatch") is None or shutil.which("srun") is None or shutil.which("sinfo") is None:
    return False
  try:
    result = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True,
                            timeout=timeout_s, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return result.returncode == 0


def resolve_cluster(cluster: str) -> str:
  """Maps ``auto`` to ``slurm`` or ``local``; checks that ``slurm`` is reachable."""
  if cluster == "auto":
    return "slurm" if slurm_available() else "local"
  if cluster == "slurm" and not slurm_available():
    raise FFNError("--cluster slurm: no Slurm controller answers (sbatch/srun/sinfo missing from "
                   "PATH, or `sinfo` fails); use --cluster local to run on this machine")
  return cluster


class JobExecutor(submitit.AutoExecutor):
  """A submitit executor that also knows its :class:`SlurmOptions` and log root."""

  def __init__(self, options: SlurmOptions, log_root: Path, cluster: str) -> None:
    super().__init__(folder=log_root / "%j", cluster=cluster)
    self.options = options
    self.log_root = log_root

  @property
  def parallelism(self) -> int | None:
    """Most tasks of one array running at once (None: no limit of ours)."""
    if self.options.array_parallelism is not None:
      return self.options.array_parallelism
    if self.cluster == "local":
      return max(1, (os.cpu_count() or 1) // self.options.cpus_per_task)
    return None


def make_executor(options: SlurmOptions, folder: str | Path) -> JobExecutor:
  """A submitit executor for ``options.cluster`` (``auto`` resolved), logging under ``folder``.

  Logs go to ``<options.log_dir or folder/logs>/<job id>/`` (see the module docstring).
  """
  cluster = resolve_cluster(options.cluster)
  if cluster != "slurm" and options.nodes > 1:
    raise FFNError(f"--slurm_nodes {options.nodes} needs Slurm: the {cluster} cluster is this "
                   "one machine")
  log_root = Path(options.log_dir) if options.log_dir else Path(folder) / "logs"
  log_root = log_root.expanduser().absolute()
  executor = JobExecutor(options, log_root, cluster)
  params: dict[str, Any] = dict(
      name=options.job_name, timeout_min=options.time_min, nodes=options.nodes,
      tasks_per_node=options.tasks_per_node, cpus_per_task=options.cpus_per_task)
  if options.gpus_per_node:
    params["gpus_per_node"] = options.gpus_per_node
  if options.mem_gb is not None:
    params["mem_gb"] = options.mem_gb
  for key in ("partition", "account", "qos", "constraint"):
    value = getattr(options, key)
    if value is not None:
      params[f"slurm_{key}"] = value
  if options.array_parallelism is not None:
    params["slurm_array_parallelism"] = options.array_parallelism
  if options.extra:
    params["slurm_additional_parameters"] = dict(options.extra)
  if options.setup:
    params["slurm_setup"] = list(options.setup)
    params["local_setup"] = list(options.setup)
  executor.update_parameters(**params)
  _log.info("cluster: %s; job logs under %s/<job id>/", cluster, log_root)
  return executor


def submit_array(executor: JobExecutor, fn: Callable[..., Any],
                 args_list: Sequence[Sequence[Any]]) -> list[submitit.Job]:
  """Submits ``fn(*args)`` for each ``args`` in ``args_list``; returns the jobs in that order.

  On Slurm the calls form one job array (``--array=0-{n-1}%{parallelism}``). On the local cluster
  each call is a subprocess, and this function blocks while ``executor.parallelism`` of them are
  running, so it returns once the last call has started. On ``debug`` nothing runs until the
  jobs are waited for. Logs the job ids and log paths.
  """
  if not args_list:
    return []
  if executor.cluster == "slurm":
    with executor.batch():
      jobs = [executor.submit(fn, *args) for args in args_list]
    parallelism = executor.parallelism
    _log.info("submitted Slurm job array %s: %d tasks%s; logs: %s (stderr: %s)",
              jobs[0].job_id.split("_")[0], len(jobs),
              f", at most {parallelism} at once" if parallelism else "",
              _array_pattern(jobs[0].paths.stdout, jobs[0].job_id),
              _array_pattern(jobs[0].paths.stderr, jobs[0].job_id))
    return jobs
  jobs = []
  for args in args_list:
    if executor.cluster == "local":
      while sum(not job.done() for job in jobs) >= executor.parallelism:
        time.sleep(0.2)
    job = executor.submit(fn, *args)
    _log.info("%s job %s; logs: %s (stderr: %s)",
              "started local" if executor.cluster == "local" else "queued debug", job.job_id,
              job.paths.stdout, job.paths.stderr)
    jobs.append(job)
  return jobs


def _array_pattern(path: Path, job_id: str) -> str:
  """The log path of array task ``<id>_<i>`` written as ``<id>_*`` (the path of every task).

  A single submission is a plain job (id without ``_``): its path is returned as is.
  """
  if "_" not in job_id:
    return str(path)
  return str(path).replace(job_id, f"{job_id.split('_')[0]}_*")


class JobFailedError(FFNError):
  """A cluster job failed. It derives from FFNError so that the CLI prints the job id and the
  log path as one line: the job's own traceback is in that log, not in this process."""

  def __init__(self, job: submitit.Job, reason: str) -> None:
    self.job_id = str(job.job_id)
    self.stderr_path = Path(job.paths.stderr)
    super().__init__(f"job {self.job_id} failed ({reason}); stderr log: {self.stderr_path} "
                     "(the other jobs were not cancelled)")


def _failure_reason(job: submitit.Job, error: BaseException) -> str:
  """The job's state (when Slurm's says more than "it ended") and its last stderr line.

  The last line of the stderr log is the exception a Python task raised, or Slurm's note that
  it was cancelled for its time/memory limit; srun's own "task exited" lines are skipped.
  """
  state = str(job.state)
  parts = [] if state.upper() in ("UNKNOWN", "RUNNING", "FINISHED", "COMPLETED") else [state]
  lines: list[str] = []
  stderr = Path(job.paths.stderr)
  if stderr.exists():
    with stderr.open("rb") as f:
      f.seek(max(0, stderr.stat().st_size - 65536))
      lines = f.read().decode(errors="replace").splitlines()
  lines = [line.strip() for line in lines if line.strip() and not line.startswith("srun:")]
  parts.append(lines[-1] if lines else str(error).strip().splitlines()[0])
  return ": ".join(parts)


def wait_all(jobs: Sequence[submitit.Job], desc: str = "jobs", poll_s: float = 1.0) -> list[Any]:
  """Waits for ``jobs`` with a progress line; returns their results in order.

  Raises :class:`JobFailedError` as soon as one job is found to have failed (raised an exception,
  was cancelled, timed out, ran out of memory...), naming its job id and stderr log.
  """
  pending = list(range(len(jobs)))
  with Progress(len(jobs), desc, unit="job") as progress:
    while pending:
      still = []
      for i in pending:
        job = jobs[i]
        if not job.done():
          still.append(i)
          continue
        error = job.exception()
        if error is not None:
          raise JobFailedError(job, _failure_reason(job, error))
        progress.update()
      pending = still
      if pending:
        time.sleep(poll_s)
  return [job.result() for job in jobs]
