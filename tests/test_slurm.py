"""Tests of slurm.executor: option parsing, the local executor, the request check against
``sinfo``, and real jobs on a Slurm cluster.

Tests marked ``slurm`` submit to the Slurm cluster that answers ``sinfo`` (``run_tests.sh`` starts a
single-node one as root). Each first checks that the cluster can run its job
(``slurm_cluster.require_fit``): without a cluster, or when no node fits, it is skipped, except
when ``CI`` is set: then it fails at once, because CI must run it. Each names its jobs with the
``slurm_job_name`` fixture, which cancels whatever is left of them at teardown. The cluster's
partition, account, QoS and node feature are read from the cluster itself, never assumed.
"""

from __future__ import annotations

import argparse
import getpass
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.io.volumes import read_volume
from slurm.executor import (JobFailedError, SlurmOptions, add_slurm_arguments, fit_problems,
                            make_executor, parse_sinfo_nodes, parse_slurm_time, submit_array,
                            wait_all)
from slurm_cluster import (cancel_jobs, queued, require_fit, running_cluster, slurm_job_name,
                           unavailable)

BOXES = [BoundingBox((0, 0, 0), (4, 5, 6)), BoundingBox((3, 1, 2), (5, 4, 3)),
         BoundingBox((7, 6, 5), (5, 6, 7))]


def _write_volume(tmp_path: Path) -> tuple[str, np.ndarray]:
  """A small random uint16 volume (z,y,x = 12,12,12) in an HDF5 file; returns its spec and data."""
  data = np.random.default_rng(7).integers(0, 60000, size=(12, 12, 12), dtype=np.uint16)
  path = tmp_path / "volume.h5"
  with h5py.File(path, "w") as f:
    f.create_dataset("raw", data=data, chunks=(4, 4, 4))
  return f"{path}:raw", data


def _check_box_results(results: list[np.ndarray], data: np.ndarray) -> None:
  assert len(results) == len(BOXES)
  for box, result in zip(BOXES, results):
    np.testing.assert_array_equal(result, data[box.to_slices()])


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  add_slurm_arguments(parser)
  return parser.parse_args(argv)


def test_options_from_flags() -> None:
  args = _parse(["--cluster", "slurm", "--slurm_partition", "p1", "--slurm_time_min", "30",
                 "--slurm_cpus_per_task=4", "--slurm_mem_gb", "7.5", "--slurm_gpus_per_node", "2",
                 "--slurm_account", "lab", "--slurm_qos", "high", "--slurm_constraint", "a100",
                 "--slurm_array_parallelism", "3", "--slurm_param", "gres=gpu:a100:2",
                 "--slurm_param=--exclusive", "--slurm_setup", "module load cuda"])
  options = SlurmOptions.from_args(args)
  assert options == SlurmOptions(
      cluster="slurm", partition="p1", time_min=30, cpus_per_task=4, mem_gb=7.5, gpus_per_node=2,
      account="lab", qos="high", constraint="a100", array_parallelism=3,
      extra={"gres": "gpu:a100:2", "exclusive": True}, setup=["module load cuda"])


def test_defaults_request_nothing_site_specific() -> None:
  options = SlurmOptions.from_args(_parse([]))
  assert options.cluster == "auto"
  assert (options.partition, options.account, options.qos, options.constraint) == (None,) * 4
  assert options.gpus_per_node == 0 and options.mem_gb is None and options.extra == {}


@pytest.mark.parametrize("argv, fragment", [
    (["--slurm_param", "gres="], "KEY=VALUE"),
    (["--slurm_time_min", "0"], "--slurm_time_min"),
    (["--slurm_array_parallelism", "0"], "--slurm_array_parallelism"),
    (["--slurm_mem_gb", "-1"], "--slurm_mem_gb"),
])
def test_bad_options_are_user_errors(argv: list[str], fragment: str) -> None:
  with pytest.raises(FFNError, match=re.escape(fragment)):
    SlurmOptions.from_args(_parse(argv))


