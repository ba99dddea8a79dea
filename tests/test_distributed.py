"""Distributed training through the real local Slurm: 2-task sync, parameter-server async, requeue.

Each Slurm test first checks that the cluster can run its job (``slurm_cluster.require_fit``: it
fails at once under CI, else skips, with what the job needs and what ``sinfo`` offers) and names
its job with the ``slurm_job_name`` fixture, which cancels it at teardown whatever happened.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from ffn.errors import FFNError
from ffn.training.distributed import port_base_for, slurm_resolver
from slurm.executor import SlurmOptions
from slurm_cluster import (RequeueHold, cancel_jobs, queued, require_fit, running_cluster,
                           slurm_job_name)


SAMPLE_CROP = REPO_ROOT / "sample_data" / "fib25" / "training_sample2_crop.h5"


@pytest.fixture(scope="module")
def crop_data(tmp_path_factory):
  """A 48^3 corner (z,y,x) of the shipped 150^3 training_sample2 crop (raw uint8 + stack int64 body
  labels) and 100 google-format coordinates: runs in a fresh clone, without ../shared."""
  from ffn.data.coordinates import write_coordinates
  if not SAMPLE_CROP.exists():
    pytest.fail(f"{SAMPLE_CROP} is missing from the checkout", pytrace=False)
  root = tmp_path_factory.mktemp("distcrop")
  with h5py.File(SAMPLE_CROP, "r") as f:
    raw, stack = f["raw"][:48, :48, :48], f["stack"][:48, :48, :48]
  assert raw.dtype == np.uint8 and stack.dtype == np.int64 and len(np.unique(stack)) > 1
  with h5py.File(root / "crop.h5", "w") as f:
    f["raw"], f["stack"] = raw, stack
  centers = np.random.default_rng(0).integers(8, 40, size=(100, 3))
  write_coordinates(str(root / "coords.tfr"), np.zeros(len(centers), np.int64), centers, ["s2"])
  return root


def _flags(root: Path, train_dir: Path, max_steps: int, *extra: str) -> list[str]:
  return ["--train_coords", str(root / "coords.tfr"),
          "--data_volumes", f"s2:{root / 'crop.h5'}:raw", "--label_volumes", f"s2:{root / 'crop.h5'}:stack",
          "--model_name", "convstack_3d", "--model_args", '{"depth": 1, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}',
          "--image_mean", "128", "--image_stddev", "33", "--train_dir", str(train_dir),
          "--batch_size", "2", "--max_steps", str(max_steps), "--optimizer", "adam",
          "--log_every", "10", "--checkpoint_interval_s", "1000", "--cluster", "slurm",
          "--cpus_per_task", "1", "--mem_gb", "3", "--time", "10", *extra]


def _options(tasks_per_node: int, **extra: object) -> SlurmOptions:
  """The Slurm request of :func:`_flags` with ``tasks_per_node`` tasks (for ``require_fit``)."""
  return SlurmOptions(cluster="slurm", tasks_per_node=tasks_per_node, cpus_per_task=1, mem_gb=3,
                      time_min=10, extra=dict(extra))


def _slurm_train(args: list[str], timeout: float = 240,
                 job_name: str | None = None) -> subprocess.CompletedProcess:
  """Runs slurm_train.py (with ``--slurm_job_name job_name`` when given); a run past ``timeout``
  fails the test naming the state of its job (the fixture then cancels it)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  argv = [sys.executable, str(REPO_ROOT / "slurm_train.py")] + args
  if job_name:
    argv += ["--slurm_job_name", job_name]
  try:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    jobs = queued(job_name) if job_name else []
    pytest.fail(f"slurm_train did not end within {timeout:g} s; its job in the queue: "
                f"{jobs or 'none'}; stdout: {e.stdout!r}", pytrace=False)


def _job_id(stdout: str) -> str:
  match = re.search(r"submitted slurm job (\d+)", stdout)
  assert match, stdout
  return match.group(1)


def _node() -> str:
  """The Slurm node name of the local test cluster (its only node)."""
  return subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True,
                        check=True).stdout.strip()


