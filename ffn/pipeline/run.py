"""``ffn pipeline run``: plan the DAG, refuse what would invalidate finished outputs, submit.

On Slurm every phase of every stage that is not done is submitted at once, as one job array
with ``--dependency=afterok:<arrays it needs>`` (the previous phase of its stage, or the last
phase of each upstream stage still to finish), so the whole DAG is queued in seconds. Elsewhere
(``local``: tasks as subprocesses; ``debug``: in this process) the phases run in order.

Re-running the same command resumes: stages done with the same fingerprint are skipped; a stage
whose jobs are still queued or running is left alone, unless it waits behind a job that failed
(``DependencyNeverSatisfied``), its upstream is resubmitted or it is forced: then its live jobs
are cancelled and it is submitted again. Inside a resubmitted stage, finished items (chunks,
points, blocks) are skipped by its workers and interrupted chunks resume from their checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic
from ffn.pipeline import plan as planlib
from ffn.pipeline.config import load_config
from ffn.pipeline.stages import PhaseTask, empty_stage, read_json, run_phase_here, update_stage
from ffn.pipeline.status import (is_live, slurm_states, something_failed, stage_statuses,
                                 status_table)
from ffn.progress import format_eta

_log = logging.getLogger(__name__)


def _records(run_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
  return {n: read_json(run_dir / "stages" / n / "stage.json") or empty_stage(n) for n in names}


def _began(record: dict[str, Any]) -> bool:
  return record["state"] != "pending" or bool(record.get("job_ids"))


def check_changes(config_path: str, run_dir: Path, stages: list[planlib.Stage],
                  old_plan: dict[str, Any] | None, records: dict[str, dict[str, Any]],
                  forced: set[str]) -> None:
  """Refuses (FFNError naming the key) a begun or finished stage whose inputs changed, unless
  ``forced`` covers it."""
  old_inputs = {s["name"]: s.get("inputs", {}) for s in (old_plan or {}).get("stages", [])}
  for stage in stages:
    record = records[stage.name]
    if stage.name in forced or not _began(record):
      continue
    if record.get("fingerprint") not in (None, stage.fingerprint):
      key = planlib.first_difference(old_inputs.get(stage.name, {}), stage.inputs)
      what = (f"{key} differs from the run in {run_dir}" if key else
              f"an upstream stage of {stage.name} changed")
      raise FFNError(f"{config_path}: {what} (stage {stage.name} has begun or finished with the "
                     f"old value); use --force_from {stage.name} to redo it and everything after "
                     "it, or another run.run_dir")


def _slurm_options(c: dict[str, Any], stage: planlib.Stage, phase: planlib.Phase,
                   dependency: list[str]):
  from slurm.executor import SlurmOptions
  r = phase.resources
  run = c["run"]
  extra: dict[str, Any] = {}
  if dependency:
    extra["dependency"] = "afterok:" + ":".join(dependency)
  return SlurmOptions(
      cluster=run["cluster"], partition=r["partition"], time_min=r["time_min"],
      cpus_per_task=r["cpus_per_task"], gpus_per_node=r["gpus_per_task"], mem_gb=r["mem_gb"],
      account=run["account"], qos=run["qos"], array_parallelism=run["array_parallelism"],
      job_name=run["job_name"], extra=extra, setup=list(run["setup"]))


def _cancel(job_ids: list[str], timeout_s: float = 120.0) -> None:
  """scancel the arrays and wait until none of their tasks is still live."""
  if not job_ids:
    return
  subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60, check=False)
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if not any(is_live(s) for s, _ in slurm_states(job_ids).values()):
      return
    time.sleep(1.0)
  raise FFNError(f"scancel {' '.join(job_ids)}: jobs still live after {timeout_s:.0f} s")


def _classify(stages: list[planlib.Stage], records: dict[str, dict[str, Any]], forced: set[str],
              cluster: str) -> tuple[dict[str, str], list[str]]:
  """Per stage: ``done`` | ``live`` (its jobs queued/running: left alone) | ``submit``; and the
  live arrays to cancel first."""
  live_states = slurm_states(j for r in records.values() for j in r.get("job_ids", [])
                             if r["state"] != "done") if cluster == "slurm" else {}
  decision: dict[str, str] = {}
  cancel: list[str] = []
  for stage in stages:
    record = records[stage.name]
    same = record.get("fingerprint") == stage.fingerprint
    if stage.name not in forced and same and record["state"] == "done":
      decision[stage.name] = "done"
      continue
    arrays = list(record.get("job_ids", []))
    tasks = {j: s for j, s in live_states.items() if j.split("_")[0] in arrays}
    live = [j for j, (s, _) in tasks.items() if is_live(s)]
    stale = any("DependencyNeverSatisfied" in reason for s, reason in tasks.values() if is_live(s))
    upstream_ok = all(decision[d] in ("done", "live") for d in stage.depends_on)
    if (stage.name not in forced and same and live and not stale and upstream_ok
        and not any(tasks[j][0] in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                                    "NODE_FAIL") for j in tasks)):
      decision[stage.name] = "live"
      continue
    decision[stage.name] = "submit"
    if live:
      cancel += sorted({j.split("_")[0] for j in live})
  return decision, cancel


def describe_plan(stages: list[planlib.Stage], decision: dict[str, str], cluster: str) -> list[str]:
  lines = [f"cluster: {cluster}"]
  for stage in stages:
    what = {"done": "done (skipped)", "live": "queued/running (left alone)",
            "submit": "to submit"}[decision[stage.name]]
    after = ", ".join(stage.depends_on) or "-"
    lines.append(f"{stage.name}: {what}; after: {after}; fingerprint {stage.fingerprint}; "
                 f"outputs under stages/{stage.name}/g{stage.generation}/")
    for i, phase in enumerate(stage.phases):
      r = phase.resources
      dep = (f"afterok {stage.name}/{stage.phases[i - 1].name}" if i else
             ("afterok " + ", ".join(f"{d}/last" for d in stage.depends_on)
              if stage.depends_on else "none"))
      lines.append(f"  phase {phase.name}: {phase.tasks} task{'s' if phase.tasks != 1 else ''} x "
                   f"{r['cpus_per_task']} CPU, {r['mem_gb']:g} GB, {r['gpus_per_task']} GPU, "
                   f"{r['time_min']} min, partition {r['partition'] or 'default'}; dependency: {dep}")
    for key, value in stage.outputs.items():
      lines.append(f"  output {key}: {json.dumps(value)}")
  return lines


def run_pipeline(config_path: str, dry_run: bool = False, force_from: str | None = None,
                 wait: bool = False, poll_s: float = 10.0) -> int:
  from slurm.executor import resolve_cluster
  config, text = load_config(config_path)
  c = planlib.resolve(config)
  run_dir = Path(c["run"]["run_dir"])
  old_plan = read_json(run_dir / "plan.json")
  if old_plan is None and run_dir.is_dir() and any(run_dir.iterdir()):
    raise FFNError(f"{config_path}: run.run_dir {run_dir}: exists, is not empty and holds no "
                   "pipeline run (no plan.json); give a new or empty directory")
  generations = {s["name"]: s.get("generation", 1) for s in (old_plan or {}).get("stages", [])}
  stages = planlib.build_stages(c, run_dir, generations)
  names = [s.name for s in stages]
  if force_from is not None and force_from not in names:
    raise FFNError(f"--force_from {force_from}: not a stage of this pipeline (stages: "
                   f"{', '.join(names)})")
  forced = set(planlib.downstream(stages, force_from)) if force_from else set()
  records = _records(run_dir, names)
  check_changes(config_path, run_dir, stages, old_plan, records, forced)
  # A forced stage that has begun gets a new generation: its old outputs stay until it is done.
  bumped = {n: generations.get(n, 1) + 1 for n in forced if _began(records[n])}
  if bumped:
    stages = planlib.build_stages(c, run_dir, {**generations, **bumped})
  cluster = resolve_cluster(c["run"]["cluster"])
  decision, cancel = _classify(stages, records, forced, cluster)
  lines = describe_plan(stages, decision, cluster)
  if dry_run:
    print("\n".join(["dry run: nothing submitted, nothing written", *lines]))
    return 0
  for line in lines:
    _log.info("%s", line)
  run_dir.mkdir(parents=True, exist_ok=True)
  write_text_atomic(run_dir / "pipeline.toml", text)
  created = (old_plan or {}).get("created")
  write_text_atomic(run_dir / "plan.json",
                    json.dumps(planlib.plan_json(c, stages, created), indent=1) + "\n")
  if cancel:
    _log.info("cancelling stale jobs: %s", " ".join(cancel))
    _cancel(cancel)
  todo = [s for s in stages if decision[s.name] == "submit"]
  if not todo and all(v == "done" for v in decision.values()):
    print(f"every stage is done: {run_dir}")
    return 0
  if cluster == "slurm":
    if not todo:
      print(f"nothing to submit: {sum(v == 'live' for v in decision.values())} stages queued or "
            f"running; follow with: ffn pipeline status {run_dir}")
      return wait_pipeline(run_dir, poll_s) if wait else 0
    _submit_slurm(c, run_dir, stages, todo, records)
    print(f"submitted {sum(len(s.phases) for s in todo)} job arrays for {len(todo)} stages; "
          f"follow with: ffn pipeline status {run_dir}")
    return wait_pipeline(run_dir, poll_s) if wait else 0
  return _run_in_order(c, run_dir, todo, records, cluster)


def _new_submission(run_dir: Path, stage: planlib.Stage, record: dict[str, Any]) -> int:
  submission = int(record.get("submission", 0)) + 1

  def queued(data: dict[str, Any]) -> None:
    data.update(state="queued", fingerprint=stage.fingerprint, generation=stage.generation,
                submission=submission, job_ids=[], started=None, finished=None, elapsed_s=None,
                tasks={"done": 0, "failed": 0, "total": sum(p.tasks for p in stage.phases)},
                counters={}, outputs={})
    data.pop("error", None)
  update_stage(run_dir, stage.name, queued)
  planlib.stage_dir(run_dir, stage.name, stage.generation).mkdir(parents=True, exist_ok=True)
  return submission


def _submit_slurm(c: dict[str, Any], run_dir: Path, stages: list[planlib.Stage],
                  todo: list[planlib.Stage], records: dict[str, dict[str, Any]]) -> None:
  from slurm.executor import make_executor, submit_array
  last_array = {name: (r.get("job_ids") or [None])[-1] for name, r in records.items()
                if r["state"] != "done"}
  todo_names = {s.name for s in todo}
  for stage in stages:
    if stage.name not in todo_names:
      continue
    submission = _new_submission(run_dir, stage, records[stage.name])
    previous = [last_array[d] for d in stage.depends_on if last_array.get(d)]
    arrays: list[str] = []
    for phase in stage.phases:
      options = _slurm_options(c, stage, phase, previous)
      executor = make_executor(options, run_dir / "stages" / stage.name)
      task = PhaseTask(str(run_dir), stage.name, phase.name, submission, phase.tasks)
      jobs = submit_array(executor, task, [(i,) for i in range(phase.tasks)])
      array = str(jobs[0].job_id).split("_")[0]
      arrays.append(array)
      previous = [array]
      update_stage(run_dir, stage.name, lambda d, a=list(arrays): d.update(job_ids=a))
    last_array[stage.name] = arrays[-1]


def _run_in_order(c: dict[str, Any], run_dir: Path, todo: list[planlib.Stage],
                  records: dict[str, dict[str, Any]], cluster: str) -> int:
  """Local / debug cluster: each phase's tasks (subprocesses, or this process), in DAG order."""
  from slurm.executor import JobFailedError, make_executor, submit_array, wait_all
  for stage in todo:
    submission = _new_submission(run_dir, stage, records[stage.name])
    for phase in stage.phases:
      _log.info("stage %s, phase %s: %d task(s)", stage.name, phase.name, phase.tasks)
      if cluster == "debug":
        run_phase_here(str(run_dir), stage.name, phase.name, submission, phase.tasks)
        continue
      executor = make_executor(_slurm_options(c, stage, phase, []), run_dir / "stages" / stage.name)
      task = PhaseTask(str(run_dir), stage.name, phase.name, submission, phase.tasks)
      jobs = submit_array(executor, task, [(i,) for i in range(phase.tasks)])
      update_stage(run_dir, stage.name,
                   lambda d, j=[str(job.job_id) for job in jobs]: d.update(job_ids=d["job_ids"] + j))
      try:
        wait_all(jobs, desc=f"{stage.name}/{phase.name} tasks")
      except JobFailedError as e:
        print(f"stage {stage.name} failed: {e}")
        return 1
  for line in status_table(stage_statuses(run_dir)):
    print(line)
  return 0