# ----------------------------------------------------------------------------- request vs sinfo

# `sinfo --Node --noheader --format='%N|%P|%c|%m|%G|%f|%l'` of a cluster with a default CPU
# partition, a GPU partition and a long partition sharing c1. Values as Slurm prints them.
SITE_SINFO = """\
c1|cpu*|64|256000|(null)|avx512,ib|1-00:00:00
c2|cpu*|64|256000|(null)|avx512|1-00:00:00
g1|gpu|32|512000|gpu:a100:4(S:0-1)|a100|2-00:00:00
g2|gpu|32|256000|gpu:a100:2,gpu:v100:2|a100,v100|2-00:00:00
c1|long|64|256000|(null)|avx512,ib|infinite
"""
# The cluster: one node of 2 CPUs.
TWO_CPU_SINFO = "vm|debug*|2|3900|(null)|(null)|infinite\n"
TWO_CPU_WHERE = "partition debug (1 node (vm: 2 CPUs, 3900 MB, 0 GPUs))"


def test_parse_sinfo_nodes() -> None:
  cluster = parse_sinfo_nodes(SITE_SINFO)
  assert cluster.default_partition == "cpu"
  assert cluster.partitions == ["cpu", "gpu", "long"]
  assert [(n.name, n.partition, n.cpus, n.memory_mb, n.gpus, n.time_limit_min)
          for n in cluster.nodes] == [
      ("c1", "cpu", 64, 256000, 0, 1440), ("c2", "cpu", 64, 256000, 0, 1440),
      ("g1", "gpu", 32, 512000, 4, 2880), ("g2", "gpu", 32, 256000, 4, 2880),
      ("c1", "long", 64, 256000, 0, None)]
  assert cluster.nodes[0].features == {"avx512", "ib"} and cluster.nodes[3].features == {"a100", "v100"}
  assert cluster.describe("gpu") == "2 nodes (g1: 32 CPUs, 512000 MB, 4 GPUs; g2: 32 CPUs, 256000 MB, 4 GPUs)"
  assert cluster.describe("cpu") == "2 nodes (c1,c2: 64 CPUs, 256000 MB, 0 GPUs)"
  # A node group line ("+": its nodes differ) counts as its minimum; no "*": no default partition.
  grouped = parse_sinfo_nodes("n[1-8]|batch|16+|64000+|gpu:2|(null)|30:00\n")
  assert grouped.default_partition is None
  assert (grouped.nodes[0].cpus, grouped.nodes[0].memory_mb, grouped.nodes[0].gpus) == (16, 64000, 2)
  assert grouped.nodes[0].time_limit_min == 30
  with pytest.raises(FFNError, match="expected 7 fields"):
    parse_sinfo_nodes("vm|debug*|2\n")
  with pytest.raises(FFNError, match="cannot read the node line"):
    parse_sinfo_nodes("vm|debug*|two|3900|(null)|(null)|infinite\n")


@pytest.mark.parametrize("text, minutes", [
    ("infinite", None), ("UNLIMITED", None), ("45", 45), ("45:00", 45), ("45:01", 46),
    ("2:30:00", 150), ("3-00", 4320), ("1-12:30", 2190), ("1-00:00:01", 1441)])
def test_parse_slurm_time(text: str, minutes: int | None) -> None:
  assert parse_slurm_time(text) == minutes