def _task_logs(train_dir: Path, job_id: str) -> list[str]:
  folder = train_dir / "logs" / job_id
  return [(folder / f"{job_id}_{i}_log.out").read_text() + (folder / f"{job_id}_{i}_log.err").read_text()
          for i in range(len(list(folder.glob(f"{job_id}_*_log.out"))))]


def test_port_base_for():
  base = port_base_for("123456")
  assert 20000 <= base < 40000 and base % 16 == 0 and base != port_base_for("123457")
  assert port_base_for("77_3") == port_base_for("77")


def _fake_step(monkeypatch, nodelist: str, tasks_per_node: str, nodes: list[str], per_node: int,
               rank: int, distribution: str = "block") -> None:
  """The variables srun sets for task ``rank`` of a block-distributed step (``per_node`` tasks on
  each of ``nodes``). Only for the pure cluster-spec tests below: the jobs above run real Slurm."""
  for key in list(os.environ):
    if key.startswith(("SLURM_", "SLURMD_")):
      monkeypatch.delenv(key)
  monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
  monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(len(nodes) * per_node))
  monkeypatch.setenv("SLURM_DISTRIBUTION", distribution)
  monkeypatch.setenv("SLURM_PROCID", str(rank))
  monkeypatch.setenv("SLURMD_NODENAME", nodes[rank // per_node])
  monkeypatch.setenv("SLURM_LOCALID", str(rank % per_node))


@pytest.mark.parametrize("nodelist,tasks_per_node,nodes,per_node,jobs,port,expected,roles", [
    # sync: 2 nodes x 2 tasks, all workers (MultiWorkerMirroredStrategy)
    ("n[1-2]", "2(x2)", ["n1", "n2"], 2, {"worker": 4}, 20000,
     {"worker": ["n1:20000", "n1:20001", "n2:20000", "n2:20001"]},
     [("worker", 0), ("worker", 1), ("worker", 2), ("worker", 3)]),
    # async, one node: coordinator, 1 parameter server, 2 workers (the test job below)
    ("vm", "4", ["vm"], 4, {"chief": 1, "ps": 1, "worker": 2}, 30016,
     {"chief": ["vm:30016"], "ps": ["vm:30017"], "worker": ["vm:30018", "vm:30019"]},
     [("chief", 0), ("ps", 0), ("worker", 0), ("worker", 1)]),
    # async, 2 zero-padded nodes x 3 tasks, 2 parameter servers
    ("gpu[07-08]", "3(x2)", ["gpu07", "gpu08"], 3, {"chief": 1, "ps": 2, "worker": 3}, 21000,
     {"chief": ["gpu07:21000"], "ps": ["gpu07:21001", "gpu07:21002"],
      "worker": ["gpu08:21000", "gpu08:21001", "gpu08:21002"]},
     [("chief", 0), ("ps", 0), ("ps", 1), ("worker", 0), ("worker", 1), ("worker", 2)]),
])
def test_slurm_resolver_layouts(monkeypatch, nodelist, tasks_per_node, nodes, per_node, jobs, port,
                                expected, roles):
  """SlurmClusterResolver's cluster and each rank's task type/id from a faked job step; GPUs are
  reported as given and CUDA_VISIBLE_DEVICES is left to _share_gpus."""
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
  for rank, role in enumerate(roles):
    _fake_step(monkeypatch, nodelist, tasks_per_node, nodes, per_node, rank)
    resolver = slurm_resolver(jobs, port, task_gpus=rank % 2)
    assert isinstance(resolver, tf.distribute.cluster_resolver.SlurmClusterResolver)
    assert resolver.cluster_spec().as_dict() == expected
    assert (resolver.task_type, resolver.task_id) == role
    assert resolver.num_accelerators() == {"GPU": rank % 2}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


@pytest.mark.parametrize("nodelist,distribution,message", [
    ("n[9-10]", "block", "orders the nodes of this job step by name (n10,n9), Slurm numbers their "
                         "tasks in the order n9,n10"),
    ("n[1-2]", "cyclic", "expects Slurm's block task distribution across nodes, this job step uses "
                         "SLURM_DISTRIBUTION=cyclic"),
])
def test_slurm_resolver_refuses_mismatched_placement(monkeypatch, nodelist, distribution, message):
  nodes = [f"n{i}" for i in ((9, 10) if "9" in nodelist else (1, 2))]
  for rank in range(2):  # every task fails the same way
    _fake_step(monkeypatch, nodelist, "1(x2)", nodes, 1, rank, distribution)
    with pytest.raises(FFNError, match=re.escape(message)):
      slurm_resolver({"worker": 2}, 20000, task_gpus=0)


def test_slurm_resolver_outside_a_step(monkeypatch):
  for key in list(os.environ):
    if key.startswith("SLURM"):
      monkeypatch.delenv(key)
  with pytest.raises(FFNError, match="SLURM_PROCID not found in environment"):
    slurm_resolver({"worker": 2}, 20000, task_gpus=0)


def test_bad_cluster_flags_are_user_errors(crop_data, tmp_path):
  proc = _slurm_train(_flags(crop_data, tmp_path / "run", 5, "--strategy", "async", "--num_ps", "1",
                             "--tasks_per_node", "2"))
  assert proc.returncode == 2, proc.stderr
  assert "needs --num_ps >= 1 and at least num_ps + 2 tasks" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("ffn slurm_train: error: --strategy async")
  proc = _slurm_train(_flags(crop_data, tmp_path / "run", 5, "--tasks_per_node", "2", "--cluster", "local"))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "ffn slurm_train: error: 2 tasks need --cluster slurm: they find each other through tf.distribute's "
      "SlurmClusterResolver, which reads the Slurm job step; the local cluster runs one task "
      "(--tasks_per_node 1)")
  proc = _slurm_train(_flags(crop_data, tmp_path / "run2", 5, "--strategy", "async", "--tasks_per_node",
                             "4", "--async_input", "worker", "--elastic_alpha", "4"))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "ffn slurm_train: error: --async_input worker applies only the axis permutation/reflection "
      "in-graph; --elastic_alpha needs --async_input coordinator")
  assert not (tmp_path / "run2").exists()  # refused before anything is written