def wait_pipeline(run_dir: str | os.PathLike, poll_s: float = 10.0,
                  timeout_s: float | None = None) -> int:
  """Follows a submitted run until every stage is done (0) or something failed and nothing is
  left running (1); a progress line (stages, tasks, rate, ETA) every poll."""
  start = time.monotonic()
  last = ""
  done_before: int | None = None
  while True:
    statuses = stage_statuses(run_dir)
    done = sum(s.state == "done" for s in statuses)
    tasks_done = sum(s.count("done") for s in statuses)
    done_before = tasks_done if done_before is None else done_before
    tasks = sum(sum(p.tasks for p in s.phases) for s in statuses)
    active = [s for s in statuses if s.count("running")]
    elapsed = time.monotonic() - start
    rate = (tasks_done - done_before) / elapsed if elapsed > 0 else 0.0
    eta = sum(s.eta_s or 0.0 for s in statuses) or None
    line = (f"{done}/{len(statuses)} stages done, {tasks_done}/{tasks} tasks; running: "
            f"{', '.join(s.name for s in active) or '-'}; {rate * 60:.1f} tasks/min"
            + (f", ETA {format_eta(eta)}" if eta else ""))
    if line != last:
      print(line, flush=True)
      last = line
    if done == len(statuses):
      return 0
    if something_failed(statuses) and not active:
      for text in status_table(statuses):
        print(text)
      return 1
    if timeout_s is not None and elapsed > timeout_s:
      raise FFNError(f"{run_dir}: not finished after {timeout_s:.0f} s")
    time.sleep(poll_s)
