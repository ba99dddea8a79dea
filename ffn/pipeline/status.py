"""Where a pipeline run stands (``ffn pipeline status <run_dir>``), from its files and Slurm.

Per stage: state (``stage.json``), tasks done / running / failed / pending of its current
submission (task status files of :mod:`ffn.blockwise`; tasks without one: Slurm's ``squeue`` /
``sacct`` state of ``<array>_<index>``), job ids, elapsed time, an ETA from the finished tasks'
durations, and the log of every failed task. Never from scraping logs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from ffn.blockwise import STALE_S
from ffn.errors import FFNError
from ffn.pipeline.stages import empty_stage, read_json, task_files
from ffn.progress import format_eta

_ENDED_BAD = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
              "PREEMPTED", "TIMEOUT")


def _expand(job_id: str) -> list[str]:
  """``123_[0-2,5]`` -> 123_0, 123_1, 123_2, 123_5 (sacct/squeue print pending arrays so)."""
  match = re.fullmatch(r"(\d+)_\[([\d,\-%]+)\]", job_id)
  if not match:
    return [job_id]
  out = []
  for part in match.group(2).split("%")[0].split(","):
    lo, _, hi = part.partition("-")
    out += [f"{match.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
  return out


def slurm_states(array_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
  """``<array>_<index>`` -> (state, reason) of every task of the given arrays: live ones from
  ``squeue`` (reason e.g. ``DependencyNeverSatisfied``), ended ones from ``sacct``. Empty when
  Slurm does not answer."""
  ids = sorted({str(i) for i in array_ids if i})
  if not ids:
    return {}
  out: dict[str, tuple[str, str]] = {}
  try:
    acct = subprocess.run(["sacct", "--noheader", "--parsable2", "-X", "-j", ",".join(ids),
                           "--format=JobID,State"], capture_output=True, text=True, timeout=30,
                          check=False).stdout
    live = subprocess.run(["squeue", "--noheader", "-r", "-j", ",".join(ids), "--format=%i|%T|%r"],
                          capture_output=True, text=True, timeout=30, check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    return {}
  for line in acct.splitlines():
    parts = line.strip().split("|")
    if len(parts) >= 2 and parts[1]:
      for job in _expand(parts[0]):
        out[job] = (parts[1].split()[0], "")
  for line in live.splitlines():
    parts = line.strip().split("|")
    if len(parts) >= 3:
      for job in _expand(parts[0]):
        out[job] = (parts[1], parts[2])
  return out


def is_live(state: str) -> bool:
  return state in ("PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING",
                   "COMPLETING")


@dataclasses.dataclass
class PhaseStatus:
  name: str
  array_id: str | None
  tasks: int
  done: int = 0
  running: int = 0
  failed: int = 0
  pending: int = 0
  logs: list[str] = dataclasses.field(default_factory=list)
  task_seconds: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StageStatus:
  name: str
  state: str
  job_ids: list[str]
  phases: list[PhaseStatus]
  elapsed_s: float | None
  eta_s: float | None
  stale: bool  # a live job waits for a dependency that can never be satisfied

  def count(self, what: str) -> int:
    return sum(getattr(p, what) for p in self.phases)


def _task_state(data: dict[str, Any] | None, slurm: tuple[str, str] | None,
                now: float) -> str:
  if data is not None:
    state = data.get("state")
    if state == "finished":
      return "done"
    if state in ("failed", "interrupted"):
      return "failed"
    if state == "requeued":
      return "pending"
    if slurm is not None and slurm[0] in _ENDED_BAD + ("COMPLETED",):
      return "failed"  # ended without saying so: killed
    if slurm is None and now - float(data.get("heartbeat", now)) > STALE_S:
      return "failed"
    return "running"
  if slurm is None:
    return "pending"
  if slurm[0] == "RUNNING":
    return "running"
  if slurm[0] in _ENDED_BAD or slurm[0] == "COMPLETED":
    return "failed"  # ended before its task wrote a status file
  return "pending"


def stage_statuses(run_dir: str | os.PathLike, plan: dict[str, Any] | None = None,
                   now: float | None = None) -> list[StageStatus]:
  run_dir = Path(run_dir)
  plan = plan if plan is not None else read_json(run_dir / "plan.json")
  if plan is None:
    raise FFNError(f"{run_dir}: no plan.json here (not a pipeline run directory)")
  now = time.time() if now is None else now
  records = {s["name"]: read_json(run_dir / "stages" / s["name"] / "stage.json")
             or empty_stage(s["name"]) for s in plan["stages"]}
  arrays = [j for r in records.values() for j in r.get("job_ids", []) if r["state"] != "done"]
  slurm = slurm_states(arrays)
  out = []
  for entry in plan["stages"]:
    record = records[entry["name"]]
    submission = int(record.get("submission", 0))
    phases = []
    stale = False
    for i, phase in enumerate(entry["phases"]):
      array = record["job_ids"][i] if i < len(record.get("job_ids", [])) else None
      status = PhaseStatus(phase["name"], array, phase["tasks"])
      if record["state"] == "done":
        status.done = phase["tasks"]
        phases.append(status)
        continue
      files = task_files(run_dir, entry, submission, phase["name"]) if submission else {}
      log_root = run_dir / "stages" / entry["name"] / "logs"
      for t in range(phase["tasks"]):
        # submitit submits a one-task phase as a plain job (id without _<index>)
        job = (f"{array}_{t}" if phase["tasks"] > 1 else array) if array else None
        sl = (slurm.get(job) or slurm.get(f"{array}_{t}")) if job else None
        stale = stale or (sl is not None and "DependencyNeverSatisfied" in sl[1])
        state = _task_state(files.get(t), sl, now)
        setattr(status, state, getattr(status, state) + 1)
        data = files.get(t) or {}
        if state == "failed":
          status.logs.append(data.get("log") or str(log_root / job / f"{job}_0_log.err")
                             if job else "?")
        if state == "done" and data.get("ended") and data.get("started"):
          status.task_seconds.append(float(data["ended"]) - float(data["started"]))
      phases.append(status)
    state = record["state"]
    if state in ("queued", "running") and any(p.failed for p in phases) and not any(
        p.running for p in phases):
      state = "failed"  # e.g. a task killed before it could say so
    started, finished = record.get("started"), record.get("finished")
    elapsed = (finished or now) - started if started else None
    eta = None
    if state not in ("done", "failed"):
      seconds = [s for p in phases for s in p.task_seconds]
      if seconds:
        mean = sum(seconds) / len(seconds)
        eta = sum((p.pending + p.running) * mean for p in phases)
    out.append(StageStatus(entry["name"], state, list(record.get("job_ids", [])),
                           phases, elapsed, eta, stale))
  return out


def _time(seconds: float | None) -> str:
  return "-" if seconds is None else format_eta(seconds)


def status_table(statuses: list[StageStatus]) -> list[str]:
  """The table ``ffn pipeline status`` prints, then one line per failed task's log."""
  header = f"{'stage':14s} {'state':8s} {'done':>5s} {'run':>4s} {'fail':>4s} {'pend':>5s} " \
           f"{'elapsed':>9s} {'ETA':>9s}  jobs"
  lines = [header]
  for s in statuses:
    state = s.state + ("*" if s.stale else "")
    lines.append(f"{s.name:14s} {state:8s} {s.count('done'):5d} {s.count('running'):4d} "
                 f"{s.count('failed'):4d} {s.count('pending'):5d} {_time(s.elapsed_s):>9s} "
                 f"{_time(s.eta_s):>9s}  {','.join(s.job_ids) or '-'}")
  for s in statuses:
    for p in s.phases:
      for log in p.logs:
        lines.append(f"failed: {s.name}/{p.name} (array {p.array_id or '-'}): log {log}")
  if any(s.stale for s in statuses):
    lines.append("*: queued behind a failed job (DependencyNeverSatisfied): rerun "
                 "`ffn pipeline run` to resubmit")
  return lines


def something_failed(statuses: list[StageStatus]) -> bool:
  return any(s.state == "failed" or s.count("failed") or s.stale for s in statuses)