@pytest.mark.slurm
def test_sync_two_tasks(crop_data, slurm_job_name, tmp_path):
  """MultiWorkerMirroredStrategy over 2 Slurm tasks; the checkpoint serves inference and `ffn train`."""
  require_fit(_options(2, overcommit=True))
  train_dir = tmp_path / "run"
  proc = _slurm_train(_flags(crop_data, train_dir, 30, "--tasks_per_node", "2", "--wait",
                             "--slurm_param", "overcommit"), job_name=slurm_job_name)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  job_id = _job_id(proc.stdout)
  assert f"tail -f {train_dir}/logs/{job_id}/{job_id}_0_log.err" in proc.stdout
  assert f"tensorboard --logdir {train_dir}" in proc.stdout
  logs = _task_logs(train_dir, job_id)
  assert len(logs) == 2
  taken = []
  base, host = port_base_for(job_id), _node()
  for rank, log in enumerate(logs):
    cluster = f"{{'worker': ['{host}:{base}', '{host}:{base + 1}']}}"
    assert f"SlurmClusterResolver: this task is worker {rank} of {cluster}" in log, log
    assert (f"MultiWorkerMirroredStrategy with cluster_spec = {cluster}, task_type = 'worker', "
            f"task_id = {rank}") in log, log
    assert "2 replicas: batch 2 per replica, global batch 4" in log, log
    done = re.search(rf"worker {rank}/2 done at step 30: (\d+) examples taken", log)
    assert done, log
    taken.append(int(done.group(1)))
    assert f"worker {rank}/2 examples_taken" in log
  # Both workers consumed examples (each at least its 2 slots), and only the chief wrote checkpoints.
  assert min(taken) >= 2, taken
  assert tf.train.latest_checkpoint(str(train_dir)).endswith("model.ckpt-30")
  import ffn.models
  loaded = ffn.models.load(str(train_dir))
  reader = tf.train.load_checkpoint(str(train_dir / "model.ckpt-30"))
  assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 30
  assert loaded.model.fov_size == (9, 9, 9) or list(loaded.model.fov_size) == [9, 9, 9]
  # A single-process `ffn train` resumes from the distributed checkpoint.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  train = subprocess.run([sys.executable, str(REPO_ROOT / "train.py")]
                         + _flags(crop_data, train_dir, 35)[:-10], capture_output=True, text=True,
                         env=env, cwd=REPO_ROOT, timeout=120)
  assert train.returncode == 0, train.stderr
  assert "resumed from" in train.stderr and "at step 30" in train.stderr
  assert tf.train.latest_checkpoint(str(train_dir)).endswith("model.ckpt-35")


