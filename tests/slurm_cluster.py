"""Helpers for the tests that submit to a real Slurm cluster (``tests/test_slurm.py``,
``tests/test_distributed.py``): what the cluster offers, whether a test's job fits, and cleanup.

Every such test, before it submits:

* calls :func:`require_fit` with the :class:`~slurm.executor.SlurmOptions` of its job: when no
  cluster answers ``sinfo``, or no node of the partition can run the job (``sinfo`` CPUs, memory,
  GPUs per node, partition, node count, time limit; :func:`slurm.executor.fit_problems`), the
  test fails at once when the env var ``CI`` is set and skips otherwise, with one line saying what
  the job needs and what the cluster offers. It never submits a job that would stay pending.
* takes the :func:`slurm_job_name` fixture and gives its jobs that name: at teardown, whatever
  the outcome (failure, timeout, interrupt), every job of that name still queued or running is
  cancelled and the queue is checked to be free of it.

Test modules import the fixture (``from slurm_cluster import slurm_job_name``) to use it.
"""

from __future__ import annotations

import functools
import getpass
import os
import subprocess
import time
import uuid
from typing import Iterator, NoReturn

import pytest

from slurm.executor import SlurmCluster, SlurmOptions, fit_problems, query_cluster, slurm_available

START_HINT = "start one with scripts/start-local-slurm.sh (as root) or run ./run_tests.sh"


def unavailable(reason: str) -> NoReturn:
  """Ends a Slurm test that cannot run here: fails when CI is set (CI must run it), else skips."""
  if os.environ.get("CI"):
    pytest.fail(f"{reason} (CI is set: Slurm tests may not skip)", pytrace=False)
  pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def _running_cluster() -> SlurmCluster | None:
  return query_cluster() if slurm_available() else None


def running_cluster() -> SlurmCluster:
  """What the Slurm cluster answering ``sinfo`` offers (see :func:`unavailable` when none)."""
  cluster = _running_cluster()
  if cluster is None:
    unavailable(f"no Slurm cluster answers `sinfo`; {START_HINT}")
  return cluster


def describe_request(options: SlurmOptions) -> str:
  """The resources of a job, e.g. ``1 node x 4 tasks x 1 CPU, 3 GB per node, default partition``."""
  parts = [f"{options.nodes} node{'s' if options.nodes > 1 else ''} x {options.tasks_per_node} "
           f"task{'s' if options.tasks_per_node > 1 else ''} x {options.cpus_per_task} CPU"
           f"{'s' if options.cpus_per_task > 1 else ''}"]
  if options.mem_gb is not None:
    parts.append(f"{options.mem_gb:g} GB per node")
  if options.gpus_per_node:
    parts.append(f"{options.gpus_per_node} GPUs per node")
  parts.append(f"partition {options.partition}" if options.partition else "default partition")
  return ", ".join(parts)


def require_fit(options: SlurmOptions, cluster: SlurmCluster | None = None) -> SlurmCluster:
  """The cluster (``cluster``, else the running one) when it can run a job of ``options``; else
  ends the test through :func:`unavailable` with what the job needs and what the cluster has."""
  cluster = running_cluster() if cluster is None else cluster
  problems = fit_problems(options, cluster)
  if problems:
    unavailable(f"this test's Slurm job ({describe_request(options)}) can never run on this "
                f"cluster: {'; '.join(problems)}")
  return cluster


def queued(job_name: str) -> list[str]:
  """``<job id> <state> <reason>`` of this user's jobs named ``job_name`` still in the queue."""
  result = subprocess.run(["squeue", "--noheader", f"--name={job_name}", f"--user={getpass.getuser()}",
                           "--format=%i %T %r"], capture_output=True, text=True, timeout=30, check=False)
  return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def pending_reason(job_id: str) -> str | None:
  """Why the job ``job_id`` is pending (squeue's reason, e.g. ``BeginTime`` while Slurm holds a
  requeued job for ~2 minutes), or None when it is not pending."""
  result = subprocess.run(["squeue", "--noheader", "--states=PENDING", "--jobs", job_id, "--format=%r"],
                          capture_output=True, text=True, timeout=30)
  return result.stdout.strip() or None


class RequeueHold:
  """Starts a requeued job now instead of after Slurm's requeue hold (~2 min pending on its
  BeginTime): call :meth:`poll` in a wait loop. The hold is released 3 s after it was first seen,
  never within the second of the requeue (slurmd refuses a credential issued in the second the old
  one was revoked: "Job credential revoked", and the job fails). On a Slurm that names the reason
  otherwise nothing is released and the job simply starts after the hold."""

  def __init__(self, job_id: str, delay_s: float = 3.0):
    self.job_id, self.delay_s = job_id, delay_s
    self.seen: float | None = None
    self.released = False

  def poll(self) -> None:
    if self.released:
      return
    if self.seen is None:
      if pending_reason(self.job_id) == "BeginTime":
        self.seen = time.monotonic()
    elif time.monotonic() - self.seen > self.delay_s:
      subprocess.run(["scontrol", "update", f"JobId={self.job_id}", "StartTime=now"], check=True,
                     timeout=30)
      self.released = True


def cancel_jobs(job_name: str, timeout_s: float = 60.0) -> list[str]:
  """Cancels this user's jobs named ``job_name``; returns those found in the queue (as
  :func:`queued` lists them). Raises AssertionError if any is still queued after ``timeout_s``."""
  found = queued(job_name)
  if not found:
    return []
  subprocess.run(["scancel", f"--name={job_name}", f"--user={getpass.getuser()}"],
                 capture_output=True, timeout=30, check=False)
  deadline = time.monotonic() + timeout_s
  while (left := queued(job_name)) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not left, f"scancel left jobs named {job_name} in the queue: {left}"
  return found


@pytest.fixture
def slurm_job_name() -> Iterator[str]:
  """A job name unique to this test; its jobs are cancelled at teardown (see the module doc)."""
  name = f"ffn-test-{uuid.uuid4().hex[:10]}"
  yield name
  if _running_cluster() is not None:
    cancel_jobs(name)