def test_two_cpu_cluster_cannot_fit_four_tasks() -> None:
  """The issue's case: 4 tasks x 1 CPU on a 2-CPU node would stay pending (PartitionConfig)."""
  cluster = parse_sinfo_nodes(TWO_CPU_SINFO)
  assert fit_problems(SlurmOptions(tasks_per_node=4, mem_gb=3), cluster) == [
      f"{TWO_CPU_WHERE}: needs 4 CPUs per node (--slurm_tasks_per_node 4 x --slurm_cpus_per_task 1), "
      "its nodes have at most 2"]
  assert fit_problems(SlurmOptions(tasks_per_node=2, mem_gb=3), cluster) == []
  # With overcommit Slurm gives the tasks of a node one task's CPUs.
  assert fit_problems(SlurmOptions(tasks_per_node=4, extra={"overcommit": True}), cluster) == []
  assert fit_problems(SlurmOptions(mem_gb=4), cluster) == [
      f"{TWO_CPU_WHERE}: needs 4096 MB per node (--slurm_mem_gb 4), its nodes have at most 3900 MB"]


@pytest.mark.parametrize("options, problems", [
    (SlurmOptions(tasks_per_node=64), []),
    (SlurmOptions(tasks_per_node=8, cpus_per_task=8, nodes=2, constraint="avx512"), []),
    (SlurmOptions(partition="gpu", gpus_per_node=4, cpus_per_task=32, nodes=2), []),
    (SlurmOptions(partition="gpu", constraint="a100|v100"), []),  # an expression: not checked
    (SlurmOptions(partition="cpu,long", time_min=2000), []),  # long has no limit
    (SlurmOptions(partition="gpu", gpus_per_node=5),
     ["partition gpu (2 nodes (g1: 32 CPUs, 512000 MB, 4 GPUs; g2: 32 CPUs, 256000 MB, 4 GPUs)): "
      "needs 5 GPUs per node, its nodes have at most 4"]),
    (SlurmOptions(partition="gpu", extra={"gres": "gpu:a100:8"}),
     ["partition gpu (2 nodes (g1: 32 CPUs, 512000 MB, 4 GPUs; g2: 32 CPUs, 256000 MB, 4 GPUs)): "
      "needs 8 GPUs per node, its nodes have at most 4"]),
    # Each resource alone is offered by some node, both nodes together are not.
    (SlurmOptions(partition="gpu", nodes=2, mem_gb=400, gpus_per_node=4),
     ["partition gpu (2 nodes (g1: 32 CPUs, 512000 MB, 4 GPUs; g2: 32 CPUs, 256000 MB, 4 GPUs)): "
      "needs 2 nodes (--slurm_nodes) with 1 CPUs, 409600 MB, 4 GPUs each, 1 qualify"]),
    (SlurmOptions(nodes=2, constraint="ib"),
     ["partition cpu (2 nodes (c1,c2: 64 CPUs, 256000 MB, 0 GPUs)): needs 2 nodes (--slurm_nodes) "
      "with 1 CPUs, feature 'ib' each, 1 qualify"]),
    (SlurmOptions(constraint="a100"),
     ["partition cpu (2 nodes (c1,c2: 64 CPUs, 256000 MB, 0 GPUs)): needs node feature 'a100' "
      "(--slurm_constraint), its nodes have avx512, ib"]),
    (SlurmOptions(time_min=2000),
     ["partition cpu (2 nodes (c1,c2: 64 CPUs, 256000 MB, 0 GPUs)): needs 2000 min "
      "(--slurm_time_min), its time limit is 1440 min"]),
    (SlurmOptions(partition="cpu,long", tasks_per_node=65),
     ["partition cpu (2 nodes (c1,c2: 64 CPUs, 256000 MB, 0 GPUs)): needs 65 CPUs per node "
      "(--slurm_tasks_per_node 65 x --slurm_cpus_per_task 1), its nodes have at most 64",
      "partition long (1 node (c1: 64 CPUs, 256000 MB, 0 GPUs)): needs 65 CPUs per node "
      "(--slurm_tasks_per_node 65 x --slurm_cpus_per_task 1), its nodes have at most 64"]),
    (SlurmOptions(partition="gpux"), ["partition 'gpux' does not exist (sinfo lists cpu, gpu, long)"]),
])
def test_fit_problems(options: SlurmOptions, problems: list[str]) -> None:
  assert fit_problems(options, parse_sinfo_nodes(SITE_SINFO)) == problems