@pytest.mark.slurm
def test_async_parameter_server(crop_data, slurm_job_name, tmp_path):
  """Coordinator + 1 parameter server + 2 workers: 4 tasks of one Slurm job (the local test
  cluster offers 4 CPUs on a 2-core machine, see scripts/start-local-slurm.sh); then resumed
  with --async_input worker."""
  require_fit(_options(4))
  train_dir = tmp_path / "run"
  proc = _slurm_train(_flags(crop_data, train_dir, 40, "--tasks_per_node", "4", "--strategy", "async",
                             "--num_ps", "1", "--wait"), job_name=slurm_job_name)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  job_id = _job_id(proc.stdout)
  logs = _task_logs(train_dir, job_id)
  assert len(logs) == 4
  assert "coordinator done: step 40" in logs[0], logs[0]
  base, host = port_base_for(job_id), _node()
  cluster = (f"{{'chief': ['{host}:{base}'], 'ps': ['{host}:{base + 1}'], "
             f"'worker': ['{host}:{base + 2}', '{host}:{base + 3}']}}")
  for rank, role in enumerate(["chief 0", "ps 0", "worker 0", "worker 1"]):
    assert f"SlurmClusterResolver: this task is {role} of {cluster}" in logs[rank], logs[rank]
  assert "ps 0 serving" in logs[1]
  assert "worker 0 serving" in logs[2] and "worker 1 serving" in logs[3]
  assert "2 replicas: batch 2 per replica, global batch 4" in logs[0]
  assert tf.train.latest_checkpoint(str(train_dir)).endswith("model.ckpt-40")
  import ffn.models
  ffn.models.load(str(train_dir))
  # The same run resumed with the input on the workers (ffn/training/worker_input.py): from the
  # coordinator path's checkpoint, at its step and stream position, to exactly --max_steps.
  taken = int(tf.train.load_checkpoint(str(train_dir / "model.ckpt-40")).get_tensor(
      "examples_taken/.ATTRIBUTES/VARIABLE_VALUE"))
  proc = _slurm_train(_flags(crop_data, train_dir, 70, "--tasks_per_node", "4", "--strategy", "async",
                             "--num_ps", "1", "--async_input", "worker", "--wait"),
                      job_name=slurm_job_name)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  log = _task_logs(train_dir, _job_id(proc.stdout))[0]
  assert "at step 40" in log and f"stream from example {taken}, step 40" in log, log
  losses = [float(v) for v in re.findall(r"step \d+/70 loss ([\d.]+) .* worker input\)", log)]
  assert losses and all(np.isfinite(losses)), log
  assert "coordinator done: step 70" in log, log
  reader = tf.train.load_checkpoint(str(train_dir / "model.ckpt-70"))
  assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 70
  # Each call trains 2 new examples for 1..27 steps: 30 steps took 2 to 60 of them.
  assert 2 <= reader.get_tensor("examples_taken/.ATTRIBUTES/VARIABLE_VALUE") - taken <= 60
  assert (reader.get_tensor("examples_taken/.ATTRIBUTES/VARIABLE_VALUE") - taken) % 2 == 0
  ffn.models.load(str(train_dir))


