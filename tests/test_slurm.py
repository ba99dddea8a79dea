"""Tests of slurm.executor: option parsing, the local executor, and real jobs on a Slurm cluster.

Tests marked ``slurm`` submit to the Slurm cluster that answers ``sinfo`` (``run_tests.sh`` starts a
single-node one as root). Without one they are skipped, except when ``CI`` is set: then they fail,
because CI must run them. The cluster's partition, account, QoS and node feature are read from the
cluster itself, never assumed.
"""

from __future__ import annotations

import argparse
import getpass
import os
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
from slurm.executor import (JobFailedError, SlurmOptions, add_slurm_arguments, make_executor,
                            slurm_available, submit_array, wait_all)

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
  if not slurm_available():
    reason = ("no Slurm cluster answers `sinfo`; start one with scripts/start-local-slurm.sh "
              "(as root) or run ./run_tests.sh")
    if os.environ.get("CI"):
      pytest.fail(f"CI is set, so the Slurm tests must run, but {reason}")
    pytest.skip(reason)
  partitions = _query("sinfo", "--noheader", "--format=%P")
  partition = next((p for p in partitions if p.endswith("*")), partitions[0]).rstrip("*")
  features = [f for line in _query("sinfo", "--noheader", "--format=%f", "-p", partition)
              for f in line.split(",") if f != "(null)"]
  assoc = _query("sacctmgr", "--noheader", "--parsable2", "show", "assoc",
                 "where", f"user={getpass.getuser()}", "format=account,qos")
  account, qos = assoc[0].split("|")[:2] if assoc else (None, None)
  return {"partition": partition, "feature": features[0] if features else None,
          "account": account or None, "qos": qos.split(",")[0] if qos else None}


@pytest.mark.slurm
def test_slurm_job_array_real(cluster: dict, tmp_path: Path) -> None:
  """A 3-task array reads three boxes of an HDF5 volume with ffn.io.volumes on Slurm."""
  spec, data = _write_volume(tmp_path)
  options = SlurmOptions(cluster="slurm", partition=cluster["partition"], time_min=5,
                         cpus_per_task=1, mem_gb=0.5, account=cluster["account"],
                         qos=cluster["qos"], constraint=cluster["feature"], array_parallelism=2,
                         job_name="ffn-test-array")
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
              "--mem=512MB", "--job-name=ffn-test-array", "--array=0-2%2"]
  expected += [f"--{key}={cluster[name]}" for key, name in
               (("account", "account"), ("qos", "qos"), ("constraint", "feature")) if cluster[name]]
  for flag in expected:
    assert f"#SBATCH {flag}\n" in script, f"{flag} missing from the sbatch script:\n{script}"
  # Slurm accounted the three tasks under the requested name and partition (accounting is written
  # asynchronously, shortly after the results).
  expected_rows = [f"{array_id}_{i}|ffn-test-array|{cluster['partition']}|COMPLETED" for i in range(3)]
  deadline = time.monotonic() + 30
  while True:
    rows = sorted(_query("sacct", "--noheader", "--parsable2", "-X", "-j", array_id,
                         "--format=JobID,JobName,Partition,State"))
    if rows == expected_rows or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  assert rows == expected_rows


@pytest.mark.slurm
def test_slurm_script_has_nothing_hard_coded(cluster: dict, tmp_path: Path) -> None:
  """Without options, no partition/account/QoS/constraint/GPU/memory line is written; extra sbatch
  parameters and setup lines are passed through, and the setup runs in the job."""
  marker = tmp_path / "setup-ran"
  options = SlurmOptions(cluster="slurm", time_min=3, extra={"comment": "ffn-extra"},
                         setup=[f"touch {marker}"])
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
def test_slurm_cancelled_job_is_reported(cluster: dict, tmp_path: Path) -> None:
  """A job that ends without a result (here: cancelled) raises with its id, state and log."""
  executor = make_executor(SlurmOptions(cluster="slurm", time_min=3), tmp_path / "work")
  jobs = submit_array(executor, time.sleep, [(120,)])
  deadline = time.monotonic() + 60
  while jobs[0].state != "RUNNING" and time.monotonic() < deadline:
    time.sleep(0.5)
  subprocess.run(["scancel", jobs[0].job_id], check=True)
  with pytest.raises(JobFailedError, match=f"job {jobs[0].job_id} failed \\(CANCELLED"):
    wait_all(jobs, poll_s=0.5)