def test_fit_without_default_partition() -> None:
  cluster = parse_sinfo_nodes(SITE_SINFO.replace("cpu*", "cpu"))
  assert fit_problems(SlurmOptions(), cluster) == [
      "no --slurm_partition given and the cluster has no default partition"]
  assert fit_problems(SlurmOptions(partition="cpu"), cluster) == []


@pytest.mark.parametrize("ci, outcome", [("1", pytest.fail.Exception), (None, pytest.skip.Exception)])
def test_require_fit_fails_under_ci_else_skips(monkeypatch: pytest.MonkeyPatch, ci: str | None,
                                               outcome: type) -> None:
  """A Slurm test whose job cannot fit ends at once with one line: what it needs, what is there."""
  if ci is None:
    monkeypatch.delenv("CI", raising=False)
  else:
    monkeypatch.setenv("CI", ci)
  two_cpus = parse_sinfo_nodes(TWO_CPU_SINFO)
  options = SlurmOptions(cluster="slurm", tasks_per_node=4, mem_gb=3)
  with pytest.raises(outcome) as info:
    require_fit(options, two_cpus)
  message = str(info.value.msg)
  expected = ("this test's Slurm job (1 node x 4 tasks x 1 CPU, 3 GB per node, default partition) "
              f"can never run on this cluster: {TWO_CPU_WHERE}: needs 4 CPUs per node "
              "(--slurm_tasks_per_node 4 x --slurm_cpus_per_task 1), its nodes have at most 2")
  assert message == (f"{expected} (CI is set: Slurm tests may not skip)" if ci else expected)
  assert require_fit(SlurmOptions(cluster="slurm", tasks_per_node=2), two_cpus) is two_cpus
  with pytest.raises(outcome, match="can never run"):
    unavailable("can never run")


def test_local_executor_array(tmp_path: Path) -> None:
  """The local cluster runs each task as a subprocess, at most array_parallelism at once."""
  spec, data = _write_volume(tmp_path)
  executor = make_executor(SlurmOptions(cluster="local", time_min=5, array_parallelism=2),
                           tmp_path / "work")
  assert executor.cluster == "local"
  jobs = submit_array(executor, read_volume, [(spec, box) for box in BOXES])
  _check_box_results(wait_all(jobs), data)
  for job in jobs:
    assert Path(job.paths.stdout).parent == tmp_path / "work" / "logs" / str(job.job_id)
    assert Path(job.paths.stderr).exists()


def test_local_executor_failure_names_job_and_log(tmp_path: Path) -> None:
  spec, _ = _write_volume(tmp_path)
  executor = make_executor(SlurmOptions(cluster="local", time_min=5), tmp_path / "work")
  jobs = submit_array(executor, read_volume, [(spec.replace(":raw", ":missing"),)])
  with pytest.raises(JobFailedError) as info:
    wait_all(jobs)
  error = info.value
  assert error.job_id == str(jobs[0].job_id)
  assert error.stderr_path.exists()
  message = str(error)
  assert "no dataset 'missing'" in message and str(error.stderr_path) in message


def test_local_executor_honours_parallelism(tmp_path: Path) -> None:
  """With array_parallelism=1, each local task starts after the previous one ended."""
  executor = make_executor(SlurmOptions(cluster="local", time_min=5, array_parallelism=1),
                           tmp_path / "work")
  start = time.monotonic()
  jobs = submit_array(executor, time.sleep, [(1.0,), (1.0,)])
  assert time.monotonic() - start >= 1.0  # the second task waited for the first
  assert wait_all(jobs) == [None, None]