@pytest.mark.slurm
def test_preemption_requeues_and_resumes(crop_data, slurm_job_name, tmp_path):
  """USR2 (submitit's preemption signal) -> checkpoint saved, job requeued, step continues."""
  import submitit
  require_fit(_options(1))
  train_dir = tmp_path / "run"
  proc = _slurm_train(_flags(crop_data, train_dir, 100_000, "--log_every", "5"), job_name=slurm_job_name)
  assert proc.returncode == 0, proc.stderr
  job_id = _job_id(proc.stdout)
  job = submitit.SlurmJob(folder=train_dir / "logs" / job_id, job_id=job_id)
  log = Path(job.paths.stderr)
  deadline = time.monotonic() + 150
  try:
    while not (log.exists() and re.search(r"step (\d+)/", log.read_text())):
      assert time.monotonic() < deadline, "training never started"
      time.sleep(1)
    job._interrupt(timeout=False)  # scancel --signal USR2: what Slurm sends before preempting
    while "Requeued job" not in log.read_text():
      assert time.monotonic() < deadline, log.read_text()
      time.sleep(0.5)
    # Slurm holds a requeued job back ~2 minutes (BeginTime); once it pends for that reason (the
    # requeue itself has happened), let it start now rather than sit out the hold.
    hold = RequeueHold(job_id)
    while "resumed from" not in (log.read_text() if log.exists() else ""):
      assert time.monotonic() < deadline, (log.read_text() if log.exists() else "no log")
      hold.poll()
      time.sleep(0.5)
    while not re.search(r"resumed from .* at step \d+[\s\S]*step \d+/", log.read_text()):
      assert time.monotonic() < deadline, log.read_text()
      time.sleep(1)
  finally:
    subprocess.run(["scancel", job_id], check=False)
  text = log.read_text()
  saved = [int(s) for s in re.findall(r"saved \S+model\.ckpt-(\d+)", text)]
  resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
  assert saved and resumed == saved[0] > 0, text
  later = [int(s) for s in re.findall(r"step (\d+)/100000", text.split("resumed from", 1)[1])]
  assert later and min(later) > resumed, text


@pytest.mark.slurm
def test_request_no_node_can_run(crop_data, slurm_job_name, tmp_path):
  """--tasks_per_node above every node's CPUs: --strict (and --wait) refuse with one line and write
  nothing; without them a warning names the problem, and the job submitted stays pending."""
  offered = running_cluster()
  partition = offered.default_partition or offered.partitions[0]
  most = max(n.cpus for n in offered.nodes if n.partition == partition)
  tasks = str(most + 1)
  needs = (f"needs {most + 1} CPUs per node (--slurm_tasks_per_node {most + 1} x "
           f"--slurm_cpus_per_task 1), its nodes have at most {most}")
  train_dir = tmp_path / "run"
  for flag in ("--strict", "--wait"):
    start = time.monotonic()
    proc = _slurm_train(_flags(crop_data, train_dir, 5, "--tasks_per_node", tasks, flag), timeout=120,
                        job_name=slurm_job_name)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ffn slurm_train: error: no node of the Slurm cluster can ever run this "
                               f"job: partition {partition} (") and lines[0].endswith(needs), lines[0]
    assert proc.stdout == "" and not train_dir.exists() and queued(slurm_job_name) == []
    assert time.monotonic() - start < 60  # refused before anything is submitted
  proc = _slurm_train(_flags(crop_data, train_dir, 5, "--tasks_per_node", tasks), timeout=120,
                      job_name=slurm_job_name)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if " WARNING " in line]
  assert len(warnings) == 1 and needs in warnings[0] and "--slurm_strict refuses" in warnings[0], proc.stderr
  job_id = _job_id(proc.stdout)
  deadline = time.monotonic() + 30
  while (rows := queued(slurm_job_name)) != [f"{job_id} PENDING PartitionConfig"]:
    assert time.monotonic() < deadline, rows
    time.sleep(0.5)
  assert cancel_jobs(slurm_job_name) == [f"{job_id} PENDING PartitionConfig"]
