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
  --slurm_strict                     refuse a request no node can ever run (default: warn)

Before a Slurm submission the request is checked against ``sinfo`` (:func:`check_fits`): a job
that needs more CPUs, memory or GPUs than any node of its partition has, a missing partition or
node feature, a time above the partition's limit or more nodes than qualify would stay pending
for ever; it is logged as a warning, or refused with ``--slurm_strict``.

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
import re
import shlex
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
  ``strict``: refuse (FFNError) a Slurm request that no node can ever run, instead of warning.
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
  strict: bool = False

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
        extra=parse_sbatch_params(args.slurm_param), setup=list(args.slurm_setup),
        strict=args.slurm_strict)


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
  group.add_argument("--slurm_strict", action="store_true",
                     help="refuse a request that no node of the Slurm cluster can ever run (CPUs, "
                          "memory, GPUs per node, partition, feature, time limit, node count per "
                          "`sinfo`) instead of warning and submitting a job that stays pending")


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


# `sinfo --Node` fields, one line per node and partition: node, partition (default marked "*"),
# CPUs, memory (MB), generic resources, available features, partition time limit.
SINFO_NODE_FORMAT = "%N|%P|%c|%m|%G|%f|%l"


@dataclasses.dataclass(frozen=True)
class SlurmNode:
  """One node of one partition as ``sinfo --Node`` lists it (a node in two partitions is two)."""
  name: str
  partition: str
  cpus: int
  memory_mb: int
  gpus: int
  features: frozenset[str]
  time_limit_min: int | None  # the partition's; None: unlimited


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
  """What a Slurm cluster offers: its nodes per partition and its default partition (or None)."""
  nodes: tuple[SlurmNode, ...]
  default_partition: str | None

  @property
  def partitions(self) -> list[str]:
    """Partition names in ``sinfo``'s order."""
    return list(dict.fromkeys(node.partition for node in self.nodes))

  def describe(self, partition: str) -> str:
    """One phrase: the nodes of ``partition`` and what each offers, e.g. ``1 node (vm: 4 CPUs,
    20489 MB, 0 GPUs)``; nodes offering the same are grouped."""
    nodes = [n for n in self.nodes if n.partition == partition]
    groups: dict[tuple[int, int, int], list[str]] = {}
    for n in nodes:
      groups.setdefault((n.cpus, n.memory_mb, n.gpus), []).append(n.name)
    parts = [f"{','.join(names)}: {cpus} CPUs, {mem} MB, {gpus} GPUs"
             for (cpus, mem, gpus), names in groups.items()]
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} ({'; '.join(parts)})"


def parse_slurm_time(text: str) -> int | None:
  """Minutes of a Slurm time limit (``infinite``, ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
  ``D-HH:MM``, ``D-HH:MM:SS``); None for no limit. Seconds round up to a whole minute."""
  text = text.strip()
  if text.lower() in ("infinite", "unlimited", "n/a", "none", ""):
    return None
  days, _, rest = text.rpartition("-")
  try:
    fields = [int(f) for f in rest.split(":")]
    day_count = int(days) if days else 0
  except ValueError:
    raise FFNError(f"sinfo: cannot read the time limit {text!r}") from None
  if days:  # D-HH[:MM[:SS]]
    fields += [0] * (3 - len(fields))
    hours, minutes, seconds = fields[:3]
  elif len(fields) == 3:
    hours, minutes, seconds = fields
  elif len(fields) == 2:
    hours, (minutes, seconds) = 0, fields
  else:
    hours, minutes, seconds = 0, fields[0], 0
  return (day_count * 24 + hours) * 60 + minutes + (1 if seconds else 0)


def _gres_gpus(gres: str) -> int:
  """GPUs in a Slurm gres list: ``gpu:4``, ``gpu:a100:2(S:0-1),gpu:v100:1`` -> 4, 3; else 0."""
  total = 0
  for item in gres.split(","):
    fields = item.split("(")[0].split(":")
    if fields[0] == "gpu":
      total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
  return total