def test_explicit_slurm_without_cluster_is_user_error(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
  monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/sinfo reachable
  with pytest.raises(FFNError, match="no Slurm controller answers"):
    make_executor(SlurmOptions(cluster="slurm"), tmp_path / "work")
  with pytest.raises(FFNError, match="--slurm_nodes 2 needs Slurm"):
    make_executor(SlurmOptions(cluster="auto", nodes=2), tmp_path / "work")
  assert make_executor(SlurmOptions(cluster="auto"), tmp_path / "work").cluster == "local"


# ----------------------------------------------------------------------------- real Slurm

def _query(*command: str) -> list[str]:
  out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
  return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cluster() -> dict[str, str | None]:
  """What the running Slurm cluster offers: default partition, a node feature, account, QoS."""
  offered = running_cluster()
  partition = offered.default_partition or offered.partitions[0]
  features = sorted(set().union(*(n.features for n in offered.nodes if n.partition == partition)))
  assoc = _query("sacctmgr", "--noheader", "--parsable2", "show", "assoc",
                 "where", f"user={getpass.getuser()}", "format=account,qos")
  account, qos = assoc[0].split("|")[:2] if assoc else (None, None)
  return {"partition": partition, "feature": features[0] if features else None,
          "account": account or None, "qos": qos.split(",")[0] if qos else None}


@pytest.mark.slurm
def test_slurm_job_array_real(cluster: dict, slurm_job_name: str, tmp_path: Path) -> None:
  """A 3-task array reads three boxes of an HDF5 volume with ffn.io.volumes on Slurm."""
  spec, data = _write_volume(tmp_path)
  options = SlurmOptions(cluster="slurm", partition=cluster["partition"], time_min=5,
                         cpus_per_task=1, mem_gb=0.5, account=cluster["account"],
                         qos=cluster["qos"], constraint=cluster["feature"], array_parallelism=2,
                         job_name=slurm_job_name, strict=True)
  require_fit(options)
  executor = make_executor(options, tmp_path / "work")
  assert executor.cluster == "slurm"
  jobs = submit_array(executor, read_volume, [(spec, box) for box in BOXES])
  array_id = jobs[0].job_id.split("_")[0]
  assert [job.job_id for job in jobs] == [f"{array_id}_{i}" for i in range(3)]
  _check_box_results(wait_all(jobs), data)

  for job in jobs:
    log_dir = tmp_path / "work" / "logs" / job.job_id
    assert Path(job.paths.stdout) == log_dir / f"{job.job_id}_0_log.out"
    assert Path(job.paths.stdout).exists() and Path(job.paths.stderr).exists()
  # The sbatch script carries every option the user gave.
  script = (tmp_path / "work" / "logs" / array_id / f"{array_id}_submission.sh").read_text()
  expected = [f"--partition={cluster['partition']}", "--time=5", "--cpus-per-task=1",
              "--mem=512MB", f"--job-name={slurm_job_name}", "--array=0-2%2"]
  expected += [f"--{key}={cluster[name]}" for key, name in
               (("account", "account"), ("qos", "qos"), ("constraint", "feature")) if cluster[name]]
  for flag in expected:
    assert f"#SBATCH {flag}\n" in script, f"{flag} missing from the sbatch script:\n{script}"
  # Slurm accounted the three tasks under the requested name and partition (accounting is written
  # asynchronously, shortly after the results).
  expected_rows = [f"{array_id}_{i}|{slurm_job_name}|{cluster['partition']}|COMPLETED"
                   for i in range(3)]
  deadline = time.monotonic() + 30
  while True:
    rows = sorted(_query("sacct", "--noheader", "--parsable2", "-X", "-j", array_id,
                         "--format=JobID,JobName,Partition,State"))
    if rows == expected_rows or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  assert rows == expected_rows


@pytest.mark.slurm
def test_slurm_script_has_nothing_hard_coded(cluster: dict, slurm_job_name: str,
                                             tmp_path: Path) -> None:
  """Without options, no partition/account/QoS/constraint/GPU/memory line is written; extra sbatch
  parameters and setup lines are passed through, and the setup runs in the job."""
  marker = tmp_path / "setup-ran"
  options = SlurmOptions(cluster="slurm", time_min=3, extra={"comment": "ffn-extra"},
                         setup=[f"touch {marker}"], job_name=slurm_job_name)
  require_fit(options)
  executor = make_executor(options, tmp_path / "work")
  jobs = submit_array(executor, abs, [(-3,)])
  assert wait_all(jobs) == [3]
  assert marker.exists()
  script = (tmp_path / "work" / "logs" / jobs[0].job_id /
            f"{jobs[0].job_id}_submission.sh").read_text()
  for key in ("partition", "account", "qos", "constraint", "gpus", "gres", "mem", "array"):
    assert f"--{key}" not in script, f"unexpected --{key} in:\n{script}"
  assert "#SBATCH --comment=ffn-extra\n" in script and f"touch {marker}\n" in script


@pytest.mark.slurm
def test_slurm_cancelled_job_is_reported(cluster: dict, slurm_job_name: str, tmp_path: Path) -> None:
  """A job that ends without a result (here: cancelled) raises with its id, state and log."""
  options = SlurmOptions(cluster="slurm", time_min=3, job_name=slurm_job_name)
  require_fit(options)
  executor = make_executor(options, tmp_path / "work")
  jobs = submit_array(executor, time.sleep, [(120,)])
  deadline = time.monotonic() + 60
  while jobs[0].state != "RUNNING" and time.monotonic() < deadline:
    time.sleep(0.5)
  subprocess.run(["scancel", jobs[0].job_id], check=True)
  with pytest.raises(JobFailedError, match=f"job {jobs[0].job_id} failed \\(CANCELLED"):
    wait_all(jobs, poll_s=0.5)


def _most_cpus(partition: str | None = None) -> tuple[str, int]:
  """The default (or given) partition of the running cluster and the most CPUs of one of its nodes."""
  offered = running_cluster()
  partition = partition or offered.default_partition or offered.partitions[0]
  return partition, max(n.cpus for n in offered.nodes if n.partition == partition)


@pytest.mark.slurm
def test_oversized_request_is_refused_at_once(slurm_job_name: str, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
  """More CPUs per node than any node has: --slurm_strict refuses before submitting; without it
  the request is warned about, and the job Slurm accepts stays pending (what the check prevents)
  until the test's cleanup cancels it."""
  partition, most = _most_cpus()
  options = SlurmOptions(cluster="slurm", time_min=3, tasks_per_node=most + 1, job_name=slurm_job_name,
                         strict=True)
  needs = (f"needs {most + 1} CPUs per node (--slurm_tasks_per_node {most + 1} x "
           f"--slurm_cpus_per_task 1), its nodes have at most {most}")
  start = time.monotonic()
  with pytest.raises(FFNError) as info:
    make_executor(options, tmp_path / "work")
  assert time.monotonic() - start < 20
  message = str(info.value)
  assert message.startswith(f"no node of the Slurm cluster can ever run this job: partition {partition} (")
  assert message.endswith(needs) and "\n" not in message
  assert queued(slurm_job_name) == [] and not (tmp_path / "work").exists()

  options.strict = False
  with caplog.at_level("WARNING", logger="slurm.executor"):
    executor = make_executor(options, tmp_path / "work")
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and needs in warnings[0], warnings
  assert "this job would stay pending for ever" in warnings[0]
  job = submit_array(executor, abs, [(-1,)])[0]
  deadline = time.monotonic() + 30
  while (rows := queued(slurm_job_name)) != [f"{job.job_id} PENDING PartitionConfig"]:
    assert time.monotonic() < deadline, rows
    time.sleep(0.5)
  assert cancel_jobs(slurm_job_name) == [f"{job.job_id} PENDING PartitionConfig"]
  assert queued(slurm_job_name) == []