def parse_sinfo_nodes(text: str) -> SlurmCluster:
  """Parses ``sinfo --Node --noheader --format=SINFO_NODE_FORMAT`` output.

  A ``*`` after a partition name marks the default partition. A memory or CPU count with a
  trailing ``+`` (a node group differing in it) counts as its stated minimum.
  """
  nodes, default = [], None
  for line in text.splitlines():
    if not line.strip():
      continue
    fields = line.strip().split("|")
    if len(fields) != 7:
      raise FFNError(f"sinfo: expected 7 fields ({SINFO_NODE_FORMAT}), got {line.strip()!r}")
    name, partition, cpus, memory, gres, features, limit = fields
    if partition.endswith("*"):
      partition = partition[:-1]
      default = partition
    try:
      node = SlurmNode(name=name, partition=partition, cpus=int(cpus.rstrip("+")),
                       memory_mb=int(memory.rstrip("+")), gpus=_gres_gpus(gres),
                       features=frozenset(f for f in features.split(",") if f and f != "(null)"),
                       time_limit_min=parse_slurm_time(limit))
    except ValueError:
      raise FFNError(f"sinfo: cannot read the node line {line.strip()!r}") from None
    nodes.append(node)
  return SlurmCluster(tuple(nodes), default)


def query_cluster(timeout_s: float = 15.0) -> SlurmCluster:
  """What the Slurm cluster answering ``sinfo`` offers (raises FFNError when it does not answer)."""
  try:
    result = subprocess.run(["sinfo", "--Node", "--noheader", f"--format={SINFO_NODE_FORMAT}"],
                            capture_output=True, text=True, timeout=timeout_s, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise FFNError(f"sinfo did not answer: {e}") from e
  if result.returncode != 0:
    lines = result.stderr.strip().splitlines()
    raise FFNError(f"sinfo failed: {lines[-1] if lines else f'exit status {result.returncode}'}")
  return parse_sinfo_nodes(result.stdout)


def _requested_gpus(options: SlurmOptions) -> int:
  """GPUs per node: ``gpus_per_node`` or a ``gres=gpu[:type]:N`` in the extra sbatch options."""
  gres = options.extra.get("gres")
  return max(options.gpus_per_node, _gres_gpus(gres) if isinstance(gres, str) else 0)


def fit_problems(options: SlurmOptions, cluster: SlurmCluster) -> list[str]:
  """Why no partition of ``cluster`` can ever run a job of ``options`` (empty: it fits).

  Checked per node: CPUs (``tasks_per_node x cpus_per_task``; ``cpus_per_task`` alone with the
  sbatch option ``overcommit``), memory (``mem_gb``), GPUs (``gpus_per_node`` or ``gres=gpu:N``)
  and a ``constraint`` that is one feature name (expressions are not checked); per partition:
  that it exists, its time limit, and that ``nodes`` of its nodes pass. A job of several
  partitions (``a,b``) fits when one of them fits. Node states are not considered: a down node
  may come back, a job too large for every node never starts.
  """
  names = [p for p in (options.partition or "").split(",") if p]
  if not names:
    if cluster.default_partition is None:
      return ["no --slurm_partition given and the cluster has no default partition"]
    names = [cluster.default_partition]
  known = cluster.partitions
  problems = [f"partition {p!r} does not exist (sinfo lists {', '.join(known) or 'none'})"
              for p in names if p not in known]
  cpus = options.cpus_per_task * (1 if "overcommit" in options.extra else options.tasks_per_node)
  cpus_why = (f"{cpus} CPUs per node (--slurm_tasks_per_node {options.tasks_per_node} x "
              f"--slurm_cpus_per_task {options.cpus_per_task})")
  mem_mb = None if options.mem_gb is None else int(options.mem_gb * 1024)
  gpus = _requested_gpus(options)
  feature = options.constraint if options.constraint and re.fullmatch(r"[\w.-]+", options.constraint) \
      else None
  per_partition = []
  for partition in (p for p in names if p in known):
    nodes = [n for n in cluster.nodes if n.partition == partition]
    where = f"partition {partition} ({cluster.describe(partition)})"
    found = []
    if all(n.cpus < cpus for n in nodes):
      found.append(f"{where}: needs {cpus_why}, its nodes have at most {max(n.cpus for n in nodes)}")
    if mem_mb is not None and all(n.memory_mb < mem_mb for n in nodes):
      found.append(f"{where}: needs {mem_mb} MB per node (--slurm_mem_gb {options.mem_gb:g}), its "
                   f"nodes have at most {max(n.memory_mb for n in nodes)} MB")
    if gpus and all(n.gpus < gpus for n in nodes):
      found.append(f"{where}: needs {gpus} GPUs per node, its nodes have at most "
                   f"{max(n.gpus for n in nodes)}")
    if feature is not None and all(feature not in n.features for n in nodes):
      offered = sorted(set().union(*(n.features for n in nodes)))
      found.append(f"{where}: needs node feature {feature!r} (--slurm_constraint), its nodes have "
                   f"{', '.join(offered) or 'none'}")
    limit = nodes[0].time_limit_min
    if limit is not None and options.time_min > limit:
      found.append(f"{where}: needs {options.time_min} min (--slurm_time_min), its time limit is "
                   f"{limit} min")
    if not found:
      fitting = [n for n in nodes if n.cpus >= cpus and (mem_mb is None or n.memory_mb >= mem_mb)
                 and n.gpus >= gpus and (feature is None or feature in n.features)]
      if len(fitting) < options.nodes:
        needs = [f"{cpus} CPUs"] + ([f"{mem_mb} MB"] if mem_mb is not None else []) + \
            ([f"{gpus} GPUs"] if gpus else []) + ([f"feature {feature!r}"] if feature else [])
        found.append(f"{where}: needs {options.nodes} nodes (--slurm_nodes) with {', '.join(needs)} "
                     f"each, {len(fitting)} qualify")
    if not found:
      return problems
    per_partition.extend(found)
  return problems + per_partition


def check_fits(options: SlurmOptions, cluster: SlurmCluster | None = None) -> list[str]:
  """:func:`fit_problems` against the running cluster (``sinfo``), or ``cluster`` when given."""
  return fit_problems(options, query_cluster() if cluster is None else cluster)


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
  if cluster == "slurm":
    _check_request(options)
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
  if cluster == "local":
    # submitit's local job controller opens <log root>/<job id>/<job id>_0_log.out as soon as it
    # starts, but the submitting process creates that folder only after Popen returned (when it
    # moves the job's pickle there): a controller quicker than its submitter failed with
    # FileNotFoundError. With setup lines the controller runs in a shell whose pid is the job id
    # (submitit's rule), so the shell makes the folder before the controller starts.
    params["local_setup"] = [f'mkdir -p {shlex.quote(str(log_root))}/"$$"', *options.setup]
  elif options.setup:
    params["local_setup"] = list(options.setup)
  executor.update_parameters(**params)
  _log.info("cluster: %s; job logs under %s/<job id>/", cluster, log_root)
  return executor


def _check_request(options: SlurmOptions) -> None:
  """Warns about (``options.strict``: refuses) a request no node can run (:func:`check_fits`)."""
  try:
    problems = check_fits(options)
  except FFNError as e:
    if options.strict:
      raise FFNError(f"--slurm_strict: cannot check the request against the cluster: {e}") from e
    _log.warning("could not check the request against the cluster: %s", e)
    return
  if problems and options.strict:
    raise FFNError(f"no node of the Slurm cluster can ever run this job: {'; '.join(problems)}")
  for problem in problems:
    _log.warning("this job would stay pending for ever: %s (--slurm_strict refuses such requests)",
                 problem)


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
